"""`blade eval MODEL_OR_RUN --tasks ...`: downstream evaluation with EleutherAI's lm-evaluation-harness
(`pip install -e .[eval]`), which scores the model as a Hugging Face checkpoint (its `hf` model):

    summary = evaluate("runs/continual-smollm2", ["blade_continuation"], "runs/continual-smollm2/eval")

MODEL_OR_RUN is a run directory or checkpoint (its proxy: `blade export`, then `export_hf`), a `blade
export` directory, a .gguf, or a Hugging Face directory of a family blade knows (used as it is). Tasks are
blade's local ones (blade/eval/tasks: no download) and every task the harness ships (hellaswag, gsm8k,
...: their datasets come from the Hugging Face Hub). The metrics are the harness's own.
"""
from __future__ import annotations

import glob
import json
import os

from blade.errors import BladeError

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def local_tasks() -> list[str]:
    """The task names defined in blade/eval/tasks/*.yaml."""
    names = []
    for file in sorted(glob.glob(os.path.join(TASKS_DIR, "*.yaml"))):
        with open(file) as f:
            names += [line.split(":", 1)[1].strip() for line in f if line.startswith("task:")]
    return names


def as_hf_checkpoint(source: str, work: str) -> str:
    """A Hugging Face directory with `source`'s weights and tokenizer (written under `work` unless
    `source` is one already)."""
    from blade.interop.export_hf import export_hf

    if not os.path.exists(source):
        raise BladeError(f"no model at {source}: give a run directory, a checkpoint, a `blade export` "
                         "directory, a .gguf or a Hugging Face directory")
    out = os.path.join(work, "hf")
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json")):
        from blade.interop.pretrained import model_config_from_pretrained

        model_config_from_pretrained(source)  # a family blade knows (one line otherwise)
        return source
    if os.path.isfile(source):  # a .gguf (or another pretrained checkpoint file)
        from blade.config import ModelConfig
        from blade.interop.pretrained import load_pretrained, model_config_from_pretrained
        from blade.model.transformer import Transformer

        model = Transformer(ModelConfig(**model_config_from_pretrained(source)))
        load_pretrained(model, source)
        return export_hf(model, out, tokenizer=source)
    if not os.path.isfile(os.path.join(source, "export.json")):  # a run or a checkpoint: export it first
        from blade.interop.export import export

        export(source, os.path.join(work, "export"))
        source = os.path.join(work, "export")
    return export_hf(os.path.join(source, "model.safetensors"), out)


def evaluate(source: str, tasks: list[str], out: str, limit: int | None = None,
             num_fewshot: int | None = None, batch_size: int = 8, device: str | None = None,
             seed: int = 1234) -> dict:
    """Run the harness; return {task: {metric: value}} and write it with the settings to out/results.json."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise BladeError("blade eval needs lm-evaluation-harness: pip install -e .[eval]") from None
    import torch

    local = local_tasks()

    def check(known) -> None:
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise BladeError(f"unknown task {unknown[0]}: blade's local tasks are {', '.join(local)}; the "
                             "harness's are listed by `lm-eval ls tasks`")

    check(set(local) | {t for t in tasks if not t.startswith("blade_")})  # before indexing ~10k task files
    managed = TaskManager(include_path=TASKS_DIR, include_defaults=any(t not in local for t in tasks))
    check(managed.all_tasks)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf_dir = as_hf_checkpoint(source, out)
    result = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": hf_dir, "dtype": "float32", "device": device},
        tasks=list(tasks), num_fewshot=num_fewshot, batch_size=batch_size, limit=limit,
        task_manager=managed, log_samples=False, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)
    summary = {task: {k.split(",")[0]: v for k, v in metrics.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
               for task, metrics in result["results"].items()}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"model": os.path.abspath(source), "hf_checkpoint": os.path.abspath(hf_dir),
                   "tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot, "seed": seed,
                   "results": summary, "n_samples": result.get("n-samples")}, f, indent=1)
    return summary
