"""Wall-clock time per phase of a training step.

    timer = PhaseTimer(sync_cuda=False)
    timer.reset()
    with timer("proxy_forward"):
        ...
    timer.record()   # {"time_proxy_forward_s": 0.0123, ...}

A phase entered several times in one step (one block per micro-batch) adds up. With
`sync_cuda=True` the timer calls `torch.cuda.synchronize()` when a block starts and ends, so the time
of the kernels a block launched lands in that block and not in whichever later block happens to wait
for them; that costs a little overlap, so training leaves it off (its phase times are then the time
to *launch* the work on a GPU) and `blade bench` turns it on. On the CPU every op is synchronous
and the flag changes nothing.

A phase that opens with a collective (the top-k's first all-reduce) would also absorb the time its
rank waits for slower ranks to get there. `wait_phases` (set by `blade bench`) puts a barrier in front
of those phases and books the wait as `rank_wait`, so the phase's own time is what it costs.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from blade.runtime.dist import barrier, rank_and_world

# The phases of one proxy step (BladeStep.train_step in blade/train/step.py), in the order they run, and of a reference phase.
STEP_PHASES = ("data_wait", "proxy_forward", "reference_forward", "selection", "backward", "optimizer_step")
REF_PHASES = ("ref_score", "sync", "ref_train")


class PhaseTimer:
    def __init__(self, sync_cuda: bool = False, wait_phases: tuple[str, ...] = ()):
        self.sync_cuda = sync_cuda
        self.wait_phases = wait_phases
        self.totals: dict[str, float] = {}

    def reset(self) -> None:
        self.totals = {}

    def _sync(self) -> None:
        if self.sync_cuda and torch.cuda.is_available():
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, phase: str):
        self._sync()
        if phase in self.wait_phases and rank_and_world()[1] > 1:
            t0 = time.perf_counter()
            barrier()
            self.totals["rank_wait"] = self.totals.get("rank_wait", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - t0

    def get(self, phase: str) -> float:
        return self.totals.get(phase, 0.0)

    def record(self, phases=()) -> dict:
        """`time_<phase>_s` for the phases given (0.0 if not entered) and for every other phase entered."""
        names = list(phases) + [name for name in self.totals if name not in phases]
        return {f"time_{name}_s": self.totals.get(name, 0.0) for name in names}
