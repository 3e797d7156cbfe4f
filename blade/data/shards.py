"""The on-disk shard format `blade-shards/2`: compact, checksummed, one tar member per array.

A shard is a tar (reproducible bytes: mtime 0) of four .npy members for its n sequences of L + 1 tokens:

    tokens.npy   uint16 [n, L + 1] (uint32 when the vocabulary exceeds 65,536 ids)
    sources.npy  uint32 [2, runs]: run-length code of the source id of every token (row-major over
                 tokens.npy): row 0 the flat position where a run starts (the first is 0), row 1 its id
    labels.npy   uint32 [2, runs]: the same for the label ids (0 = unlabelled)
    crc32.npy    uint32 [n]: zlib.crc32 of each sequence's token bytes

About 2 (L + 1) / L bytes per token plus the runs; the v1 format (one tar member per array per sequence)
took ~28. A sequence is read with one ranged read of its row; its checksum finds a corrupt row.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np
import webdataset as wds

from blade.errors import DataError

FORMAT = "blade-shards/2"
MEMBERS = ("tokens.npy", "sources.npy", "labels.npy", "crc32.npy")
MAX_SOURCES, MAX_LABELS = 1 << 15, 255  # label 0 = unlabelled
KEY = "shard"  # every member is named shard.<member>
FIX = "re-run blade prepare, or set data.on_bad_shard=skip to train without it"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def run_length(ids: np.ndarray) -> np.ndarray:
    """uint32 [2, runs]: start positions and values of the runs of equal ids in the flat `ids`."""
    flat = ids.reshape(-1)
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    return np.stack([starts, flat[starts]]).astype(np.uint32)


def expand_runs(runs: np.ndarray, begin: int, end: int) -> np.ndarray:
    """int64 ids of flat positions [begin, end) from a run-length code."""
    pos = np.arange(begin, end)
    return runs[1][np.searchsorted(runs[0], pos, side="right") - 1].astype(np.int64)


def write_shard(path: str, tokens: np.ndarray, sources: np.ndarray, labels: np.ndarray) -> None:
    """Write n sequences (tokens [n, L + 1] already in token_dtype; ids of the same shape)."""
    crc = np.array([zlib.crc32(row.tobytes()) for row in tokens], dtype=np.uint32)
    with wds.TarWriter(path, mtime=0) as writer:
        writer.write({"__key__": KEY, "tokens.npy": tokens, "sources.npy": run_length(sources),
                      "labels.npy": run_length(labels), "crc32.npy": crc})


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardPacker:
    """Cuts the document stream into samples of seq_len + 1 tokens (stride seq_len) and writes them into
    shard-%06d.tar files of `per_shard` samples; counts the tokens of the kept stream per source/label."""

    def __init__(self, out_dir: str, seq_len: int, per_shard: int, dtype: np.dtype):
        self.out_dir, self.seq_len, self.per_shard, self.dtype = out_dir, seq_len, per_shard, dtype
        self.buf = [np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.uint8)]
        self.rows, self.shards, self.count = [], [], 0
        self.src_counts, self.lab_counts = np.zeros(MAX_SOURCES, np.int64), np.zeros(MAX_LABELS + 1, np.int64)

    def _count(self, n: int) -> None:  # tokens leaving the buffer are part of the kept stream
        self.src_counts += np.bincount(self.buf[1][:n], minlength=self.src_counts.size)
        self.lab_counts += np.bincount(self.buf[2][:n], minlength=self.lab_counts.size)

    def add(self, tokens: np.ndarray, source: int, labels: np.ndarray) -> None:
        doc = (tokens, np.full(len(tokens), source, np.int32), labels)
        self.buf = [np.concatenate([b, x]) for b, x in zip(self.buf, doc)]
        L = self.seq_len
        n = (len(self.buf[0]) - 1) // L
        for i in range(n):
            self.rows.append([b[i * L:i * L + L + 1] for b in self.buf])
            if len(self.rows) == self.per_shard:
                self._flush()
        self._count(n * L)
        self.buf = [b[n * L:] for b in self.buf]

    def _flush(self) -> None:
        if not self.rows:
            return
        name = f"shard-{len(self.shards):06d}.tar"
        path = os.path.join(self.out_dir, name)
        tokens, sources, labels = (np.stack(parts) for parts in zip(*self.rows))
        write_shard(path, tokens.astype(self.dtype), sources, labels)
        self.shards.append({"name": name, "sequences": len(self.rows), "sha256": sha256_file(path),
                            "bytes": os.path.getsize(path)})
        self.count += len(self.rows)
        self.rows = []

    def close(self) -> dict:
        """The manifest fields that depend on this split alone."""
        self._flush()
        if not self.count:
            raise DataError(f"the inputs for {self.out_dir} hold only {len(self.buf[0])} tokens, fewer than "
                            f"one sample of seq_len + 1 = {self.seq_len + 1}: add text or lower seq_len")
        self._count(1)  # the last sample's final token
        return {"shards": self.shards, "num_sequences": self.count, "src_counts": self.src_counts,
                "lab_counts": self.lab_counts, "dropped_tail_tokens": len(self.buf[0]) - 1}


@dataclass
class Shard:
    """An indexed shard: where each row of tokens.npy starts, and the small arrays held in memory."""
    name: str
    path: str
    n: int
    row_bytes: int
    dtype: np.dtype
    data_offset: int     # file offset of tokens.npy's row 0
    sources: np.ndarray  # run-length codes, uint32 [2, runs]
    labels: np.ndarray
    crc: np.ndarray      # uint32 [n]

    def read(self, k: int) -> dict:
        """Sequence k: int64 tokens/sources/labels [L + 1]; ValueError/OSError if the row is corrupt."""
        with open(self.path, "rb") as f:  # a fresh handle: safe in forked DataLoader workers
            f.seek(self.data_offset + k * self.row_bytes)
            blob = f.read(self.row_bytes)
        if len(blob) != self.row_bytes:
            raise ValueError(f"the file ends inside the sequence ({len(blob)} of {self.row_bytes} bytes)")
        if zlib.crc32(blob) != int(self.crc[k]):
            raise ValueError("checksum mismatch")
        width = self.row_bytes // self.dtype.itemsize
        span = (k * width, (k + 1) * width)
        return {"tokens": np.frombuffer(blob, self.dtype).astype(np.int64),
                "sources": expand_runs(self.sources, *span), "labels": expand_runs(self.labels, *span)}


def _check_tar(path: str) -> dict[str, tarfile.TarInfo]:
    """The shard's members by name, after checking the file is a complete, uncorrupted tar."""
    if not os.path.isfile(path):
        raise DataError(f"shard {path} is missing: {FIX}")
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"shard {path} is empty (0 bytes): {FIX}")
    try:
        with tarfile.open(path, "r:") as tf:
            entries, end = tf.getmembers(), tf.offset
    except tarfile.TarError as e:
        raise DataError(f"shard {path} is truncated or not a tar ({e}): {FIX}") from None
    with open(path, "rb") as f:  # tarfile stops silently at a bad header: check the end marker
        f.seek(end)
        marker = f.read(2 * tarfile.BLOCKSIZE)
    if any(m.offset_data + m.size > size for m in entries) or len(marker) < 2 * tarfile.BLOCKSIZE:
        raise DataError(f"shard {path} is truncated (it ends at byte {size}): {FIX}")
    if any(marker):
        raise DataError(f"shard {path} has a corrupt tar header at byte {end}: {FIX}")
    members = {m.name: m for m in entries}
    want = [f"{KEY}.{m}" for m in MEMBERS]
    if sorted(members) != sorted(want):
        raise DataError(f"shard {path} holds {', '.join(sorted(members)) or 'nothing'}, not "
                        f"{', '.join(want)}: {FIX}")
    return members


def _small_array(f, member: tarfile.TarInfo) -> np.ndarray:
    f.seek(member.offset_data)
    return np.lib.format.read_array(io.BytesIO(f.read(member.size)), allow_pickle=False)


def index_shard(path: str, expected: int, seq_len: int) -> Shard:
    """Check a shard against the manifest (sizes, headers, run codes) without reading its tokens."""
    members = _check_tar(path)
    n_flat = expected * (seq_len + 1)
    try:
        with open(path, "rb") as f:
            tok = members[f"{KEY}.tokens.npy"]
            f.seek(tok.offset_data)
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"npy version {version}")
            shape, fortran, dtype = read_header(f)
            data_offset = f.tell()
            runs = [_small_array(f, members[f"{KEY}.{m}"]) for m in ("sources.npy", "labels.npy")]
            crc = _small_array(f, members[f"{KEY}.crc32.npy"])
    except ValueError as e:
        raise DataError(f"shard {path} has a corrupt array header ({e}): {FIX}") from None
    if shape[:1] != (expected,):
        raise DataError(f"shard {path} holds {shape[0] if shape else 0} samples but manifest.json says "
                        f"{expected}: {FIX}")
    problem = None
    if shape != (expected, seq_len + 1) or fortran or dtype not in (np.dtype("<u2"), np.dtype("<u4")):
        problem = f"tokens.npy is {dtype} {list(shape)}, not uint16/uint32 [{expected}, {seq_len + 1}]"
    elif tok.offset_data + tok.size != data_offset + n_flat * dtype.itemsize:
        problem = "tokens.npy's size does not match its header"
    elif crc.shape != (expected,) or crc.dtype != np.uint32:
        problem = f"crc32.npy is {crc.dtype} {list(crc.shape)}, not uint32 [{expected}]"
    for name, r, limit in (("sources", runs[0], MAX_SOURCES), ("labels", runs[1], MAX_LABELS + 1)):
        if problem is None and not (r.dtype == np.uint32 and r.ndim == 2 and r.shape[0] == 2 and r.shape[1]
                                    and r[0, 0] == 0 and (np.diff(r[0].astype(np.int64)) > 0).all()
                                    and int(r[0, -1]) < n_flat and int(r[1].max()) < limit):
            problem = f"{name}.npy is not a valid run-length code"
    if problem:
        raise DataError(f"shard {path}: {problem}: {FIX}")
    return Shard(os.path.basename(path), path, expected, (seq_len + 1) * dtype.itemsize, dtype, data_offset,
                 runs[0], runs[1], crc)
