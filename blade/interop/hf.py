"""Hugging Face checkpoints of the families in blade/interop/families.py: config.json <-> ModelConfig,
safetensors names <-> blade names.

A checkpoint directory holds config.json and model.safetensors, or shards listed in
model.safetensors.index.json (any *.safetensors files are read if the index is missing).
Tensors are read a slice of rows at a time, straight from the file (the safetensors header gives each
tensor's offset), so that a ZeRO-3 rank reads only the rows that hold its partition.
"""
from __future__ import annotations

import functools
import glob
import json
import math
import os
import re

from blade.errors import BladeError
from blade.interop import families

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# tensors some converters leave in Llama checkpoints that carry no weights blade needs
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_BLOCK = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn.wq.weight",
          "self_attn.k_proj.weight": "attn.wk.weight", "self_attn.v_proj.weight": "attn.wv.weight",
          "self_attn.o_proj.weight": "attn.wo.weight",
          "post_attention_layernorm.weight": "mlp_norm.weight",
          "mlp.gate_proj.weight": "mlp.w1.weight", "mlp.up_proj.weight": "mlp.w3.weight",
          "mlp.down_proj.weight": "mlp.w2.weight"}
_QKV_BIAS = {"self_attn.q_proj.bias": "attn.wq.bias", "self_attn.k_proj.bias": "attn.wk.bias",
             "self_attn.v_proj.bias": "attn.wv.bias"}  # families with qkv_bias (Qwen2)
_TOP = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")


def rename(name: str, top: dict, block_pattern: str, block: dict) -> str | None:
    """blade's name for a checkpoint tensor: a top-level one, or `<block_pattern>` = (layer, suffix)."""
    if name in top:
        return top[name]
    m = re.fullmatch(block_pattern, name)
    if m and m.group(2) in block:
        return f"layers.{m.group(1)}.{block[m.group(2)]}"
    return None


def blade_name(hf_name: str, qkv_bias: bool = False) -> str | None:
    return rename(hf_name, _TOP, r"model\.layers\.(\d+)\.(.+)", {**_BLOCK, **_QKV_BIAS} if qkv_bias else _BLOCK)


def hf_name(blade: str) -> str:
    for k, v in _TOP.items():
        if v == blade:
            return k
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", blade)
    for k, v in {**_BLOCK, **_QKV_BIAS}.items():
        if m and v == m.group(2):
            return f"model.layers.{m.group(1)}.{k}"
    raise KeyError(blade)


def read_config(path: str) -> dict:
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file):
        raise BladeError(f"no {CONFIG} in {path}: a Hugging Face checkpoint directory holds "
                         "config.json and *.safetensors")
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise BladeError(f"cannot read {file} ({e})") from None


def model_config(path: str, hf: dict) -> dict:
    """ModelConfig fields from a config.json of a family blade knows (blade/interop/families.py);
    anything blade's model lacks is an error."""
    archs = hf.get("architectures") or []
    mtype = hf.get("model_type")
    family = families.by_model_type(mtype)
    if family is None or (archs and family.hf_architecture not in archs):
        raise BladeError(f"unsupported architecture {'/'.join(archs) or '?'} (model_type "
                         f"'{mtype}') in {path}: blade imports {families.names()}")

    def unsupported(what: str) -> BladeError:
        return BladeError(f"unsupported checkpoint {path}: {what} (blade's {family.name} has no such option)")

    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise BladeError(f"{path}/{CONFIG} lacks integer '{key}'")
    if hf.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act '{hf['hidden_act']}'")
    for key in ("attention_bias", "mlp_bias"):  # Llama's attention_bias covers o_proj too
        if hf.get(key):
            raise unsupported(f"{key}=true")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type not in family.rope_scalings:
        raise unsupported(f"RoPE scaling '{rope_type}'")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise unsupported("partial RoPE")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // heads
    if head_dim * heads != dim:
        raise unsupported(f"head_dim {head_dim} * {heads} heads != hidden_size {dim}")
    max_len = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window") if hf.get("use_sliding_window", family.sliding_window_default) else None
    if window:  # full attention equals sliding-window attention up to the window
        max_len = min(max_len, int(window))
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    tie = hf.get("tie_word_embeddings", False)  # the default of every family's transformers config
    out = {"vocab_size": hf["vocab_size"], "dim": dim, "n_layers": hf["num_hidden_layers"],
           "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
           "ffn_hidden": hf["intermediate_size"], "max_seq_len": max_len,
           "rope_theta": float(theta), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
           "tie_embeddings": bool(tie), "qkv_bias": family.qkv_bias,
           "rope_scaling": families.ROPE_SCALING[rope_type]}
    if rope_type == "llama3":
        try:
            out.update(rope_scaling_factor=float(rope["factor"]),
                       rope_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_high_freq_factor=float(rope["high_freq_factor"]),
                       rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))
        except (KeyError, TypeError, ValueError) as e:
            raise BladeError(f"{path}/{CONFIG}: llama3 RoPE scaling without a numeric {e}") from None
    return out


def weight_files(path: str) -> dict[str, str]:
    """{hf tensor name: file}; the index json when there is one, else every *.safetensors."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise BladeError(f"cannot read {index} ({e!r}): re-save the checkpoint") from None
        for file in set(weight_map.values()):
            if not os.path.isfile(os.path.join(path, file)):
                raise BladeError(f"shard {file} listed in {index} is missing")
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        bins = glob.glob(os.path.join(path, "*.bin"))
        hint = (" (only PyTorch .bin weights: re-save with safetensors, e.g. "
                "model.save_pretrained(dir, safe_serialization=True))") if bins else ""
        raise BladeError(f"no *.safetensors weights in {path}{hint}")
    return {k: file for file in files for k in _header(file)[0] if k != "__metadata__"}


def tensors(path: str, cfg: dict):
    """Yield (blade name, shape, read_rows) for every weight, where read_rows(r0, r1) reads only rows
    r0..r1 from the file (with plain file reads: no memory map, so nothing but the rows becomes
    resident); a tied checkpoint's lm_head copy is skipped."""
    by_file: dict[str, list[str]] = {}
    for name, file in weight_files(path).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        header, base = _header(file)
        for name in names:
            if _IGNORED.fullmatch(name):
                continue
            blade = blade_name(name, cfg["qkv_bias"])
            if blade is None:
                raise BladeError(f"unexpected tensor {name} in {file}: not part of a model "
                                 f"blade supports ({families.names()})")
            if blade == "lm_head.weight" and cfg["tie_embeddings"]:
                continue
            info = header.get(name)
            if info is None:
                raise BladeError(f"tensor {name} is listed in the index of {path} but is not in {file}: "
                                 "re-save the checkpoint")
            if info.get("dtype") not in _DTYPES:
                raise BladeError(f"tensor {name} in {file} has dtype {info.get('dtype')}: blade reads "
                                 f"{', '.join(_DTYPES)} safetensors")
            shape = tuple(info["shape"])
            yield blade, shape, functools.partial(_read_rows, file, base + info["data_offsets"][0],
                                                  _DTYPES[info["dtype"]], shape)


_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _header(file: str) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(n)), 8 + n
    except (OSError, ValueError) as e:
        raise BladeError(f"cannot read the safetensors header of {file} ({e!r}): re-save the "
                         "checkpoint") from None


def _read_rows(file: str, offset: int, dtype: str, shape: tuple, r0: int, r1: int):
    import torch

    dtype = getattr(torch, dtype)
    row = math.prod(shape[1:]) * dtype.itemsize
    out = bytearray((r1 - r0) * row)
    with open(file, "rb") as f:
        f.seek(offset + r0 * row)
        if f.readinto(out) != len(out):
            raise BladeError(f"{file} is truncated: re-download or re-save the checkpoint")
    return torch.frombuffer(out, dtype=dtype).reshape(r1 - r0, *shape[1:])


def export_config(cfg, extra: dict | None = None) -> dict:
    """config.json for transformers from a blade ModelConfig: the family with the config's options
    (blade/interop/families.py), e.g. Qwen2ForCausalLM for qkv_bias."""
    family = families.for_export(cfg.qkv_bias, cfg.rope_scaling)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor,
                    low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_seq_len)
    out = {"architectures": [family.hf_architecture], "model_type": family.model_type,
           "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_hidden,
           "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.dim // cfg.n_heads,
           "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
           "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
           "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": cfg.init_std,
           # transformers >= 5 reads rope_parameters, older versions rope_theta and rope_scaling
           "rope_theta": cfg.rope_theta, "rope_parameters": rope,
           "torch_dtype": "float32", "use_cache": True}
    if cfg.rope_scaling != "none":
        out["rope_scaling"] = rope
    if family.qkv_bias:  # Qwen2: biases are implied; full attention
        out.update(use_sliding_window=False, sliding_window=None)
    else:
        out.update(attention_bias=False, mlp_bias=False)
    out.update(extra or {})
    return out
