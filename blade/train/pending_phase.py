"""The checkpoint co-scheduled with a sync, written *after* w <- u: a reference phase resumable from it.

A phase's only input that the proxy u cannot give back is its pool masks, the top-gamma of
l(u) - l(w_prev) against the outgoing reference. So the phase scores its pool first, then syncs
w <- u, then checkpoints: the reference is u again and is left out of that checkpoint (it costs the
proxy's size, not 1.33x), and what a resume needs to redo the K reference steps is the pool
stream's start position (in state.json) and the masks (one bool per pool token, in the rank files,
keyed by stream position so that a resume on another world size finds its rows).
(docs/checkpointing.md, "When a checkpoint is written".)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from blade.errors import CheckpointError


@dataclass
class PendingPhase:
    """A phase between its sync checkpoint and its end: what the checkpoint holds of it."""
    step: int
    pool_start: int | None             # ref_pool stream position before the phase's draws (None: rho1)
    positions: torch.Tensor | None     # [N] stream position of each pool sequence this rank holds
    masks: torch.Tensor | None         # [N, T] the reference's mask on each of them
    _row: dict = field(default_factory=dict, repr=False)  # position -> row, built on first use

    def masks_for(self, batches: list[dict]) -> torch.Tensor:
        """The saved masks of one pool step's micro-batches, [M, B*T], looked up by stream position."""
        if not self._row:
            self._row.update({p: i for i, p in enumerate(self.positions.tolist())})
        row = self._row
        wanted = torch.cat([b["position"] for b in batches]).tolist()
        missing = [p for p in wanted if p not in row]
        if missing:
            raise CheckpointError(f"the checkpoint of step {self.step} was written inside a reference phase and "
                                  f"holds no pool mask for stream position {missing[0]}: the global batch "
                                  "changed; resume with the checkpoint's train.micro_batch_size x "
                                  "train.grad_accum x ranks")
        rows = self.masks[torch.tensor([row[p] for p in wanted])]
        return rows.view(len(batches), -1)


class PhaseCheckpoint:
    """The checkpoint component "phase": the pending phase, or None between phases."""

    def __init__(self):
        self.pending: PendingPhase | None = None

    def state_dict(self) -> dict:
        p = self.pending
        return {"pending": None if p is None else {"step": p.step, "pool_start": p.pool_start}}

    def load_state_dict(self, state: dict) -> None:
        p = state["pending"]
        self.pending = None if p is None else PendingPhase(p["step"], p["pool_start"], None, None)

    def rank_state_dict(self) -> dict:
        p = self.pending
        return {} if p is None or p.masks is None else {"positions": p.positions, "masks": p.masks}

    def load_rank_state_dict(self, state: dict) -> None:
        if self.pending is not None and state:
            self.pending.positions, self.pending.masks = state["positions"], state["masks"]

    @staticmethod
    def merge_rank_states(states: list[dict], rank: int) -> dict:
        """On another world size: every old rank's rows (each new rank picks its own by position)."""
        held = [s for s in states if s]
        if not held:
            return {}
        return {"positions": torch.cat([s["positions"] for s in held]), "masks": torch.cat([s["masks"] for s in held])}


def saved_engines(engines: dict, phase_state: dict) -> dict:
    """The engines a checkpoint holds, given its "phase" component state: inside a phase (after the
    sync) the reference equals the proxy and is not saved."""
    if phase_state.get("pending") is None:
        return engines
    return {name: engine for name, engine in engines.items() if name != "reference"}
