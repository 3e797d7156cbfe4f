"""The sync checkpoint's pending phase (blade/train/pending_phase.py): masks found by stream position on
the same and on another world size, and the reference left out of such a checkpoint. The end-to-end
resume through it is in tests/test_checkpoint.py (preemption and resharding tests)."""
import pytest
import torch

from blade.data.reader import batch_positions
from blade.errors import CheckpointError
from blade.train.pending_phase import PendingPhase, PhaseCheckpoint, saved_engines

T, GLOBAL, ACCUM, K, START = 5, 8, 2, 3, 40  # 8 sequences per step: micro 2 x 2 ranks or 1 x 4


def pool_of(world, rank):
    """The K pool steps of `rank` (micro-batch dicts with their stream positions)."""
    micro = GLOBAL // (world * ACCUM)
    return [[{"position": torch.tensor(list(batch_positions(START, k * ACCUM + m, micro, world, rank)))}
             for m in range(ACCUM)] for k in range(K)]


def mask_of(positions):
    """A mask that depends on the position only: what the same global top-k gives on any split."""
    return torch.stack([torch.arange(T) % (p % 3 + 1) == 0 for p in positions.tolist()])


def saved_by(world, rank):
    pool = pool_of(world, rank)
    positions = torch.cat([b["position"] for batches in pool for b in batches])
    phase = PhaseCheckpoint()
    phase.pending = PendingPhase(6, START, positions, mask_of(positions))
    return phase


def test_masks_are_found_by_position():
    phase = saved_by(2, 1)
    for batches in pool_of(2, 1):
        got = phase.pending.masks_for(batches)
        assert got.shape == (ACCUM, 2 * T)
        want = torch.stack([mask_of(b["position"]).flatten() for b in batches])
        assert torch.equal(got, want)


def test_state_round_trip_and_reshard():
    """Saved by 2 ranks, resumed by 2 (own rows) and by 4 (all rows merged, each rank finds its own)."""
    saved = [saved_by(2, r) for r in range(2)]
    state = saved[0].state_dict()
    assert state == {"pending": {"step": 6, "pool_start": START}}
    for world, rank_states in ((2, None), (4, [PhaseCheckpoint.merge_rank_states(
            [s.rank_state_dict() for s in saved], r) for r in range(4)])):
        for rank in range(world):
            resumed = PhaseCheckpoint()
            resumed.load_state_dict(state)
            resumed.load_rank_state_dict(saved[rank].rank_state_dict() if rank_states is None else rank_states[rank])
            for batches in pool_of(world, rank):
                want = torch.stack([mask_of(b["position"]).flatten() for b in batches])
                assert torch.equal(resumed.pending.masks_for(batches), want)


def test_a_changed_global_batch_is_refused():
    phase = saved_by(2, 0)
    wider = [{"position": torch.tensor([START + 100, START + 101])}]
    with pytest.raises(CheckpointError, match="global batch changed.*micro_batch_size"):
        phase.pending.masks_for(wider)


def test_between_phases_nothing_is_pending():
    phase = PhaseCheckpoint()
    assert phase.state_dict() == {"pending": None} and phase.rank_state_dict() == {}
    phase.load_state_dict({"pending": None})
    phase.load_rank_state_dict({})
    assert phase.pending is None
    rho1 = PhaseCheckpoint()
    rho1.pending = PendingPhase(0, None, None, None)  # no pool term: nothing per rank
    assert rho1.rank_state_dict() == {}


def test_the_reference_is_left_out_inside_a_phase():
    engines = {"proxy": "u", "reference": "w"}
    assert saved_engines(engines, {"pending": None}) == engines
    assert saved_engines(engines, {}) == engines  # a checkpoint written before this component existed
    assert saved_engines(engines, {"pending": {"step": 3, "pool_start": 0}}) == {"proxy": "u"}
