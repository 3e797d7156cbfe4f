"""Start from pretrained checkpoints: Hugging Face directories and GGUF files of the families in
blade/interop/families.py (Llama 2/3.x, Mistral, SmolLM2, Qwen2/2.5).

    fields = model_config_from_pretrained("SmolLM2.gguf")      # ModelConfig fields (the shape)
    model = Transformer(ModelConfig(**fields))
    load_pretrained(model, "SmolLM2.gguf")                      # before deepspeed.initialize

A checkpoint is a directory with config.json + *.safetensors (Hugging Face; sharded or not) or a
.gguf file (dequantised to fp32, llama.cpp's Q/K row permutation undone: see blade/interop/gguf.py).
Every problem (unsupported architecture, missing or unexpected tensor, shape mismatch, a data
tokenizer that is not the checkpoint's) raises one BladeError line naming it.
"""
from __future__ import annotations

import functools
import json
import math
import os

from blade.errors import BladeError, ConfigError
from blade.interop import gguf as _gguf
from blade.interop import hf as _hf

# ModelConfig fields a checkpoint determines (the rest: dropout, init_std, loss_chunk_tokens)
# (the rope_* factors only for a checkpoint with rope_scaling llama3)
PRETRAINED_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden",
                     "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings", "qkv_bias", "rope_scaling",
                     "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                     "rope_original_max_seq_len")


def _kind(path: str) -> str:
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


def _stamp(path: str) -> tuple:
    """What the per-process caches key on: the file (a HF directory's config.json) as it is now."""
    try:
        st = os.stat(os.path.join(path, _hf.CONFIG) if os.path.isdir(path) else path)
    except OSError:
        return os.path.abspath(path), None, None
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _open(path: str, stamp: tuple) -> tuple:
    """(kind, shape fields, GGUF reader or None): a checkpoint's header is read once per process, by
    the config's shape merge, the data check and the weight load alike (errors are not cached)."""
    kind = _kind(path)
    if kind == "gguf":
        reader = _gguf.open_reader(path)
        return kind, _gguf.model_config(path, reader), reader
    return kind, _hf.model_config(path, _hf.read_config(path)), None


def checkpoint_kind(path: str) -> str:
    """'gguf' for a GGUF file, 'hf' for a directory with config.json; anything else is an error."""
    return _open(path, _stamp(path))[0]


def _gguf_reader(path: str):
    return _open(path, _stamp(path))[2]


def model_config_from_pretrained(path: str) -> dict:
    """The checkpoint's shape as ModelConfig fields (PRETRAINED_FIELDS)."""
    return dict(_open(path, _stamp(path))[1])


def _same(a, b) -> bool:
    if isinstance(a, (bool, str)) or isinstance(b, (bool, str)):
        return a == b and type(a) is type(b)
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)


def merge_pretrained_config(model: dict, explicit=None, say=None) -> dict:
    """The raw `model:` config section with the checkpoint's shape filled in.

    A key named in `explicit` (the command line's; default: every key given) must agree with the
    checkpoint (ConfigError otherwise), except that max_seq_len may be set lower than the checkpoint's
    context length. Any other disagreeing key (one a config file set, e.g. the quickstart's
    vocab_size) takes the checkpoint's value, and `say` gets one line naming them.
    """
    path = model.get("init_from")
    if not isinstance(path, str):  # None, or a wrong type that the config's type check reports
        return dict(model)
    if not os.path.exists(path):
        raise ConfigError(f"config error: model.init_from: no checkpoint at '{path}' (give a "
                          "Hugging Face checkpoint directory or a .gguf file)")
    explicit = set(model) if explicit is None else set(explicit)
    out, replaced = dict(model), []
    for key, value in model_config_from_pretrained(path).items():
        given = model.get(key)
        if given is None:
            out[key] = value
        elif key == "max_seq_len" and isinstance(given, int) and not isinstance(given, bool) \
                and given <= value:
            continue
        elif _same(given, value):
            continue
        elif key not in explicit:
            out[key] = value
            replaced.append(f"{key} {given!r} -> {value!r}")
        else:
            hint = (f"use at most {value}" if key == "max_seq_len"
                    else "drop it: the shape comes from model.init_from")
            raise ConfigError(f"config error: model.{key}={given!r} conflicts with the checkpoint "
                              f"{path} ({key}={value!r}): {hint}")
    if replaced and say is not None:
        say(f"model.init_from={path} sets the shape; replaced the config file's {', '.join(replaced)}")
    return out


def _check_model(model, ck: dict, path: str) -> None:
    for key, want in ck.items():
        have = getattr(model.cfg, key)
        bad = have > want if key == "max_seq_len" else not _same(have, want)
        if bad:
            raise BladeError(f"shape mismatch: the model has {key}={have!r} but the checkpoint "
                             f"{path} has {key}={want!r}: build the model from "
                             "model_config_from_pretrained(path)")


def load_pretrained(model, path: str) -> list[str]:
    """Copy a checkpoint's weights into a blade Transformer (plain, or ZeRO-3 partitioned: every rank
    reads, one tensor at a time, only the rows that hold the part it owns). Returns the loaded
    parameter names."""
    import torch

    from blade.runtime.zero import full_shape, set_from_rows

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
        for name, shape, read_rows in source:
            if name not in params:
                raise BladeError(f"unexpected tensor {name} in {path}: the model has no such "
                                 "parameter (is the checkpoint untied while config.json says tied?)")
            p = params[name]
            if shape != full_shape(p):
                raise BladeError(f"shape mismatch for {name} in {path}: checkpoint "
                                 f"{shape}, model {full_shape(p)}")
            set_from_rows(p, read_rows)  # ZeRO-3: the rows of this rank's part only
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
    return _fingerprints(path, _stamp(path))


@functools.lru_cache(maxsize=4)
def _fingerprints(path: str, stamp: tuple) -> list[str]:
    """Fingerprints of every tokenizer the checkpoint carries (a HF directory may hold both a
    tokenizer.json and the SentencePiece tokenizer.model it was converted from)."""
    from blade.data.tokenizer import load_tokenizer

    if checkpoint_kind(path) == "gguf":
        return [pretrained_tokenizer(path).fingerprint]
    return [load_tokenizer(os.path.join(path, f)).fingerprint
            for f in ("tokenizer.json", "tokenizer.model") if os.path.isfile(os.path.join(path, f))]
