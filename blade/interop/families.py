"""The model families blade imports and exports, as data: how a checkpoint names its architecture and
which of the options of blade's one decoder (blade/model/transformer.py) it uses.

Every family is a Llama-style decoder (RMSNorm, RoPE rotating halves, SwiGLU, grouped-query
attention) with the same tensor names (blade/interop/hf.py, gguf.py); they differ only in what this
table says. Adding a family is adding a row, not a branch in the model or the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    hf_architecture: str               # config.json "architectures"
    model_type: str                    # config.json "model_type"
    qkv_bias: bool = False             # bias on the q/k/v projections (none on o_proj)
    rope_scalings: tuple = ("default",)  # RoPE types its config.json may name (blade: model.rope_scaling)
    sliding_window_default: bool = True  # what an absent "use_sliding_window" means
    gguf_arch: str | None = None       # llama.cpp's general.architecture; None: written as another family
    gguf_permuted_qk: bool = True      # llama.cpp permutes Q/K rows for its interleaved-pair RoPE


FAMILIES = (
    # Llama 2, TinyLlama, SmolLM2, Llama 3.x (rope_type llama3; tied head in Llama-3.2-1B/3B)
    Family("llama", "LlamaForCausalLM", "llama", rope_scalings=("default", "llama3"), gguf_arch="llama"),
    # Mistral 7B: llama.cpp writes it as "llama"; blade exports it as a Llama
    Family("mistral", "MistralForCausalLM", "mistral"),
    # Qwen2 / Qwen2.5: q/k/v biases; llama.cpp keeps HF's rotate-half layout (NEOX RoPE)
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", qkv_bias=True, sliding_window_default=False,
           gguf_arch="qwen2", gguf_permuted_qk=False),
)

# blade's name for each RoPE type of a config.json
ROPE_SCALING = {"default": "none", "llama3": "llama3"}


def by_model_type(model_type) -> Family | None:
    return next((f for f in FAMILIES if f.model_type == model_type), None)


def by_gguf_arch(arch) -> Family | None:
    return next((f for f in FAMILIES if f.gguf_arch == arch), None)


def for_export(qkv_bias: bool, rope_scaling: str) -> Family:
    """The first family that has exactly these options (a Mistral is exported as a Llama)."""
    for f in FAMILIES:
        if f.qkv_bias == qkv_bias and rope_scaling in (ROPE_SCALING[r] for r in f.rope_scalings):
            return f
    raise ValueError(f"no model family has qkv_bias={qkv_bias} with rope_scaling={rope_scaling}")


def names() -> str:
    return ", ".join(f"{f.hf_architecture}" for f in FAMILIES)
