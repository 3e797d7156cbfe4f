"""Start from pretrained checkpoints and export back: Hugging Face Llama directories and GGUF files.

    fields = model_config_from_pretrained("SmolLM2.gguf")      # ModelConfig fields (the shape)
    model = Transformer(ModelConfig(**fields))
    load_pretrained(model, "SmolLM2.gguf")                      # before deepspeed.initialize
    export_hf(model, "out/hf", tokenizer="SmolLM2.gguf")        # transformers loads out/hf

A checkpoint is a directory with config.json + *.safetensors (Hugging Face; sharded or not) or a
.gguf file (dequantised to fp32, llama.cpp's Q/K row permutation undone: see blade/gguf.py).
Every problem (unsupported architecture, missing or unexpected tensor, shape mismatch, a data
tokenizer that is not the checkpoint's) raises one BladeError line naming it.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil

from blade.errors import BladeError, ConfigError
from blade.interop import gguf as _gguf
from blade.interop import hf as _hf

# ModelConfig fields a checkpoint determines (the rest: dropout, init_std, loss_chunk_tokens)
PRETRAINED_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden",
                     "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings")


def checkpoint_kind(path: str) -> str:
    """'gguf' for a GGUF file, 'hf' for a directory with config.json; anything else is an error."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, _hf.CONFIG)):
            return "hf"
        raise BladeError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    if not os.path.isfile(path):
        raise BladeError(f"pretrained checkpoint {path} not found: pass a Hugging Face checkpoint "
                         "directory or a .gguf file")
    with open(path, "rb") as f:
        if f.read(4) == b"GGUF":
            return "gguf"
    raise BladeError(f"{path} is neither a GGUF file nor a Hugging Face checkpoint directory")


@functools.lru_cache(maxsize=2)
def _reader(path: str, mtime: float, size: int):
    return _gguf.open_reader(path)


def _gguf_reader(path: str):
    st = os.stat(path)
    return _reader(os.path.abspath(path), st.st_mtime, st.st_size)


def model_config_from_pretrained(path: str) -> dict:
    """The checkpoint's shape as ModelConfig fields (PRETRAINED_FIELDS)."""
    if checkpoint_kind(path) == "gguf":
        return _gguf.model_config(path, _gguf_reader(path))
    return _hf.model_config(path, _hf.read_config(path))


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)


def merge_pretrained_config(model: dict) -> dict:
    """The raw `model:` config section with the checkpoint's shape filled in.

    Keys given explicitly must agree with the checkpoint (ConfigError otherwise), except that
    max_seq_len may be set lower than the checkpoint's context length.
    """
    path = model.get("init_from")
    if not isinstance(path, str):  # None, or a wrong type that the config's type check reports
        return dict(model)
    if not os.path.exists(path):
        raise ConfigError(f"config error: model.init_from: no checkpoint at '{path}' (give a "
                          "Hugging Face checkpoint directory or a .gguf file)")
    out = dict(model)
    for key, value in model_config_from_pretrained(path).items():
        given = model.get(key)
        if given is None:
            out[key] = value
        elif key == "max_seq_len" and isinstance(given, int) and given <= value:
            continue
        elif not _same(given, value):
            hint = (f"use at most {value}" if key == "max_seq_len"
                    else "drop it: the shape comes from model.init_from")
            raise ConfigError(f"config error: model.{key}={given!r} conflicts with the checkpoint "
                              f"{path} ({key}={value!r}): {hint}")
    return out


def _check_model(model, ck: dict, path: str) -> None:
    for key in PRETRAINED_FIELDS:
        have, want = getattr(model.cfg, key), ck[key]
        bad = have > want if key == "max_seq_len" else not _same(have, want)
        if bad:
            raise BladeError(f"shape mismatch: the model has {key}={have!r} but the checkpoint "
                             f"{path} has {key}={want!r}: build the model from "
                             "model_config_from_pretrained(path)")


def load_pretrained(model, path: str) -> list[str]:
    """Copy a checkpoint's weights into a blade Transformer (plain, or ZeRO-3 partitioned: every
    rank must call it then). Returns the loaded parameter names."""
    import torch

    from blade.model.transformer import _gathered

    kind = checkpoint_kind(path)
    ck = model_config_from_pretrained(path)
    _check_model(model, ck, path)
    params = dict(model.named_parameters(remove_duplicate=False))
    if ck["tie_embeddings"]:
        params.pop("lm_head.weight", None)
    source = (_gguf.tensors(path, _gguf_reader(path), ck) if kind == "gguf"
              else _hf.tensors(path, ck))
    loaded = []
    with torch.no_grad():
        for name, value in source:
            if name not in params:
                raise BladeError(f"unexpected tensor {name} in {path}: the model has no such "
                                 "parameter (is the checkpoint untied while config.json says tied?)")
            p = params[name]
            value = torch.as_tensor(value)
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if tuple(value.shape) != shape:
                raise BladeError(f"shape mismatch for {name} in {path}: checkpoint "
                                 f"{tuple(value.shape)}, model {shape}")
            with _gathered(p):
                p.data.copy_(value)
            loaded.append(name)
    missing = sorted(set(params) - set(loaded), key=_param_order(params))
    if missing:
        names = missing[0] if kind == "gguf" else f"{_hf.hf_name(missing[0])} ({missing[0]})"
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BladeError(f"missing tensor {names}{more} in {path}")
    return loaded


def _param_order(params: dict):
    order = {n: i for i, n in enumerate(params)}
    return lambda n: order[n]


# ----------------------------------------------------------------------------- tokenizers

def pretrained_tokenizer(path: str):
    """The checkpoint's own tokenizer (GGUF-embedded, or tokenizer.json / tokenizer.model in a
    HF directory), or None when the checkpoint carries none."""
    from blade.data.tokenizer import HFTokenizer, load_tokenizer

    if checkpoint_kind(path) == "gguf":
        return HFTokenizer.from_gguf(path, _gguf_reader(path))
    try:
        return load_tokenizer(path)
    except BladeError:
        if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
            raise
        return None


def check_data_compat(path: str, data_dir: str) -> None:
    """The data in `data_dir` (a `blade prepare` output) must fit the checkpoint: its vocabulary no
    larger than the embedding, and, when the checkpoint carries a tokenizer, that same tokenizer."""
    file = os.path.join(data_dir, "manifest.json")
    try:
        with open(file) as f:
            manifest = json.load(f)
        vocab, sha = int(manifest["vocab_size"]), manifest["tokenizer"].get("sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BladeError(f"cannot read the tokenizer entry of {file} ({e!r}): re-run blade prepare") \
            from None
    ck = model_config_from_pretrained(path)
    if vocab > ck["vocab_size"]:
        raise BladeError(f"vocabulary mismatch: the data in {data_dir} has {vocab} token ids but "
                         f"the checkpoint {path} embeds {ck['vocab_size']}: re-run blade prepare "
                         f"--tokenizer {path}")
    prints = _tokenizer_fingerprints(path)
    if prints and sha not in prints:
        raise BladeError(f"vocabulary mismatch: the data in {data_dir} was tokenised with another "
                         f"tokenizer (sha256 {str(sha)[:12]}) than the checkpoint {path}'s "
                         f"({', '.join(p[:12] for p in prints)}): re-run blade prepare --tokenizer {path}")


def _tokenizer_fingerprints(path: str) -> list[str]:
    """Fingerprints of every tokenizer the checkpoint carries (a HF directory may hold both a
    tokenizer.json and the SentencePiece tokenizer.model it was converted from)."""
    from blade.data.tokenizer import load_tokenizer

    if checkpoint_kind(path) == "gguf":
        return [pretrained_tokenizer(path).fingerprint]
    return [load_tokenizer(os.path.join(path, f)).fingerprint
            for f in ("tokenizer.json", "tokenizer.model") if os.path.isfile(os.path.join(path, f))]


# ----------------------------------------------------------------------------- export

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
    """Write `out_dir` as a transformers LlamaForCausalLM checkpoint: config.json,
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
