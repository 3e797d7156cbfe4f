"""SentencePiece tokenizer: training for `blade prepare`, and encoding with character offsets.

Models are trained with identity normalisation, no whitespace folding and byte fallback, so every
string encodes and `decode(encode(text)) == text` exactly (newlines and tabs included).
"""
from __future__ import annotations

import hashlib
import io
import os
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
