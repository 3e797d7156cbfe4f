"""GGUF (llama.cpp) checkpoints: model shape from the metadata, dequantised fp32 tensors under blade's
names, and the embedded byte-level BPE tokenizer rebuilt with the `tokenizers` library.

llama.cpp's converter permutes the rows of attn_q / attn_k so that RoPE rotates adjacent pairs
(x[2i], x[2i+1]); blade (like HF Llama) rotates halves. Within each head the converter maps row
(half h, index i) to row (i, h), i.e. `w.reshape(heads, 2, hd/2, D).swapaxes(1, 2)`; `_unpermute`
applies the inverse, so the imported weights give the same outputs under blade's rotate-half RoPE.
Families whose llama.cpp RoPE rotates halves (Qwen2) are stored unpermuted (families.gguf_permuted_qk).
"""
from __future__ import annotations

import functools

import numpy as np

from blade.errors import BladeError
from blade.interop import families
from blade.interop.hf import rename

GGUF_PRETOKENIZERS = ("smollm", "gpt2", "gpt-2", "default", "llama-bpe", "llama3")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BLOCK = {"attn_norm": "attn_norm.weight", "attn_q": "attn.wq.weight", "attn_k": "attn.wk.weight",
          "attn_v": "attn.wv.weight", "attn_output": "attn.wo.weight", "ffn_norm": "mlp_norm.weight",
          "ffn_gate": "mlp.w1.weight", "ffn_up": "mlp.w3.weight", "ffn_down": "mlp.w2.weight"}
_QKV_BIAS = {"attn_q.bias": "attn.wq.bias", "attn_k.bias": "attn.wk.bias", "attn_v.bias": "attn.wv.bias"}
_TOP = {"token_embd.weight": "tok_emb.weight", "output_norm.weight": "norm.weight",
        "output.weight": "lm_head.weight"}


def open_reader(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on truncated or foreign files
        raise BladeError(f"cannot read GGUF file {path} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'corrupt'}): pass a llama.cpp .gguf") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _round(x: float) -> float:
    """GGUF stores floats as float32 (1e-5 reads as 9.99999974e-06): keep 7 significant digits."""
    return float(f"{float(x):.7g}")


def blade_name(gguf_name: str, qkv_bias: bool = False) -> str | None:
    block = {f"{k}.weight": v for k, v in _BLOCK.items()} | (_QKV_BIAS if qkv_bias else {})
    return rename(gguf_name, _TOP, r"blk\.(\d+)\.(\w+\.(?:weight|bias))", block)


def _family(path: str, reader) -> families.Family:
    arch = _field(reader, "general.architecture")
    family = families.by_gguf_arch(arch)
    if family is None:
        known = ", ".join(f.gguf_arch for f in families.FAMILIES if f.gguf_arch)
        raise BladeError(f"unsupported architecture '{arch}' in GGUF {path}: blade imports {known}")
    return family


def model_config(path: str, reader) -> dict:
    """ModelConfig fields of a GGUF whose architecture is a family blade knows; others are an error."""
    family = _family(path, reader)
    arch = family.gguf_arch
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    heads = get("attention.head_count")
    kv = get("attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv, list):
        raise BladeError(f"GGUF {path} has per-layer head counts: blade needs one shape for all layers")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise BladeError(f"GGUF {path} uses RoPE scaling '{scaling}': blade supports plain RoPE only")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise BladeError(f"GGUF {path} has rope_freqs (Llama-3.1-style RoPE scaling): not supported in "
                         "GGUF; import the Hugging Face checkpoint instead")
    if "token_embd.weight" not in tensors:
        raise BladeError(f"missing tensor token_embd.weight in GGUF {path}")
    dim = int(get("embedding_length"))
    vocab = int(get("vocab_size", int(tensors["token_embd.weight"].shape[-1])))
    cfg = {"vocab_size": vocab, "dim": dim, "n_layers": int(get("block_count")),
           "n_heads": int(heads), "n_kv_heads": int(kv), "ffn_hidden": int(get("feed_forward_length")),
           "max_seq_len": int(get("context_length", 2048)),
           "rope_theta": _round(get("rope.freq_base", 10000.0)),
           "norm_eps": _round(get("attention.layer_norm_rms_epsilon", 1e-5)),
           "tie_embeddings": "output.weight" not in tensors, "qkv_bias": family.qkv_bias,
           "rope_scaling": "none"}
    rot = get("rope.dimension_count")
    if rot is not None and int(rot) != dim // cfg["n_heads"]:
        raise BladeError(f"GGUF {path} rotates {rot} of {dim // cfg['n_heads']} head dimensions "
                         "(partial RoPE): not supported")
    return cfg


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (interleaved pairs -> HF rotate-half layout)."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors(path: str, reader, cfg: dict):
    """Yield (blade name, shape, read_rows) for every tensor, where read_rows(r0, r1) dequantises to
    fp32 only rows r0..r1 of the memory-mapped tensor (Q/K: the whole heads that hold them)."""
    permuted = _family(path, reader).gguf_permuted_qk
    for t in reader.tensors:
        name = blade_name(t.name, cfg["qkv_bias"])
        if name is None:
            raise BladeError(f"unexpected tensor {t.name} in GGUF {path}: not part of a model blade "
                             f"supports ({families.names()})")
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
        heads = (None if not permuted else cfg["n_heads"] if name.endswith("attn.wq.weight")
                 else cfg["n_kv_heads"] if name.endswith("attn.wk.weight") else None)
        yield name, shape, functools.partial(_read_rows, path, t, shape, heads)


def _read_rows(path: str, t, shape: tuple, heads: int | None, r0: int, r1: int) -> np.ndarray:
    if heads is not None:  # llama.cpp permuted rows within each head: read whole heads, unpermute
        hd = shape[0] // heads
        h0, h1 = r0 // hd, -(-r1 // hd)
        w = _unpermute(_dequantize(path, t, shape, h0 * hd, h1 * hd), h1 - h0)
        return w[r0 - h0 * hd:r1 - h0 * hd]
    return _dequantize(path, t, shape, r0, r1)


def _dequantize(path: str, t, shape: tuple, r0: int, r1: int) -> np.ndarray:
    """Rows r0..r1 as fp32 (t.data is rows x row-bytes for quantised types, the tensor for F32/F16)."""
    from gguf.quants import dequantize

    try:
        w = dequantize(t.data[r0:r1], t.tensor_type)
    except NotImplementedError:
        raise BladeError(f"GGUF {path}: tensor {t.name} has type {t.tensor_type.name}, which the "
                         "installed gguf package cannot dequantise: upgrade gguf") from None
    w = np.asarray(w, dtype=np.float32).reshape(r1 - r0, *shape[1:])
    return w if w.flags.writeable else w.copy()  # F32 tensors come back as views of the read-only map


def gguf_tokenizer(path: str, reader=None):
    """(tokenizers.Tokenizer, eos token, bos token) from a GGUF's `tokenizer.ggml.*` metadata.

    Only GPT-2-style byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is rebuilt; pre-tokenizers:
    smollm (single digits + byte level), gpt2/default (byte level) and llama-bpe (Llama-3 regex).
    Control tokens (token_type 3) become special added tokens, as in the model's tokenizer.json.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
    )

    reader = reader if reader is not None else open_reader(path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind is None:
        raise BladeError(f"GGUF {path} has no embedded tokenizer (no tokenizer.ggml.model)")
    if kind != "gpt2":
        raise BladeError(f"GGUF {path}: embedded tokenizer type '{kind}' is not supported (only "
                         "byte-level BPE 'gpt2'): pass the model's tokenizer.json or tokenizer.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRETOKENIZERS:
        raise BladeError(f"GGUF {path}: pre-tokenizer '{pre}' is not supported (known: "
                         f"{', '.join(GGUF_PRETOKENIZERS)}): pass the model's tokenizer.json")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                              fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in ("llama-bpe", "llama3"))
    if pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    byte_level])
    elif pre in ("llama-bpe", "llama3"):
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    specials = [tokens[i] for i, ty in enumerate(types) if ty == 3]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    def token(key):
        i = _field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return tk, token("tokenizer.ggml.eos_token_id"), token("tokenizer.ggml.bos_token_id")
