"""Loading checkpoint files without trusting them: a checkpoint is data and may not run code.

torch.load(weights_only=True) with DeepSpeed's two bookkeeping classes allow-listed reads every file
blade or DeepSpeed loads at resume (SafeLoads wraps each engine's DeepSpeed checkpoint engine), and a
scan of a file's pickle stream (refused_global, no tensor loaded) lets every rank refuse a poisoned
or broken file before a collective load. The trust model: docs/checkpointing.md.
"""
from __future__ import annotations

import pickle
import re

import torch

from blade.errors import CheckpointError


def load_deepspeed_file(file: str, map_location="cpu") -> dict:
    """A DeepSpeed checkpoint file, unpickling tensors and DeepSpeed's two bookkeeping classes only
    (torch.load with weights_only=True): a file that holds anything else is refused, never run."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
            return torch.load(file, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise CheckpointError(f"refused {file}: it holds more than tensors "
                              f"({'the global ' + what.group(1) if what else 'an object torch refuses'}); "
                              "a checkpoint is data and may not run code: use one that blade wrote") from None
    except Exception as e:  # noqa: BLE001 - any other unpickling failure means a damaged file
        raise CheckpointError(f"cannot read {file} ({type(e).__name__}: {str(e)[:120]}): the checkpoint "
                              "is damaged") from None


_DEEPSPEED_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum",
                      "deepspeed.runtime.fp16.loss_scaler.LossScaler")


def refused_global(file: str) -> str | None:
    """What is wrong with a torch file for load_deepspeed_file, read from its pickle stream without
    loading any tensor: "holds <a global outside torch's weights_only allow-list and DeepSpeed's two
    classes>", or "is unreadable (...)"; None when nothing is. A cheap check that every rank runs
    before a collective load, so that one poisoned or broken file stops all ranks together instead
    of leaving the others waiting in a collective."""
    import pickletools
    import zipfile

    from torch import _weights_only_unpickler as unpickler

    allowed = set(unpickler._get_allowed_globals()) | set(_DEEPSPEED_GLOBALS)
    try:
        with zipfile.ZipFile(file) as z:
            stream = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
        for op, arg, _ in pickletools.genops(stream):
            if op.name == "GLOBAL" and arg.replace(" ", ".") not in allowed:
                return "holds the global " + arg.replace(" ", ".")
            if op.name in ("STACK_GLOBAL", "INST", "OBJ"):  # torch.save writes protocol 2: GLOBAL only
                return f"holds a {op.name} opcode"
    except Exception as e:  # noqa: BLE001 - zip, zlib, pickle framing: whatever fails, fails on this rank alone
        return f"is unreadable ({type(e).__name__})"
    return None


def refuse_unsafe(files, what: str) -> None:
    """CheckpointError (one line) for the first file that load_deepspeed_file would refuse: for the
    code that hands files to DeepSpeed's own readers (zero_to_fp32 unpickles with weights_only=False)."""
    for file in sorted(files):
        refused = refused_global(file)
        if refused and refused.startswith("holds"):
            raise CheckpointError(f"refused {file}: it {refused} (only tensors and DeepSpeed's bookkeeping "
                                  "classes are loaded; a checkpoint is data and may not run code)")
        if refused:  # not a zip archive: a legacy pickle would be unpickled as it stands
            raise CheckpointError(f"cannot read {what}: {file} {refused}; the checkpoint is damaged")


class SafeLoads:
    """An engine's DeepSpeed checkpoint engine, with every load going through load_deepspeed_file.

    DeepSpeed's own torch checkpoint engine unpickles with weights_only=False, so a checkpoint
    directory from elsewhere could run code on every rank at resume; `engine.checkpoint_engine =
    SafeLoads(engine.checkpoint_engine)` (engines.build_engine does it) closes that door."""

    def __init__(self, inner):
        self._inner = inner
        self.save_error = None

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        return load_deepspeed_file(path, map_location if map_location is not None else "cpu")

    def save(self, state_dict, path: str):
        """A failed write is kept in save_error (checkpoint.save raises it) instead of raised here:
        raising would skip the barrier DeepSpeed runs after its writes and leave the other ranks there."""
        try:
            return self._inner.save(state_dict, path)
        except Exception as e:  # noqa: BLE001 - re-raised by checkpoint.save after the barrier
            self.save_error = getattr(self, "save_error", None) or e
