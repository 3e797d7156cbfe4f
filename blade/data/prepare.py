"""`blade prepare`: text (JSONL / .txt) -> tokenized, packed webdataset shards + manifest.json.

Every document is tokenized and followed by EOS; the documents are concatenated into one stream and
cut into samples of seq_len + 1 tokens with stride seq_len, so consecutive samples share one token
and every stream token after the first is a prediction target exactly once. The final partial
sample is dropped (`dropped_tail_tokens`). Each token also carries its document's source id and a
label id (0 = unlabelled, else 1 + index into the manifest's `labels`).

Shard layout (one webdataset sample per sequence, key = global sample index "%09d"):
    shard-000000.tar: 000000000.tokens.npy (int32) .sources.npy (int16) .labels.npy (uint8), ...
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds

from blade.data.tokenizer import (
    HF_TOKENIZER_CONFIG,
    HF_TOKENIZER_FILE,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)
from blade.errors import DataError

FORMAT = "blade-shards/1"
TOKENIZER_FILE = "tokenizer.model"
MAX_SOURCES, MAX_LABELS = 1 << 15, 255  # ids stored as int16 / uint8 (label 0 = unlabelled)


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


def read_documents(path: str) -> Iterator[Document]:
    """Documents of one input: a JSONL file (one object per line) or a .txt file (one document)."""
    _check_input(path)
    stem, found = Path(path).stem, 0
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".txt"):
                docs = [Document(f.read(), stem, [])]
            else:
                docs = (_jsonl_document(line, f"{path}:{lineno}", stem)
                        for lineno, line in enumerate(f, 1) if line.strip())
            for doc in docs:
                if doc.text:
                    found += 1
                    yield doc
    except UnicodeDecodeError:
        raise DataError(f"input {path} is not UTF-8 text: re-encode it as UTF-8") from None
    if not found:
        raise DataError(f"input {path} holds no documents with text: remove it or fill it")


def iter_documents(inputs: Iterable[str]) -> Iterator[Document]:
    return itertools.chain.from_iterable(read_documents(p) for p in inputs)


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


def _tokenize(doc: Document, tok: Tokenizer, sources: _Names, labels: _Names):
    """Token ids + EOS, with per-token source and label ids. Later spans win where spans overlap."""
    ids, spans = tok.encode_with_offsets(doc.text)
    begins = np.array([b for b, _ in spans], dtype=np.int64)
    ends = np.array([e for _, e in spans], dtype=np.int64)
    lab = np.zeros(len(ids) + 1, dtype=np.uint8)
    for start, end, name in doc.labels:  # a token is labelled if any of its characters is inside
        lab[:-1][(begins < end) & (ends > start)] = 1 + labels.id(name)
    src = np.full(len(ids) + 1, sources.id(doc.source), dtype=np.int16)
    return np.array(ids + [tok.eos_id], dtype=np.int32), src, lab


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _ShardWriter:
    """Writes samples into shard-%06d.tar files of `per_shard` samples each (reproducible bytes)."""

    def __init__(self, out_dir: str, per_shard: int):
        self.out_dir, self.per_shard = out_dir, per_shard
        self.count, self.shards, self.writer = 0, [], None

    def add(self, tokens, sources, labels) -> None:
        if self.count % self.per_shard == 0:
            self._finish()
            name = f"shard-{len(self.shards):06d}.tar"
            self.shards.append({"name": name})
            self.writer = wds.TarWriter(os.path.join(self.out_dir, name), mtime=0)
        self.writer.write({"__key__": f"{self.count:09d}", "tokens.npy": tokens,
                           "sources.npy": sources, "labels.npy": labels})
        self.count += 1

    def _finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            shard = self.shards[-1]
            path = os.path.join(self.out_dir, shard["name"])
            sequences = self.count - (len(self.shards) - 1) * self.per_shard
            shard.update(sequences=sequences, sha256=sha256_file(path), bytes=os.path.getsize(path))
            self.writer = None

    def close(self) -> list[dict]:
        self._finish()
        return self.shards


def _write_split(docs: Iterable[Document], out_dir: str, seq_len: int, tok: Tokenizer,
                 sources: _Names, labels: _Names, shard_sequences: int) -> dict:
    """Pack one split into shards; returns the manifest fields that depend on this split alone."""
    writer = _ShardWriter(out_dir, shard_sequences)
    buf = [np.zeros(0, np.int32), np.zeros(0, np.int16), np.zeros(0, np.uint8)]
    src_counts, lab_counts = np.zeros(MAX_SOURCES, np.int64), np.zeros(MAX_LABELS + 1, np.int64)

    def count(n: int) -> None:  # tokens leaving the buffer are part of the kept stream
        src_counts[:] += np.bincount(buf[1][:n], minlength=src_counts.size)
        lab_counts[:] += np.bincount(buf[2][:n], minlength=lab_counts.size)

    for doc in docs:
        buf = [np.concatenate([b, x]) for b, x in zip(buf, _tokenize(doc, tok, sources, labels))]
        n = (len(buf[0]) - 1) // seq_len
        for i in range(n):
            writer.add(*(b[i * seq_len:i * seq_len + seq_len + 1] for b in buf))
        count(n * seq_len)
        buf = [b[n * seq_len:] for b in buf]
    shards = writer.close()
    if not writer.count:
        raise DataError(f"the inputs for {out_dir} hold only {len(buf[0])} tokens, fewer than one "
                        f"sample of seq_len + 1 = {seq_len + 1}: add text or lower seq_len")
    count(1)  # the last sample's final token
    return {"shards": shards, "num_sequences": writer.count, "src_counts": src_counts,
            "lab_counts": lab_counts, "dropped_tail_tokens": len(buf[0]) - 1}


def _save_tokenizer(tok, out_dir: str) -> None:
    """Write `tok` into `out_dir` and remove the other kind's files left by an earlier run."""
    stale = ((HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG) if tok.file_name == TOKENIZER_FILE
             else (TOKENIZER_FILE,))
    for name in stale:
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    tok.save(out_dir)


def _prepare(dirs: dict[str, list[str]], tok_dir: str, seq_len: int, tokenizer: str | None,
             vocab_size: int, shard_sequences: int, seed: int) -> dict[str, dict]:
    if seq_len < 2:
        raise DataError(f"seq_len {seq_len} is too small: use seq_len >= 2")
    if shard_sequences < 1:
        raise DataError(f"shard_sequences {shard_sequences} must be >= 1")
    for d, inputs in dirs.items():
        if not inputs:
            raise DataError(f"no input files given for {d}: pass .jsonl or .txt files")
        for p in inputs:
            _check_input(p)
    os.makedirs(tok_dir, exist_ok=True)
    if tokenizer is None:
        tok_path = os.path.join(tok_dir, TOKENIZER_FILE)
        all_text = (doc.text for inputs in dirs.values() for doc in iter_documents(inputs))
        train_sentencepiece(all_text, vocab_size, tok_path, seed=seed)
        tok = Tokenizer(tok_path)
    else:  # SentencePiece .model, HF tokenizer.json or .gguf: saved as tokenizer.model / .json
        tok = load_tokenizer(tokenizer)
        _save_tokenizer(tok, tok_dir)
    sources, labels = _Names("source", MAX_SOURCES), _Names("label", MAX_LABELS)
    splits = {}
    for d, inputs in dirs.items():
        os.makedirs(d, exist_ok=True)
        for pattern in ("manifest.json", "shard-*.tar"):  # outputs of an earlier run
            for stale in glob.glob(os.path.join(d, pattern)):
                os.remove(stale)
        if os.path.abspath(d) != os.path.abspath(tok_dir):
            _save_tokenizer(tok, d)
        splits[d] = _write_split(iter_documents(inputs), d, seq_len, tok, sources, labels,
                                 shard_sequences)
    manifests = {}
    for d, s in splits.items():  # written last, with the name lists complete across all splits
        manifests[d] = {
            "format": FORMAT, "seq_len": seq_len, "vocab_size": tok.vocab_size,
            "tokenizer": {"file": tok.file_name, "sha256": tok.fingerprint},
            "sources": sources.names, "labels": labels.names, "shards": s["shards"],
            "num_sequences": s["num_sequences"],
            "tokens_per_source": {n: int(s["src_counts"][i]) for n, i in sources.ids.items()},
            "label_token_counts": {n: int(s["lab_counts"][i + 1]) for n, i in labels.ids.items()},
            "dropped_tail_tokens": s["dropped_tail_tokens"]}
        with open(os.path.join(d, "manifest.json"), "w") as f:
            json.dump(manifests[d], f, indent=1)
    return manifests


def prepare(inputs: list[str], out_dir: str, seq_len: int, tokenizer: str | None = None,
            vocab_size: int = 2048, shard_sequences: int = 512, seed: int = 0) -> dict:
    """Tokenize and pack `inputs` into `out_dir`; returns the manifest.

    With `tokenizer=None` a SentencePiece model of `vocab_size` is trained on the inputs; otherwise
    the given tokenizer is used (see blade.data.tokenizer.load_tokenizer): a SentencePiece `.model` ends
    up in `out_dir/tokenizer.model`, a Hugging Face tokenizer.json or a GGUF file's tokenizer in
    `out_dir/tokenizer.json` (+ tokenizer_config.json naming its EOS).
    """
    return _prepare({out_dir: inputs}, out_dir, seq_len, tokenizer, vocab_size, shard_sequences,
                    seed)[out_dir]


def prepare_splits(splits: dict[str, list[str]], out_dir: str, seq_len: int,
                   vocab_size: int = 2048, tokenizer: str | None = None,
                   shard_sequences: int = 512, seed: int = 0) -> dict[str, dict]:
    """Prepare several datasets (e.g. train/target/val) with one tokenizer and shared name lists.

    Writes `out_dir/tokenizer.model` (trained on all splits' text unless `tokenizer` is given) and
    one self-contained dataset per split in `out_dir/<name>/`; returns {name: manifest}.
    """
    for name in splits:
        if not name or name != os.path.basename(name) or name.startswith("."):
            raise DataError(f"split name {name!r} must be a plain directory name like 'train'")
    dirs = {os.path.join(out_dir, name): inputs for name, inputs in splits.items()}
    manifests = _prepare(dirs, out_dir, seq_len, tokenizer, vocab_size, shard_sequences, seed)
    return {name: manifests[d] for name, d in zip(splits, dirs)}
