"""blade.train.schedule: when a run selects and when its reference trains; the count the dry-run plan
and the experiment use is the schedule the step follows."""
import pytest

from blade.config import STRATEGIES, load_config
from blade.train.schedule import describe_layout, n_reference_phases, reference_phase_before, selecting


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("steps,warmup,tau", [(1, 0, 1), (10, 0, 3), (10, 4, 3), (10, 10, 2), (7, 9, 2),
                                              (120, 20, 40), (101, 0, 50), (30, 5, 100)])
def test_phase_count_is_the_schedule_counted(strategy, steps, warmup, tau):
    sel = load_config(None, [f"selection.strategy={strategy}", f"selection.warmup_full_ce_steps={warmup}",
                             f"selection.tau={tau}"]).selection
    counted = sum(reference_phase_before(sel, s) for s in range(steps))
    assert n_reference_phases(sel, steps) == counted
    assert [selecting(sel, s) for s in range(steps)] == [strategy != "full" and s >= warmup for s in range(steps)]
    if strategy == "blade":
        assert [s for s in range(steps) if reference_phase_before(sel, s)] == list(range(warmup, steps, tau))
    if strategy == "rho1":
        assert counted == int(steps > warmup)


def test_dry_run_plan_counts_syncs_after_the_warmup():
    cfg = load_config(None, ["train.steps=100", "selection.tau=40", "selection.warmup_full_ce_steps=50"])
    assert "2 reference syncs (ceil(50 / 40)), " in describe_layout(cfg, 1, 64)  # syncs at 50 and 90
