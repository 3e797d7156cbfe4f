"""Tokenizers: SentencePiece (trained by `blade prepare`, the default), Hugging Face `tokenizer.json`
and the tokenizer embedded in a GGUF file. `load_tokenizer(path)` picks by file type; every kind has
encode, encode_with_offsets (character spans), decode, id_to_piece, vocab_size, eos_id, bos_id and
fingerprint.

SentencePiece models are trained with identity normalisation, no whitespace folding and byte
fallback, so every string encodes and `decode(encode(text)) == text` exactly (newlines and tabs
included). Byte-level BPE tokenizers (GPT-2 style, e.g. SmolLM2's) round-trip exactly too.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from typing import Iterable, Iterator

import sentencepiece as spm

from blade.errors import DataError


def _training_lines(texts: Iterable[str], max_bytes: int, failure: list) -> Iterator[str]:
    """SentencePiece trains on "sentences": feed it the non-empty lines of each text.

    An exception raised by `texts` (e.g. a DataError about an input line) reaches the caller as an
    opaque RuntimeError from sentencepiece, so it is kept in `failure` to be re-raised as it was.
    """
    try:
        for text in texts:
            for line in text.split("\n"):
                if line.strip() and len(line.encode()) <= max_bytes:
                    yield line
    except Exception as e:
        failure.append(e)
        raise


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_path: str, seed: int = 0,
                        model_type: str = "unigram", max_sentences: int = 300_000,
                        num_threads: int = 2) -> str:
    """Train a SentencePiece model on `texts` and write it to `out_path`; returns `out_path`.

    Deterministic for a given input and seed. `max_sentences` caps the lines sampled for training,
    which keeps a few MB of text to seconds. With `model_type="unigram"` the vocabulary size is a
    soft limit: a small corpus may give a few pieces fewer (read `Tokenizer.vocab_size`).
    """
    max_bytes, failure = 16384, []
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts, max_bytes, failure), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            hard_vocab_limit=model_type != "unigram", input_sentence_size=max_sentences,
            shuffle_input_sentence=True, max_sentence_length=max_bytes, num_threads=num_threads,
            minloglevel=2)
    except RuntimeError as e:
        if failure:
            raise failure[0] from None
        reason = str(e).strip().splitlines()[0].split("] ")[-1]
        raise DataError(f"training a {vocab_size}-piece tokenizer failed ({reason}): byte "
                        "fallback needs 259 ids plus the corpus characters; raise vocab_size or "
                        "add text") from None
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(model.getvalue())
    return out_path


class Tokenizer:
    """A SentencePiece `.model` file; `fingerprint` (sha256 of its bytes) identifies it."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DataError(f"cannot read tokenizer model {path} ({e.strerror}): pass the "
                            ".model file written by `blade prepare`") from None
        self.sp = spm.SentencePieceProcessor()
        try:
            if not data:
                raise RuntimeError("empty file")
            self.sp.LoadFromSerializedProto(data)
        except RuntimeError:
            raise DataError(f"tokenizer model {path} is not a valid SentencePiece model: pass the "
                            ".model file written by `blade prepare`") from None
        self.fingerprint = hashlib.sha256(data).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and, per token, the [begin, end) span of `text` (Python str indices) it covers.

        SentencePiece's proto offsets are UTF-8 byte offsets; the `offset_mapping` output converts
        them to character offsets for str input (checked against the byte offsets on non-ASCII).
        Byte-fallback pieces of one character come out as empty spans followed by the span of the
        character on the last byte; we give all of them that character's span. The dummy-prefix
        piece ("▁" before the first word) keeps its empty span: it covers no character.
        """
        out = self.sp.encode(text, out_type="offset_mapping")
        ids, spans = list(out["ids"]), [tuple(s) for s in out["offsets"]]
        for i in range(len(ids) - 2, -1, -1):
            begin, end = spans[i]
            if begin == end and self.sp.is_byte(ids[i]) and spans[i + 1][0] == begin:
                spans[i] = spans[i + 1]
        return ids, spans

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    file_name = "tokenizer.model"

    def save(self, out_dir: str) -> str:
        """Write the model as `out_dir/tokenizer.model` (its bytes: the fingerprint stays the same)."""
        out = os.path.join(out_dir, self.file_name)
        if not (os.path.exists(out) and os.path.samefile(self.path, out)):
            shutil.copyfile(self.path, out)
        return out


# ----------------------------------------------------------------------------- Hugging Face / GGUF

HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
# used when no tokenizer_config.json names the end-of-text token, in this order
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def _token_text(value) -> str | None:
    """tokenizer_config.json gives special tokens as a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A `tokenizers.Tokenizer` (from a tokenizer.json or built from GGUF metadata).

    Text is encoded without the post-processor's special tokens (no BOS): `blade prepare` appends
    `eos_id` after each document itself. Special (control) tokens are kept on decode, so
    `decode(encode(text)) == text` for byte-level BPE. `fingerprint` is the sha256 of the canonical
    JSON serialisation, which is what `save` writes: a GGUF tokenizer and the tokenizer.json saved
    from it have the same fingerprint.
    """

    file_name = HF_TOKENIZER_FILE

    def __init__(self, tk, path: str, eos_token: str | None = None, bos_token: str | None = None):
        self.tk, self.path = tk, path
        self._json = tk.to_str()
        self.fingerprint = hashlib.sha256(self._json.encode()).hexdigest()
        vocab = tk.get_vocab(with_added_tokens=True)
        if eos_token is None:
            eos_token = next((t for t in _EOS_CANDIDATES if t in vocab), None)
        if eos_token not in vocab:
            raise DataError(f"tokenizer {path}: cannot tell its end-of-text token ("
                            f"{eos_token or 'none of ' + ', '.join(_EOS_CANDIDATES)} is in the "
                            f"vocabulary): put a tokenizer_config.json with \"eos_token\" next to it")
        self.eos_token, self.bos_token = eos_token, bos_token if bos_token in vocab else None
        self._eos_id = vocab[eos_token]
        self._bos_id = vocab[self.bos_token] if self.bos_token is not None else -1

    @classmethod
    def from_file(cls, path: str) -> "HFTokenizer":
        """A tokenizer.json (or a directory holding one); a tokenizer_config.json next to it names
        the EOS/BOS tokens."""
        from tokenizers import Tokenizer as _Tk

        if os.path.isdir(path):
            path = os.path.join(path, HF_TOKENIZER_FILE)
        try:
            tk = _Tk.from_file(path)
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"cannot load Hugging Face tokenizer {path} ({why}): pass a "
                            "tokenizer.json written by the `tokenizers` library") from None
        eos = bos = None
        config = os.path.join(os.path.dirname(path), HF_TOKENIZER_CONFIG)
        if os.path.isfile(config):
            try:
                with open(config) as f:
                    meta = json.load(f)
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read {config} ({e}): fix or remove it") from None
            eos, bos = _token_text(meta.get("eos_token")), _token_text(meta.get("bos_token"))
        return cls(tk, path, eos, bos)

    @classmethod
    def from_gguf(cls, path: str, reader=None) -> "HFTokenizer":
        from blade.interop.gguf import gguf_tokenizer

        tk, eos, bos = gguf_tokenizer(path, reader)
        return cls(tk, path, eos, bos)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character spans; the byte pieces of one character all get that character's span."""
        enc = self.tk.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.tk.id_to_token(int(i))

    def save(self, out_dir: str) -> str:
        """Write `out_dir/tokenizer.json` (canonical JSON) and a tokenizer_config.json naming EOS/BOS
        (also what transformers' PreTrainedTokenizerFast reads)."""
        out = os.path.join(out_dir, HF_TOKENIZER_FILE)
        with open(out, "w", encoding="utf-8") as f:
            f.write(self._json)
        meta = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                "bos_token": self.bos_token, "add_bos_token": False, "clean_up_tokenization_spaces": False}
        with open(os.path.join(out_dir, HF_TOKENIZER_CONFIG), "w") as f:
            json.dump(meta, f, indent=1)
        return out


def load_tokenizer(path: str):
    """SentencePiece `.model`, Hugging Face `tokenizer.json`, a `.gguf` file's embedded tokenizer,
    or a directory holding tokenizer.json (preferred) or tokenizer.model."""
    if os.path.isdir(path):
        for name in (HF_TOKENIZER_FILE, Tokenizer.file_name):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise DataError(f"no tokenizer.json or tokenizer.model in directory {path}: pass the "
                        "tokenizer file itself")
    if not os.path.isfile(path):
        raise DataError(f"tokenizer {path} not found: pass a SentencePiece .model, a Hugging Face "
                        "tokenizer.json or a .gguf file")
    if path.endswith(".json"):
        return HFTokenizer.from_file(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return HFTokenizer.from_gguf(path)
    return Tokenizer(path)
