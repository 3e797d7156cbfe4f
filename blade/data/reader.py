"""Deterministic, resumable reader of the shards written by `blade prepare` (see blade/data/prepare.py).

The training stream is infinite: global position p = 0, 1, 2, ... is sample `GlobalOrder.index(p)`,
and a checkpoint only needs `position`, the number of positions consumed by all ranks together.
Which rank and worker read a position is a pure function of (rank, world, worker) — see
`batch_positions` — so batches are identical across restarts, worker counts and data-parallel
splits of the same global batch.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from blade.data.shards import FIX, FORMAT, index_shard
from blade.errors import DataError, DataExhausted

_DECODE_ERRORS = (ValueError, OSError, EOFError)


def _load_manifest(path: str) -> dict:
    file = os.path.join(path, "manifest.json")
    try:
        with open(file) as f:
            manifest = json.load(f)
    except OSError:
        raise DataError(f"{file} not found: point the data path at a directory written by "
                        "`blade prepare`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file} is not valid JSON ({e}): re-run blade prepare") from None

    def bad(what: str) -> DataError:
        return DataError(f"{file} is not a {FORMAT} manifest ({what}): re-run blade prepare")

    if isinstance(manifest, dict) and manifest.get("format") == "blade-shards/1":
        raise DataError(f"{path} holds blade-shards/1 shards (written by an older blade, ~28 bytes per "
                        f"token): re-run `blade prepare` on its inputs to write the compact {FORMAT}")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad(f'"format" is not "{FORMAT}"')
    for key, kind in (("seq_len", int), ("vocab_size", int), ("tokenizer", dict), ("sources", list),
                      ("labels", list), ("shards", list)):
        if not isinstance(manifest.get(key), kind):
            raise bad(f'"{key}" is missing or not a {kind.__name__}')
    for entry in manifest["shards"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("sequences"), int)):
            raise bad(f"shard entry {entry!r} lacks a name or sequence count")
    return manifest


class ShardDataset:
    """Map-style view of a prepared dataset: `ds[i]` for i in canonical order (shards in manifest
    order, samples in shard order) -> numpy arrays tokens/sources/labels (int64, [seq_len + 1]) and
    `valid` (False only for a corrupt sample skipped with on_bad_shard="skip": all zeros).

    Shards are checked at open (headers, sizes, run codes: blade/data/shards.py). With on_bad_shard="skip"
    a bad shard is left out up front and a sample whose checksum fails is masked at read time (same
    index, so positions never shift);
    `skipped_shards` and `skipped_sequences` count both (DataStream reports the samples its
    DataLoader workers masked back into `bad_samples`).
    """

    def __init__(self, path: str, vocab_size: int | None = None, on_bad_shard: str = "error"):
        if on_bad_shard not in ("error", "skip"):
            raise DataError(f"on_bad_shard={on_bad_shard!r}: use 'error' or 'skip'")
        self.path, self.on_bad_shard = path, on_bad_shard
        self.manifest = _load_manifest(path)
        self.seq_len = self.manifest["seq_len"]
        self.vocab_size = self.manifest["vocab_size"] if vocab_size is None else vocab_size
        self.source_names, self.label_names = self.manifest["sources"], self.manifest["labels"]
        self.names = [path]  # one per stream it draws from (a MixedDataset has several)
        self.shards, self.skipped_shards, self._skipped_shard_sequences = [], [], 0
        for entry in self.manifest["shards"]:
            try:
                shard_path = os.path.join(path, entry["name"])
                self.shards.append(index_shard(shard_path, entry["sequences"], self.seq_len))
            except DataError as e:
                if on_bad_shard == "error":
                    raise
                warnings.warn(f"skipping: {e}", stacklevel=2)
                self.skipped_shards.append(entry["name"])
                self._skipped_shard_sequences += entry["sequences"]
        self.shard_sizes = [s.n for s in self.shards]
        self._ends = np.cumsum(self.shard_sizes)
        self.bad_samples: set[int] = set()  # indices masked at read time
        usable = {s.name for s in self.shards}
        ids = [[e["name"], e.get("sha256")] for e in self.manifest["shards"] if e["name"] in usable]
        blob = json.dumps([ids, self.manifest["tokenizer"].get("sha256")]).encode()
        self.fingerprint = hashlib.sha256(blob).hexdigest()

    @property
    def skipped_sequences(self) -> int:
        return self._skipped_shard_sequences + len(self.bad_samples)

    def rank_state_dict(self) -> dict:
        """The samples this rank found undecodable (each rank reads its own)."""
        return {"bad_samples": sorted(self.bad_samples)}

    def load_rank_state_dict(self, state: dict) -> None:
        self.bad_samples.update(state["bad_samples"])

    @staticmethod
    def merge_rank_states(states: list[dict], rank: int) -> dict:
        """After resharding, every rank knows every old rank's bad samples."""
        return {"bad_samples": sorted(set().union(*(s["bad_samples"] for s in states)))}

    def __len__(self) -> int:
        return int(self._ends[-1]) if self.shards else 0

    def order(self, seed: int, shuffle: bool) -> "GlobalOrder":
        return GlobalOrder(self.shard_sizes, seed, shuffle)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} sequences")
        s = int(np.searchsorted(self._ends, i, side="right"))
        k = i - int(self._ends[s]) + self.shard_sizes[s]
        shard = self.shards[s]
        try:
            arrays = shard.read(k)
        except _DECODE_ERRORS as e:
            why = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
            msg = f"shard {shard.path} sample {i} (its row {k}) is corrupt ({why})"
            if self.on_bad_shard == "error":
                raise DataError(f"{msg}: {FIX}") from None
            if i not in self.bad_samples:
                warnings.warn(f"masking: {msg}", stacklevel=2)
                self.bad_samples.add(i)
            zeros = np.zeros(self.seq_len + 1, dtype=np.int64)
            return {"tokens": zeros, "sources": zeros, "labels": zeros, "valid": False}
        top = int(arrays["tokens"].max())
        if top >= self.vocab_size:
            raise DataError(f"token id {top} >= vocab_size {self.vocab_size} in shard {shard.path} "
                            f"sample {i}: the data was tokenized with a different tokenizer; "
                            "re-run blade prepare")
        return {**arrays, "valid": True}


class GlobalOrder:
    """Global stream position -> dataset index, for an infinite sequence of epochs.

    Position p is index q = p % N of epoch e = p // N. With `shuffle`, epoch e visits the shards in
    the order default_rng([seed, e]).permutation and the samples of shard k in the order
    default_rng([seed, e, k]).permutation; otherwise canonical order. The current epoch's shard
    order is cached (per-shard permutations on first use): a lookup is a binary search over shards.
    """

    def __init__(self, ds_shard_sizes: list[int], seed: int, shuffle: bool):
        self.sizes = np.asarray(ds_shard_sizes, dtype=np.int64)
        self.n = int(self.sizes.sum())
        if self.n == 0:
            raise DataError("the dataset has no usable sequences: re-run blade prepare")
        self.starts = np.cumsum(self.sizes) - self.sizes  # canonical index of each shard's sample 0
        self.seed, self.shuffle, self.epoch = seed, shuffle, None
        self.lengths = np.array([self.n])

    def drawn(self, p: int) -> np.ndarray:
        """Positions the dataset has supplied to positions [0, p) (a mixture has one per component)."""
        return np.array([p])

    def _set_epoch(self, e: int) -> None:
        self.epoch, self.perms = e, {}
        n = len(self.sizes)
        self.order = (np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle
                      else np.arange(n))
        self.ends = np.cumsum(self.sizes[self.order])

    def index(self, p: int) -> int:
        e, q = divmod(p, self.n)
        if e != self.epoch:
            self._set_epoch(e)
        j = int(np.searchsorted(self.ends, q, side="right"))
        k = int(self.order[j])
        local = q - int(self.ends[j] - self.sizes[k])
        if self.shuffle:
            if k not in self.perms:
                self.perms[k] = np.random.default_rng([self.seed, e, k]).permutation(self.sizes[k])
            local = int(self.perms[k][local])
        return int(self.starts[k]) + local


def batch_positions(start: int, q: int, micro: int, world: int, rank: int) -> range:
    """Stream positions of `rank`'s q-th micro-batch counted from `start`.

    Micro-batch q = s * accum + m (optimizer step s, micro-step m) of rank r takes
    start + s*G + m*micro*world + r*micro + j (j < micro, G = micro*world*accum sequences per step):
    each step covers the G positions after the previous one, and a global batch does not depend on
    how it is split over ranks (1 rank x micro 4 == 2 ranks x micro 2).
    """
    first = start + q * micro * world + rank * micro
    return range(first, first + micro)


def _micro_batch(ds: ShardDataset, order: GlobalOrder, positions) -> dict[str, torch.Tensor]:
    """tokens/sources/labels LongTensor[micro, seq_len + 1], valid BoolTensor, dataset `index`, stream
    `position` (unique over epochs, the same on any world size)."""
    index = [order.index(p) for p in positions]
    samples = [ds[i] for i in index]
    batch = {k: torch.from_numpy(np.stack([s[k] for s in samples]))
             for k in ("tokens", "sources", "labels")}
    batch["valid"] = torch.tensor([s["valid"] for s in samples], dtype=torch.bool)
    batch["index"] = torch.tensor(index, dtype=torch.long)
    batch["position"] = torch.tensor(list(positions), dtype=torch.long)
    return batch


class _MicroBatches(IterableDataset):
    """This rank's micro-batches from position `start` on; DataLoader worker w of W yields those
    with q % W == w, so the DataLoader's round-robin over workers gives them back in order."""

    def __init__(self, ds, seed, shuffle, micro, world, rank, start):
        super().__init__()
        self.ds, self.seed, self.shuffle, self.start = ds, seed, shuffle, start
        self.micro, self.world, self.rank = micro, world, rank

    def __iter__(self):
        info = get_worker_info()
        w, num_workers = (info.id, info.num_workers) if info else (0, 1)
        order = self.ds.order(self.seed, self.shuffle)
        for q in itertools.count(w, num_workers):
            positions = batch_positions(self.start, q, self.micro, self.world, self.rank)
            yield _micro_batch(self.ds, order, positions)


class DataStream:
    """This rank's training batches, one optimizer step at a time, resumable from `state_dict()`.

    `position` counts the global positions the trainer consumed (G = micro*world*accum per step,
    world-size independent), not what DataLoader workers prefetched. `ds` is a ShardDataset or a
    MixedDataset (blade/data/mixture.py). With `stop_when_exhausted`, a step that would start a
    dataset's second epoch raises DataExhausted instead (on every rank alike: it depends on positions only).
    """

    def __init__(self, ds: ShardDataset, seed: int, shuffle: bool, micro: int, world: int,
                 rank: int, accum: int, num_workers: int = 0, stop_when_exhausted: bool = False):
        if micro < 1 or accum < 1 or not 0 <= rank < world or num_workers < 0:
            raise DataError(f"bad batch layout micro={micro} accum={accum} rank={rank} "
                            f"world={world} num_workers={num_workers}: need micro, accum >= 1, "
                            "0 <= rank < world, num_workers >= 0")
        self.order = ds.order(seed, shuffle)  # fails now on an empty dataset
        self.stop_when_exhausted = stop_when_exhausted
        self.ds, self.seed, self.shuffle, self.num_workers = ds, seed, shuffle, num_workers
        self.micro, self.world, self.rank, self.accum = micro, world, rank, accum
        self._position, self._batches = 0, None

    @property
    def position(self) -> int:
        return self._position

    def _start(self):
        source = _MicroBatches(self.ds, self.seed, self.shuffle, self.micro, self.world, self.rank,
                               self._position)
        if self.num_workers == 0:
            return iter(source)
        return iter(DataLoader(source, batch_size=None, num_workers=self.num_workers))

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """The `accum` micro-batches of this rank for the next optimizer step."""
        global_batch = self.micro * self.world * self.accum
        if self.stop_when_exhausted:
            over = np.flatnonzero(self.order.drawn(self._position + global_batch) > self.order.lengths)
            if len(over):
                raise DataExhausted(f"{self.ds.names[over[0]]} is used up after {self._position:,} sequences of the "
                                    "stream (data.on_exhausted=stop): the run ends here; "
                                    "data.on_exhausted=repeat starts its next epoch instead")
        if self._batches is None:
            self._batches = self._start()
        step = [next(self._batches) for _ in range(self.accum)]
        self._position += global_batch
        for batch in step:
            self.ds.bad_samples.update(batch["index"][~batch["valid"]].tolist())
        return step

    def shares(self) -> dict[str, float]:
        """The realised mixture so far: each component's share of the positions read (mixtures only)."""
        drawn = self.order.drawn(self._position)
        return {name: float(n) / max(self._position, 1) for name, n in zip(self.ds.names, drawn)}

    def state_dict(self) -> dict:
        return {"position": self._position, "epoch": self._position // len(self.ds),
                "fingerprint": self.ds.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken; refuses a state saved on different data."""
        if state.get("fingerprint", self.ds.fingerprint) != self.ds.fingerprint:
            raise DataError(f"the data in {self.ds.path} differs from the data the checkpoint was "
                            "trained on (fingerprint mismatch): resume with the original data or "
                            "start a new run")
        self.seek(int(state["position"]))

    def seek(self, position: int) -> None:
        """Continue from stream position `position` (drops prefetched batches)."""
        self._position, self._batches = position, None


def eval_batches(ds: ShardDataset, micro: int, world: int, rank: int, sequences: int = 0) -> list[dict]:
    """This rank's share of the validation set: the first `sequences` (0 = all) of `ds` in canonical
    order, each read by exactly one rank, in micro-batches of `micro`.

    The set does not depend on world size, micro-batch or accumulation: global batch q holds sequences
    [q*micro*world, (q+1)*micro*world), rank r its r-th block of `micro`. Every rank gets the same number
    of micro-batches (stop checks are collectives); rows past the end are padding with valid=False.
    """
    n = len(ds) if sequences <= 0 else min(sequences, len(ds))
    order = ds.order(seed=0, shuffle=False)
    out = []
    for q in range(-(-n // (micro * world))):
        positions = batch_positions(0, q, micro, world, rank)
        batch = _micro_batch(ds, order, [min(p, n - 1) for p in positions])
        batch["valid"] &= torch.tensor([p < n for p in positions])
        out.append(batch)
    return out
