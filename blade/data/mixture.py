"""Weighted mixtures of prepared datasets: `data.train: {dir_a: 0.8, dir_b: 0.2}` (data.target too).

The global stream is cut into blocks of BLOCK positions. Every block holds each component's fixed quota
(the weights, rounded by largest remainder), in an order drawn from default_rng([MIX_TAG, seed, block]);
position p of the mixture is the next unread position of its component's own stream (a GlobalOrder:
that dataset's shuffled epochs). So the realised shares match the weights to within one block, the
mapping is a pure function of p (a checkpoint keeps only the position: small and world-size independent),
and a component's epochs run at its own pace.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from blade.data.reader import GlobalOrder, ShardDataset
from blade.errors import DataError

BLOCK = 1024
MIX_TAG = 0x6D6978  # keeps the block schedule's random stream apart from the datasets' shuffles


def block_counts(weights: list[float]) -> np.ndarray:
    """Positions per block of each component: BLOCK * weight, rounded by largest remainder."""
    w = np.asarray(weights, dtype=np.float64)
    raw = BLOCK * w / w.sum()
    counts = np.floor(raw).astype(np.int64)
    counts[np.argsort(-(raw - counts), kind="stable")[:BLOCK - counts.sum()]] += 1
    return counts


class MixtureOrder:
    """Global position -> index into the concatenated components (see the module docstring)."""

    def __init__(self, counts: np.ndarray, orders: list[GlobalOrder], offsets: np.ndarray, seed: int):
        self.counts, self.orders, self.offsets, self.seed = counts, orders, offsets, seed
        self.lengths = np.array([o.n for o in orders], dtype=np.int64)
        self.block = None

    def _set_block(self, b: int) -> None:
        if b == self.block:
            return
        schedule = np.repeat(np.arange(len(self.counts)), self.counts)
        self.perm = np.random.default_rng([MIX_TAG, self.seed, b]).permutation(schedule)
        self.rank = np.empty(BLOCK, dtype=np.int64)  # earlier positions of the same component in the block
        for j in range(len(self.counts)):
            self.rank[self.perm == j] = np.arange(self.counts[j])
        self.block = b

    def index(self, p: int) -> int:
        b, t = divmod(p, BLOCK)
        self._set_block(b)
        j = int(self.perm[t])
        q = b * int(self.counts[j]) + int(self.rank[t])
        return int(self.offsets[j]) + self.orders[j].index(q)

    def drawn(self, p: int) -> np.ndarray:
        """Positions each component has supplied to the mixture's positions [0, p)."""
        b, t = divmod(p, BLOCK)
        out = b * self.counts
        if t:
            self._set_block(b)
            out = out + np.bincount(self.perm[:t], minlength=len(self.counts))
        return out


class MixedDataset:
    """Several prepared datasets seen as one (the ShardDataset interface): index offsets[j] + k is sample
    k of component j; source and label ids are renumbered into merged name lists."""

    def __init__(self, weights: dict[str, float], vocab_size: int | None = None, on_bad_shard: str = "error"):
        self.parts = [ShardDataset(path, vocab_size, on_bad_shard) for path in weights]
        self.weights = [float(w) for w in weights.values()]
        self.path = ", ".join(weights)
        self.names = [os.path.basename(os.path.normpath(p)) for p in weights]
        if len(set(self.names)) < len(self.names):
            self.names = list(weights)
        first = self.parts[0]
        for part in self.parts[1:]:
            if (part.seq_len, part.manifest["tokenizer"].get("sha256")) != \
                    (first.seq_len, first.manifest["tokenizer"].get("sha256")):
                raise DataError(f"a mixture of {first.path} and {part.path}, which differ in seq_len or "
                                "tokenizer: prepare every component with the same tokenizer and --seq-len")
        self.seq_len, self.vocab_size, self.manifest = first.seq_len, first.vocab_size, first.manifest
        self.source_names = list(dict.fromkeys(n for p in self.parts for n in p.source_names))
        self.label_names = list(dict.fromkeys(n for p in self.parts for n in p.label_names))
        self._sources = [np.array([self.source_names.index(n) for n in p.source_names] or [0], np.int64)
                         for p in self.parts]
        self._labels = [np.array([0] + [1 + self.label_names.index(n) for n in p.label_names], np.int64)
                        for p in self.parts]
        self.ends = np.cumsum([len(p) for p in self.parts])
        self.offsets = self.ends - [len(p) for p in self.parts]
        self.bad_samples: set[int] = set()
        blob = json.dumps([[p.fingerprint, w] for p, w in zip(self.parts, self.weights)]).encode()
        self.fingerprint = hashlib.sha256(blob).hexdigest()

    @property
    def skipped_sequences(self) -> int:
        return sum(p._skipped_shard_sequences for p in self.parts) + len(self.bad_samples)

    def rank_state_dict(self) -> dict:
        return {"bad_samples": sorted(self.bad_samples)}

    def load_rank_state_dict(self, state: dict) -> None:
        self.bad_samples.update(state["bad_samples"])

    merge_rank_states = staticmethod(ShardDataset.merge_rank_states)

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, i: int) -> dict:
        j = int(np.searchsorted(self.ends, i, side="right"))
        item = self.parts[j][i - int(self.offsets[j])]
        if not item["valid"]:
            self.bad_samples.add(i)
            return item
        return {**item, "sources": self._sources[j][item["sources"]], "labels": self._labels[j][item["labels"]]}

    def order(self, seed: int, shuffle: bool) -> MixtureOrder:
        orders = [p.order(seed, shuffle) for p in self.parts]
        return MixtureOrder(block_counts(self.weights), orders, self.offsets, seed)


def open_dataset(spec, vocab_size: int | None = None, on_bad_shard: str = "error"):
    """A directory -> ShardDataset; {directory: weight, ...} -> MixedDataset."""
    if isinstance(spec, dict):
        return MixedDataset(spec, vocab_size, on_bad_shard)
    return ShardDataset(spec, vocab_size, on_bad_shard)
