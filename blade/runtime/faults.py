"""TEST-ONLY fault injection: kill, signal or poison a rank at a named point of the loop.

Off unless the environment variable BLADE_TEST_FAULTS is set; tests use it to simulate crashes,
torn checkpoint saves, preemption signals and non-finite losses at exact places. Its value is a
comma-separated list of `ACTION@POINT[#RANK]`:

    kill@step_end:5#0              SIGKILL rank 0 after step 5 (its metrics are logged)
    kill@save:6:after_proxy#1      SIGKILL rank 1 inside the save of step_000006, after the proxy files
    sigterm@train_step:4#1         rank 1 sends itself SIGTERM in the middle of step 4
    sigusr1@ref_step:6:1#0         ... SIGUSR1 before reference step 1 of the sync at step 6
    sigterm@eval_batch:3:1         ... SIGTERM before evaluation batch 1 after step 3 (every rank)
    nan_loss@train_step:4#0        rank 0's proxy losses of step 4 become NaN
    nan_grad@train_step:7          finite losses, NaN gradients (every rank)
    nan_ref_loss@train_step:4      the reference's losses of step 4 become NaN
    nan_ref_loss@ref_phase:3       ... of the whole reference phase before step 3 (pool scores, steps)
    sleep@train_step:3#0           rank 0 pauses 3 s (time for a test to signal a rank from outside)
    enospc@save:6:after_proxy#1    rank 1's save of step_000006 fails as on a full disk (eacces: read-only)

Points: step_end:S, train_step:S, ref_phase:S, ref_step:S:K, eval_batch:S:B, save:C:{begin, after_proxy,
after_reference, before_barrier, before_complete, before_latest}.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal

ENV = "BLADE_TEST_FAULTS"
_SIGNALS = {"kill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1}
_ERRORS = {"enospc": errno.ENOSPC, "eacces": errno.EACCES}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _parse(spec: str) -> list[tuple[str, str, int | None]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        action, _, where = item.partition("@")
        point, _, rank = where.partition("#")
        out.append((action, point, int(rank) if rank else None))
    return out


def point(*name) -> set[str]:
    """Fire the faults registered for this point on this rank; returns the non-signal actions
    (e.g. {"nan_loss"}) for the caller to apply. A no-op (one dict lookup) when the variable is unset."""
    spec = os.environ.get(ENV)
    if not spec:
        return set()
    here = ":".join(str(n) for n in name)
    actions = set()
    for action, where, rank in _parse(spec):
        if where != here or (rank is not None and rank != _rank()):
            continue
        if action == "sleep":
            import time

            time.sleep(3.0)
        elif action in _ERRORS:  # a write that fails as on a full disk / a read-only directory
            code = _ERRORS[action]
            raise OSError(code, os.strerror(code), f"(injected at {here})")
        elif action in _SIGNALS:
            if action == "kill":
                import sys

                sys.stdout.flush()
                sys.stderr.flush()
            os.kill(os.getpid(), _SIGNALS[action])
        else:
            actions.add(action)
    return actions


@contextlib.contextmanager
def poisoned(modules: dict, actions: set[str]):
    """Inside the block every forward of modules["proxy"] returns NaN losses (nan_loss) or finite
    losses whose backward sends NaN gradients (nan_grad), and every forward of modules["reference"]
    NaN losses (nan_ref_loss): the step itself carries no fault code."""
    poisons = {"nan_loss": ("proxy", lambda mod, args, out: out * float("nan")),
               "nan_grad": ("proxy", lambda mod, args, out: nan_grad(out)),
               "nan_ref_loss": ("reference", lambda mod, args, out: out * float("nan"))}
    hooks = [modules[poisons[a][0]].register_forward_hook(poisons[a][1]) for a in sorted(actions)
             if a in poisons and modules.get(poisons[a][0]) is not None]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def nan_grad(loss):
    """`loss` unchanged in the forward; its backward sends NaN gradients into the model."""
    import torch

    class _NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    return _NanGrad.apply(loss)
