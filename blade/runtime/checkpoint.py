"""Complete, atomic, resumable checkpoints (layout and contract: docs/checkpointing.md).

    <run.dir>/checkpoints/step_000123/     123 = proxy steps completed (the resumed run starts at step 123)
        proxy/        DeepSpeed save_checkpoint of the proxy: weights, fp32 master, AdamW, LR scheduler
        reference/    the same for the reference engine (rho1 / blade)
        rank_00000.pt per-rank state: RNG states (python, numpy, torch, cuda), the components' rank states
        state.json    everything global: the components' states (counters, data positions, reference
                      cycle, ...), the run's identity (world size, model shape, fingerprints), the config
        COMPLETE      written last, by rank 0, after a barrier: only a directory holding it is a checkpoint
    <run.dir>/checkpoints/latest           the name of the newest complete checkpoint (atomic replace)

`resume=auto` takes the highest-numbered directory that holds COMPLETE (a crash between COMPLETE and
`latest` loses nothing). Files we read ourselves go through torch.load(weights_only=True) or JSON.
What goes into state.json and the rank files is blade/train/state.py; resuming on another world size
is blade/runtime/reshard.py; `blade export` is blade/interop/export.py.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time

import numpy as np
import torch

from blade.errors import CheckpointError
from blade.runtime import faults, zero
from blade.runtime.dist import all_reduce
from blade.runtime.safe_load import load_deepspeed_file, refused_global

FORMAT = "blade-checkpoint-2"    # components' state under "components" (blade/train/state.py)
FORMAT_1 = "blade-checkpoint-1"  # the first format (flat keys); still read
COMPLETE = "COMPLETE"
LATEST = "latest"
STATE = "state.json"
_NAME = re.compile(r"step_(\d{6,})")


# ----------------------------------------------------------------------------- layout


def root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_name(completed: int) -> str:
    return f"step_{completed:06d}"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE)) and os.path.isfile(os.path.join(path, STATE))


def list_checkpoints(ckpt_root: str) -> list[tuple[int, str, bool]]:
    """(completed steps, path, complete) of every step_* directory, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        m = _NAME.fullmatch(name)
        path = os.path.join(ckpt_root, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path, is_complete(path)))
    return sorted(found)


def newest_complete(ckpt_root: str) -> str | None:
    complete = [path for _, path, ok in list_checkpoints(ckpt_root) if ok]
    return complete[-1] if complete else None


def find_checkpoint(path: str) -> str:
    """A checkpoint directory from PATH: a step_* directory, a checkpoints/ directory or a run directory
    (their newest complete checkpoint)."""
    if os.path.isfile(os.path.join(path, STATE)) or _NAME.fullmatch(os.path.basename(os.path.normpath(path))):
        if not is_complete(path):
            raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker: its save was "
                                  "interrupted); use an earlier one or checkpoint.resume=auto")
        return path
    for candidate in (path, root(path)):
        if list_checkpoints(candidate):
            newest = newest_complete(candidate)
            if newest is None:
                raise CheckpointError(f"no complete checkpoint in {candidate} (every save there was "
                                      "interrupted)")
            return newest
    raise CheckpointError(f"no checkpoint at {path}: give a step_* directory written by blade train, "
                          "a run directory, or checkpoint.resume=auto")


def _remove(path: str) -> None:
    """Rename first (atomic), so that a half-deleted directory never looks like a checkpoint."""
    doomed = f"{path}.deleting-{os.getpid()}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(os.path.dirname(path) or ".")


def read_state(path: str) -> dict:
    file = os.path.join(path, STATE)
    try:
        with open(file) as f:
            state = json.load(f)
    except OSError as e:
        raise CheckpointError(f"cannot read {file} ({e.strerror}): not a blade checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is corrupt ({e}): use an earlier checkpoint") from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, FORMAT_1):
        raise CheckpointError(f"{file} is not a blade checkpoint state ({FORMAT} or {FORMAT_1})")
    return state


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _plain(x):
    return x.item() if hasattr(x, "item") else x


# ----------------------------------------------------------------------------- save


def save(ckpt_root: str, completed: int, engines: dict, state: dict, rank_state: dict, rank: int,
         keep_last_n: int) -> str:
    """Write checkpoint `completed` (a collective: every rank calls it). Returns its path.

    A write that fails on any rank (a full disk, a read-only directory) fails the save on every rank
    with one CheckpointError: the torn directory has no COMPLETE marker, so the previous complete
    checkpoint stays the resume point. (A failure inside DeepSpeed's own save, between its internal
    collectives, surfaces on the other ranks as a collective timeout: dist.timeout_s bounds it.)"""
    path = os.path.join(ckpt_root, step_name(completed))

    def make_room():
        os.makedirs(ckpt_root, exist_ok=True)
        if os.path.exists(path):  # a torn save of this step, or a superseded one: never mix the two
            _remove(path)
        os.makedirs(path)

    def save_engine(name, engine):
        def work():
            if name == next(iter(engines)):
                faults.point("save", completed, "begin")
            saver = engine.checkpoint_engine
            saver.save_error = None
            with zero.weights_only_state(engine):  # a released reference: its weights alone
                engine.save_checkpoint(path, tag=name, save_latest=False)
            if saver.save_error is not None:  # held back so that this rank reached DeepSpeed's barrier
                raise saver.save_error
            faults.point("save", completed, f"after_{name}")
        return work

    def write_state():
        torch.save(rank_state, os.path.join(path, f"rank_{rank:05d}.pt"))
        if rank == 0:
            with open(os.path.join(path, STATE), "w") as f:
                json.dump(state, f, indent=1)
        faults.point("save", completed, "before_barrier")

    def commit():
        for dirpath, _, files in os.walk(path):
            for name in files:
                _fsync(os.path.join(dirpath, name))
        faults.point("save", completed, "before_complete")
        write_atomic(os.path.join(path, COMPLETE), f"{completed}\n")
        faults.point("save", completed, "before_latest")
        write_atomic(os.path.join(ckpt_root, LATEST), step_name(completed) + "\n")

    _agreed(make_room if rank == 0 else None, path, ckpt_root)
    for name, engine in engines.items():  # DeepSpeed's save has collectives: agree after each engine
        _agreed(save_engine(name, engine), path, ckpt_root)
    _agreed(write_state, path, ckpt_root)  # every rank's files are written
    _agreed(commit if rank == 0 else None, path, ckpt_root)
    if rank == 0:
        try:
            prune(ckpt_root, keep_last_n, keep=path)
        except OSError as e:  # the checkpoint is complete: a failed clean-up must not stop the run
            print(f"blade: warning: cannot delete old checkpoints in {ckpt_root} ({e.strerror})", flush=True)
    return path


def _agreed(work, path: str, ckpt_root: str) -> None:
    """Run `work` (None: nothing on this rank), then agree with every rank (one all-reduce, which is
    also the barrier) whether it failed; if it failed anywhere, fail everywhere. (torch.save reports
    a full disk as a RuntimeError, os calls as an OSError.)"""
    error = None
    if work is not None:
        try:
            work()
        except Exception as e:  # noqa: BLE001 - any failure to write: agreed, then one line
            error = e
    if all_reduce(torch.tensor([float(error is not None)])).item():
        if isinstance(error, OSError) and error.strerror:
            what = f"{error.strerror} ({errno.errorcode.get(error.errno, error.errno)})"
        else:
            what = f"{type(error).__name__}: {str(error)[:120]}" if error else "it failed on another rank"
        previous = newest_complete(ckpt_root)
        raise CheckpointError(f"cannot write checkpoint {path}: {what}; the resume point stays "
                              f"{previous or 'the start of the run'}: free disk space or fix the directory's "
                              "permissions, then rerun with checkpoint.resume=auto")


def prune(ckpt_root: str, keep_last_n: int, keep: str) -> list[str]:
    """Delete all but the newest `keep_last_n` complete checkpoints and torn saves older than `keep`
    (never `keep` itself)."""
    found = list_checkpoints(ckpt_root)
    complete = [p for _, p, ok in found if ok]
    doomed = [p for p in complete[:-keep_last_n]]
    kept_step = next((c for c, p, _ in found if p == keep), None)
    doomed += [p for c, p, ok in found if not ok and kept_step is not None and c < kept_step]
    doomed = [p for p in doomed if os.path.normpath(p) != os.path.normpath(keep)]
    for p in doomed:
        _remove(p)
    return doomed


def supersede_later(ckpt_root: str, completed: int) -> list[str]:
    """Resuming from an earlier checkpoint abandons the later ones: move them to checkpoints/superseded/
    so that auto-resume and retention only see the live run (torn saves are deleted)."""
    moved = []
    for c, path, ok in list_checkpoints(ckpt_root):
        if c <= completed:
            continue
        if not ok:
            _remove(path)
            continue
        dest_root = os.path.join(ckpt_root, "superseded")
        os.makedirs(dest_root, exist_ok=True)
        dest = os.path.join(dest_root, f"{os.path.basename(path)}-{int(time.time())}")
        os.rename(path, dest)
        moved.append(dest)
    return moved


# ----------------------------------------------------------------------------- load


def check_files(path: str, engines: dict, rank: int) -> str | None:
    """What is wrong with the files this rank will read (None if nothing): a missing file, or a
    DeepSpeed file that holds more than tensors. Checked on every rank before any collective load,
    so that a damaged or poisoned checkpoint fails everywhere instead of hanging."""
    need = [os.path.join(path, f"rank_{rank:05d}.pt")] + [os.path.join(path, name) for name in engines]
    for file in need:
        if not os.path.exists(file):
            return f"{file} is missing"
    for name in engines:
        folder = os.path.join(path, name)
        mine = [f for f in os.listdir(folder) if f"rank_{rank}_" in f or f.startswith("mp_rank")]
        if not mine:
            return f"{os.path.join(folder, f'*rank_{rank}_*')} is missing"
        for f in sorted(f for f in mine if f.endswith(".pt")):
            refused = refused_global(os.path.join(folder, f))
            if refused and refused.startswith("holds"):
                return (f"{os.path.join(folder, f)} {refused} (only tensors and DeepSpeed's bookkeeping "
                        "classes are loaded; a checkpoint is data and may not run code)")
            if refused:
                return f"{os.path.join(folder, f)} {refused}"
    return None


def load(path: str, engines: dict, rank: int) -> dict:
    """Load every engine and return this rank's state (after the caller checked compatibility)."""
    problem = check_files(path, engines, rank)
    bad = all_reduce(torch.tensor([float(problem is not None)]))
    if bad.item():
        if problem and " holds " in problem:
            raise CheckpointError(f"refused checkpoint {path}: {problem}")
        where = f": {problem}" if problem else " on another rank"
        raise CheckpointError(f"checkpoint {path} is damaged{where}; use an earlier checkpoint")
    for name, engine in engines.items():
        error = None
        try:
            zero.restore_training_state(engine)  # DeepSpeed loads into the master (released again by Engines)
            loaded, _ = engine.load_checkpoint(path, tag=name, load_optimizer_states=True,
                                               load_lr_scheduler_states=engine.lr_scheduler is not None)
            if loaded is None:
                error = (f"cannot load the {name} engine from {path}: DeepSpeed found no checkpoint files")
        except CheckpointError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - unpickling and DeepSpeed raise many kinds on bad files
            error = f"cannot load the {name} engine from {path} ({type(e).__name__}: {str(e)[:200]})"
        if all_reduce(torch.tensor([float(error is not None)])).item():  # every rank fails alike
            raise CheckpointError(error or f"cannot load the {name} engine from {path}: it failed on "
                                  "another rank; use an earlier checkpoint")
    file = os.path.join(path, f"rank_{rank:05d}.pt")
    mine, error = None, None
    try:
        mine = load_deepspeed_file(file)  # the same safe unpickling as DeepSpeed's files
    except CheckpointError as e:
        error = str(e)
    if all_reduce(torch.tensor([float(error is not None)])).item():  # every rank fails alike
        raise CheckpointError(error or f"checkpoint {path}: a rank file is damaged or refused on another rank; "
                              "use an earlier checkpoint")
    return mine


# ----------------------------------------------------------------------------- metrics


def truncate_records(file: str, completed: int, eval_pending: int | None = None) -> int:
    """Drop records of steps >= `completed`, end-of-run summaries, a torn last line, and the
    evaluation the resumed run redoes first (`eval_pending`), so that a resumed run appends without
    duplicates. Returns the number of records dropped."""
    if not os.path.isfile(file):
        return 0
    kept, dropped = [], 0
    with open(file) as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = (record.get("step", -1) < completed and record.get("kind") != "summary"
                        and not (record.get("kind") == "eval" and record.get("step") == eval_pending))
            except (json.JSONDecodeError, AttributeError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            elif line.strip():
                dropped += 1
    if dropped:
        write_atomic(file, "".join(kept))
    return dropped
