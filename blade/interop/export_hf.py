"""Export blade weights as a Hugging Face checkpoint directory that `transformers` loads (Llama, or the
family with the config's options: blade/interop/families.py).

    export_hf(model, "out/hf", tokenizer="SmolLM2.gguf")                 # a Transformer
    export_hf("out/model/model.safetensors", "out/hf")                    # `blade export` output

The layout and names are blade/interop/hf.py's; a blade checkpoint becomes fp32 safetensors with
`blade export` (blade/interop/export.py) first.
"""
from __future__ import annotations

import json
import os
import shutil

from blade.errors import BladeError
from blade.interop import hf as _hf


def _find_config(weights: str):
    """A blade model config next to an exported weights file: config.json (ModelConfig fields or
    {"model": {...}}) or config.yaml (a resolved run config)."""
    from blade.config import ModelConfig, load_config

    folder = weights if os.path.isdir(weights) else os.path.dirname(weights)
    for up in (folder, os.path.dirname(folder), os.path.dirname(os.path.dirname(folder))):
        js, ym = os.path.join(up, "config.json"), os.path.join(up, "config.yaml")
        if os.path.isfile(js):
            with open(js) as f:
                raw = json.load(f)
            raw = raw.get("model", raw)
            if "dim" in raw:
                return ModelConfig(**{k: v for k, v in raw.items() if k in ModelConfig.__annotations__})
        if os.path.isfile(ym):
            return load_config(ym).model
    raise BladeError(f"no blade config (config.json or config.yaml) next to {weights}: pass "
                     "model_config= (CLI: --config)")


def _load_state(source: str) -> dict:
    import torch

    files = ([source] if os.path.isfile(source) else
             sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith(".safetensors")))
    if not files:
        raise BladeError(f"no blade weights (*.safetensors) in {source}")
    state = {}
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            state.update(load_file(file))
        else:
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:
                raise BladeError(f"cannot read weights {file} ({type(e).__name__})") from None
            state.update(obj.get("module", obj) if isinstance(obj, dict) else {})
    return {k.removeprefix("module."): v for k, v in state.items()}


def export_hf(source, out_dir: str, model_config=None, tokenizer: str | None = None,
              dtype: str = "float32") -> str:
    """Write `out_dir` as a transformers checkpoint of the config's family: config.json,
    model.safetensors (HF names), generation_config.json and the tokenizer files when available.

    `source`: a blade Transformer, a state dict with blade names, or a path to blade weights
    (.safetensors / .pt file or a directory of .safetensors) with a config next to it.
    `tokenizer`: SentencePiece .model, tokenizer.json (its tokenizer_config.json etc. are copied
    too), .gguf or a directory; default: the tokenizer files next to a weights path, if any.
    """
    import torch
    from safetensors.torch import save_file

    from blade.data.tokenizer import load_tokenizer

    if isinstance(source, torch.nn.Module):
        cfg, state = model_config or source.cfg, source.state_dict()
    elif isinstance(source, dict):
        if model_config is None:
            raise BladeError("exporting a state dict needs model_config=")
        cfg, state = model_config, {k.removeprefix("module."): v for k, v in source.items()}
    else:
        cfg, state = model_config or _find_config(source), _load_state(source)
        if tokenizer is None:
            folder = source if os.path.isdir(source) else os.path.dirname(source)
            if any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model")):
                tokenizer = folder
    from blade.model.transformer import Transformer

    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Transformer(cfg).named_parameters()}
    out = {}
    for name, shape in shapes.items():
        if name not in state:
            raise BladeError(f"missing tensor {name} in the weights to export")
        t = state[name]
        if tuple(t.shape) != shape:
            raise BladeError(f"shape mismatch for {name}: weights {tuple(t.shape)}, config {shape}")
        out[_hf.hf_name(name)] = t.detach().to("cpu", getattr(torch, dtype)).contiguous().clone()
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, _hf.WEIGHTS), metadata={"format": "pt"})
    ids = {}
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        ids = {"eos_token_id": tok.eos_id, **({"bos_token_id": tok.bos_id} if tok.bos_id >= 0 else {})}
        _write_tokenizer(tok, tokenizer, out_dir)
    with open(os.path.join(out_dir, _hf.CONFIG), "w") as f:
        json.dump(_hf.export_config(cfg, {**ids, "torch_dtype": dtype}), f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(ids, f, indent=2)
    return out_dir


def _write_tokenizer(tok, given: str, out_dir: str) -> None:
    from blade.data.tokenizer import HFTokenizer

    if isinstance(tok, HFTokenizer):
        folder = os.path.dirname(tok.path) if not given.endswith(".gguf") else None
        if folder and os.path.basename(tok.path) == "tokenizer.json":
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                src = os.path.join(folder, name)
                if os.path.isfile(src) and not _samefile(src, os.path.join(out_dir, name)):
                    shutil.copyfile(src, os.path.join(out_dir, name))
            if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
                return
        tok.save(out_dir)
        return
    tok.save(out_dir)  # SentencePiece: tokenizer.model, read by transformers' LlamaTokenizer
    sp = tok.sp
    meta = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
            "legacy": False, "eos_token": sp.id_to_piece(tok.eos_id)}
    if tok.bos_id >= 0:
        meta["bos_token"] = sp.id_to_piece(tok.bos_id)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(meta, f, indent=1)


def _samefile(a: str, b: str) -> bool:
    return os.path.exists(b) and os.path.samefile(a, b)
