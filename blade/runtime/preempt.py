"""Preemption: SIGTERM / SIGUSR1 on any rank, or the wall-time budget, stop the run at the next
boundary that every rank reaches together (one 2-float all-reduce); the trainer then checkpoints
and the process exits with EXIT_PREEMPTED so that a job script can requeue it.

    0   finished            1   crashed (traceback)       2   user error, or aborted (non-finite losses)
    75  preempted: a checkpoint was written (or the newest one is the resume point); requeue with
        checkpoint.resume=auto   (EX_TEMPFAIL; 124 is taken by `timeout`, 137 by SIGKILL)
"""
from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

from blade.runtime.dist import all_reduce

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """A stop that left a resume point: raised out of Trainer.fit on every rank after an agreed stop,
    and by `blade experiment` when a stage exits with EXIT_PREEMPTED. The CLI exits with 75."""


class StopRequest:
    """What this rank knows (a signal arrived, the wall time is nearly up) and what all ranks agree."""

    def __init__(self, max_wall_time_s: float = 0.0, start_time: float | None = None, clock=time.time):
        self.max_wall_time_s = max_wall_time_s
        self.clock = clock
        self.start = _process_start() if start_time is None else start_time
        self.signal: str | None = None
        self.longest_step = 0.0   # seconds, of a proxy step or a reference step
        self.longest_save = 0.0
        self._previous = {}

    # -------------------------------------------------------------- signals
    def install(self) -> None:
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                return

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            os.write(2, f"blade: {name} received on rank {os.environ.get('RANK', '0')}: "
                        f"checkpointing at the next step boundary\n".encode())
        self.signal = name

    # -------------------------------------------------------------- wall time
    def note(self, step_s: float = 0.0, save_s: float = 0.0) -> None:
        self.longest_step = max(self.longest_step, step_s)
        self.longest_save = max(self.longest_save, save_s)

    def margin(self) -> float:
        """Time kept in reserve: 1.5 x (longest step + longest save) + 5 s; before the first save,
        a save is assumed to take two steps."""
        save = self.longest_save or 2.0 * self.longest_step
        return 1.5 * (self.longest_step + save) + 5.0

    def out_of_time(self) -> bool:
        if self.max_wall_time_s <= 0:
            return False
        return self.clock() - self.start + self.margin() >= self.max_wall_time_s

    # -------------------------------------------------------------- agreement (a collective)
    def agreed(self) -> str | None:
        """The reason to stop if any rank has one (the same answer on every rank), else None."""
        flags = all_reduce(torch.tensor([float(self.signal is not None), float(self.out_of_time())]),
                           dist.ReduceOp.MAX)
        if flags[0]:
            return f"signal {self.signal}" if self.signal else "signal on another rank"
        if flags[1]:
            return f"wall time (train.max_wall_time_s={self.max_wall_time_s:g})"
        return None


def _process_start() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil comes with deepspeed; fall back to now
        return time.time()
