"""`blade prepare`: text (JSONL / .txt) -> tokenized, packed shards (blade/data/shards.py) + manifest.json.

The documents of a split, from however many inputs in whatever order, are first shuffled together
(seeded; `mix=False` keeps the input order, e.g. for a curriculum), so that any run of sequences holds
the sources in their corpus shares: token selection can only choose between sources a batch contains.
Every document is tokenized (by `workers` processes; the output is byte-identical for any number) and
followed by EOS; the documents are concatenated into one stream and cut into samples of seq_len + 1
tokens with stride seq_len, so consecutive samples share one token and every stream token after the
first is a prediction target exactly once. The final partial sample is dropped (`dropped_tail_tokens`).
Each token also carries its document's source id and a label id (0 = unlabelled, else 1 + index into
the manifest's `labels`).
"""
from __future__ import annotations

import glob
import itertools
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from blade.data.tokenizer import (
    HF_TOKENIZER_CONFIG,
    HF_TOKENIZER_FILE,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)
from blade.data.shards import FORMAT, MAX_LABELS, MAX_SOURCES, ShardPacker, token_dtype
from blade.errors import DataError

TOKENIZER_FILE = "tokenizer.model"
DOCS_PER_TASK = 32  # documents a tokenizer worker handles per task


@dataclass
class Document:
    text: str
    source: str
    labels: list  # [(start_char, end_char, label_name)]


def _check_input(path: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"input file {path} not found: pass existing .jsonl or .txt files")
    if not path.endswith((".jsonl", ".txt")):
        raise DataError(f"input {path} is neither .jsonl nor .txt: convert it to JSONL with a "
                        '"text" field per line')


def _jsonl_document(line: str, where: str, stem: str) -> Document:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg}): write one JSON object per line"
                        ) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DataError(f'{where}: no "text" string field: every line must be a JSON object like '
                        '{"text": "...", "source": "...", "labels": [[start, end, "name"]]}')
    text, source = obj["text"], obj.get("source", stem)
    if not isinstance(source, str) or not source:
        raise DataError(f'{where}: "source" must be a non-empty string (or left out for "{stem}")')
    labels = obj.get("labels") or []
    if not isinstance(labels, list):
        raise DataError(f'{where}: "labels" must be a list of [start_char, end_char, "name"] spans')
    for span in labels:
        ok = (isinstance(span, list) and len(span) == 3 and isinstance(span[2], str) and span[2]
              and all(isinstance(x, int) and not isinstance(x, bool) for x in span[:2]))
        if not ok:
            raise DataError(f'{where}: label {span!r} is not [start_char, end_char, "name"]: '
                            "give character offsets and a non-empty label name")
        if not 0 <= span[0] < span[1] <= len(text):
            raise DataError(f"{where}: label span {span!r} is out of range for a text of "
                            f"{len(text)} characters: spans need 0 <= start < end <= len(text), "
                            "in characters")
    return Document(text, source, [tuple(s) for s in labels])


def _parse(raw: bytes, path: str, lineno: int) -> Document:
    """One document from the bytes of a JSONL line or of a whole .txt file."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"input {path} is not UTF-8 text: re-encode it as UTF-8") from None
    if path.endswith(".txt"):
        return Document(text, Path(path).stem, [])
    return _jsonl_document(text, f"{path}:{lineno}", Path(path).stem)


def _document_at(f, path: str, offset: int, lineno: int) -> Document:
    f.seek(offset)
    return _parse(f.read() if path.endswith(".txt") else f.readline(), path, lineno)


def _index_input(path: str) -> tuple[list[int], list[int]]:
    """Byte offsets and line numbers of the documents with text in one input (every line is parsed: a
    bad one fails here, before any tokenizing)."""
    _check_input(path)
    offsets, linenos = [], []
    with open(path, "rb") as f:
        lines = [f.read()] if path.endswith(".txt") else f
        offset = 0
        for lineno, line in enumerate(lines, 1):
            if line.strip() and _parse(line, path, lineno).text:
                offsets.append(offset)
                linenos.append(lineno)
            offset += len(line)
    if not offsets:
        raise DataError(f"input {path} holds no documents with text: remove it or fill it")
    return offsets, linenos


@dataclass
class _DocIndex:
    """Where each document of a split is: its input, the byte offset of its line, its line number."""
    inputs: list[str]
    which: np.ndarray
    offset: np.ndarray
    lineno: np.ndarray

    @classmethod
    def build(cls, inputs: list[str]) -> "_DocIndex":
        parts = [_index_input(p) for p in inputs]
        which = np.concatenate([np.full(len(o), n, np.int32) for n, (o, _) in enumerate(parts)])
        return cls(list(inputs), which, np.concatenate([np.array(o, np.int64) for o, _ in parts]),
                   np.concatenate([np.array(ln, np.int64) for _, ln in parts]))

    def documents(self, order: np.ndarray) -> Iterator[Document]:
        handles = {}
        try:
            for j in order:
                path = self.inputs[self.which[j]]
                if path not in handles:
                    handles[path] = open(path, "rb")
                yield _document_at(handles[path], path, int(self.offset[j]), int(self.lineno[j]))
        finally:
            for f in handles.values():
                f.close()


class _Names:
    """First-seen-order name -> id registry (ids must fit the on-disk integer type)."""

    def __init__(self, what: str, limit: int):
        self.what, self.limit, self.ids = what, limit, {}

    def id(self, name: str) -> int:
        if name not in self.ids:
            if len(self.ids) == self.limit:
                raise DataError(f"more than {self.limit} distinct {self.what} names (at {name!r}): "
                                f"merge {self.what} names")
            self.ids[name] = len(self.ids)
        return self.ids[name]

    @property
    def names(self) -> list[str]:
        return list(self.ids)


def _tokenize(doc: Document, tok: Tokenizer):
    """Token ids + EOS, the source name, the document's label names, and per token 1 + the index of
    its label in those names (0 = unlabelled). Later spans win where spans overlap."""
    if not doc.labels:  # offsets are only needed to label tokens
        ids = tok.encode(doc.text)
        return np.array(ids + [tok.eos_id], dtype=np.int32), doc.source, [], np.zeros(len(ids) + 1, np.uint8)
    ids, spans = tok.encode_with_offsets(doc.text)
    begins, ends = np.array(spans, dtype=np.int64).reshape(-1, 2).T
    names = list(dict.fromkeys(name for _, _, name in doc.labels))
    if len(names) > MAX_LABELS:
        raise DataError(f"a document of source {doc.source!r} has more than {MAX_LABELS} distinct label "
                        "names: merge label names")
    lab = np.zeros(len(ids) + 1, dtype=np.uint8)
    for start, end, name in doc.labels:  # a token is labelled if any of its characters is inside
        lab[:-1][(begins < end) & (ends > start)] = 1 + names.index(name)
    return np.array(ids + [tok.eos_id], dtype=np.int32), doc.source, names, lab


def _tokenize_task(start: int, tok, index: _DocIndex, order: np.ndarray) -> list:
    return [_tokenize(doc, tok) for doc in index.documents(order[start:start + DOCS_PER_TASK])]


_WORKER_ARGS: tuple = ()


def _init_worker(*args) -> None:
    global _WORKER_ARGS
    _WORKER_ARGS = args


def _pool_task(start: int) -> list:
    return _tokenize_task(start, *_WORKER_ARGS)


def _tokenized(index: _DocIndex, order: np.ndarray, tok, workers: int) -> Iterator[tuple]:
    """_tokenize of every document in `order`, in that order, from `workers` processes."""
    starts = range(0, len(order), DOCS_PER_TASK)
    if workers <= 1 or len(starts) <= 1:
        results = (_tokenize_task(s, tok, index, order) for s in starts)
        yield from itertools.chain.from_iterable(results)
        return
    # fork: the tokenizer and the index reach the workers without pickling; results come back in order
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (tok, index, order)) as pool:
        for docs in pool.imap(_pool_task, starts):
            yield from docs


def _write_split(index: _DocIndex, out_dir: str, seq_len: int, tok: Tokenizer, sources: _Names,
                 labels: _Names, shard_sequences: int, seed: int, mix: bool, workers: int) -> dict:
    """Mix, tokenize and pack one split."""
    n = len(index.which)
    order = np.random.default_rng(seed).permutation(n) if mix else np.arange(n)
    packer = ShardPacker(out_dir, seq_len, shard_sequences, token_dtype(tok.vocab_size))
    for tokens, source, names, lab in _tokenized(index, order, tok, workers):
        lut = np.array([0] + [1 + labels.id(name) for name in names], dtype=np.uint8)
        packer.add(tokens, sources.id(source), lut[lab])
    return {**packer.close(), "documents": n}


def _save_tokenizer(tok, out_dir: str) -> None:
    """Write `tok` into `out_dir` and remove the other kind's files left by an earlier run."""
    stale = ((HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG) if tok.file_name == TOKENIZER_FILE
             else (TOKENIZER_FILE,))
    for name in stale:
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    tok.save(out_dir)


def _prepare(dirs: dict[str, list[str]], tok_dir: str, seq_len: int, tokenizer: str | None,
             vocab_size: int, shard_sequences: int, seed: int, mix: bool,
             workers: int | None) -> dict[str, dict]:
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    if workers < 1:
        raise DataError(f"workers {workers} must be >= 1 (or left out: one per core)")
    if seq_len < 2:
        raise DataError(f"seq_len {seq_len} is too small: use seq_len >= 2")
    if shard_sequences < 1:
        raise DataError(f"shard_sequences {shard_sequences} must be >= 1")
    for d, inputs in dirs.items():
        if not inputs:
            raise DataError(f"no input files given for {d}: pass .jsonl or .txt files")
    indices = {d: _DocIndex.build(inputs) for d, inputs in dirs.items()}  # every line checked up front
    os.makedirs(tok_dir, exist_ok=True)
    if tokenizer is None:
        tok_path = os.path.join(tok_dir, TOKENIZER_FILE)
        all_text = (doc.text for index in indices.values() for doc in index.documents(np.arange(len(index.which))))
        train_sentencepiece(all_text, vocab_size, tok_path, seed=seed)
        tok = Tokenizer(tok_path)
    else:  # SentencePiece .model, HF tokenizer.json or .gguf: saved as tokenizer.model / .json
        tok = load_tokenizer(tokenizer)
        _save_tokenizer(tok, tok_dir)
    sources, labels = _Names("source", MAX_SOURCES), _Names("label", MAX_LABELS)
    splits = {}
    for d, index in indices.items():
        os.makedirs(d, exist_ok=True)
        for pattern in ("manifest.json", "shard-*.tar"):  # outputs of an earlier run
            for stale in glob.glob(os.path.join(d, pattern)):
                os.remove(stale)
        if os.path.abspath(d) != os.path.abspath(tok_dir):
            _save_tokenizer(tok, d)
        splits[d] = _write_split(index, d, seq_len, tok, sources, labels, shard_sequences, seed, mix,
                                 workers)
    manifests = {}
    for d, s in splits.items():  # written last, with the name lists complete across all splits
        manifests[d] = {
            "format": FORMAT, "seq_len": seq_len, "vocab_size": tok.vocab_size,
            "tokenizer": {"file": tok.file_name, "sha256": tok.fingerprint},
            "sources": sources.names, "labels": labels.names, "shards": s["shards"],
            "num_sequences": s["num_sequences"], "documents": s["documents"], "mixed": mix,
            "tokens_per_source": {n: int(s["src_counts"][i]) for n, i in sources.ids.items()},
            "label_token_counts": {n: int(s["lab_counts"][i + 1]) for n, i in labels.ids.items()},
            "dropped_tail_tokens": s["dropped_tail_tokens"]}
        with open(os.path.join(d, "manifest.json"), "w") as f:
            json.dump(manifests[d], f, indent=1)
    return manifests


def prepare(inputs: list[str], out_dir: str, seq_len: int, tokenizer: str | None = None,
            vocab_size: int = 2048, shard_sequences: int = 512, seed: int = 0, mix: bool = True,
            workers: int | None = None) -> dict:
    """Tokenize and pack `inputs` into `out_dir`; returns the manifest.

    The documents of all inputs are shuffled together with `seed` unless `mix=False`; `workers`
    processes tokenize (default: one per core), with byte-identical output for any number.

    With `tokenizer=None` a SentencePiece model of `vocab_size` is trained on the inputs; otherwise
    the given tokenizer is used (see blade.data.tokenizer.load_tokenizer): a SentencePiece `.model` ends
    up in `out_dir/tokenizer.model`, a Hugging Face tokenizer.json or a GGUF file's tokenizer in
    `out_dir/tokenizer.json` (+ tokenizer_config.json naming its EOS).
    """
    return _prepare({out_dir: inputs}, out_dir, seq_len, tokenizer, vocab_size, shard_sequences,
                    seed, mix, workers)[out_dir]


def prepare_splits(splits: dict[str, list[str]], out_dir: str, seq_len: int,
                   vocab_size: int = 2048, tokenizer: str | None = None,
                   shard_sequences: int = 512, seed: int = 0, mix: bool = True,
                   workers: int | None = None) -> dict[str, dict]:
    """Prepare several datasets (e.g. train/target/val) with one tokenizer and shared name lists
    (`mix`, `workers`: as in `prepare`).

    Writes `out_dir/tokenizer.model` (trained on all splits' text unless `tokenizer` is given) and
    one self-contained dataset per split in `out_dir/<name>/`; returns {name: manifest}.
    """
    for name in splits:
        if not name or name != os.path.basename(name) or name.startswith("."):
            raise DataError(f"split name {name!r} must be a plain directory name like 'train'")
    dirs = {os.path.join(out_dir, name): inputs for name, inputs in splits.items()}
    manifests = _prepare(dirs, out_dir, seq_len, tokenizer, vocab_size, shard_sequences, seed, mix,
                         workers)
    return {name: manifests[d] for name, d in zip(splits, dirs)}
