"""Which stages an experiment's seeds and --grid points need (blade/experiment/grid.py): the derived
schedule, the points of a grid, what each strategy reads, and that equal settings share a run."""
import pytest

from blade.errors import BladeError
from blade.experiment.grid import parse_grid, point_label, reads, scaled_schedule, seed_list, stage_overrides


def test_scaled_schedule_is_the_papers_at_5000_steps():
    assert scaled_schedule(5000) == {"selection.tau": 1000, "selection.k_ref_steps": 300,
                                     "selection.rho1_ref_steps": 1500, "selection.diag_interval": 250}
    assert scaled_schedule(150) == {"selection.tau": 30, "selection.k_ref_steps": 9,
                                    "selection.rho1_ref_steps": 45, "selection.diag_interval": 7}
    assert scaled_schedule(3)["selection.tau"] == 1 and scaled_schedule(3)["selection.k_ref_steps"] == 1
    # a given tau keeps K = 0.3 tau; K0 = syncs x K; the diagnostics interval follows the run length only
    assert scaled_schedule(150, tau=75) == {"selection.tau": 75, "selection.k_ref_steps": 22,
                                            "selection.rho1_ref_steps": 44, "selection.diag_interval": 7}
    assert scaled_schedule(150, k=18)["selection.rho1_ref_steps"] == 90


def test_grid_groups_are_products_and_several_groups_their_union():
    assert parse_grid([["selection.tau=15,75", "selection.lam=0,1"]]) == [
        {"selection.tau": "15", "selection.lam": "0"}, {"selection.tau": "15", "selection.lam": "1"},
        {"selection.tau": "75", "selection.lam": "0"}, {"selection.tau": "75", "selection.lam": "1"}]
    assert parse_grid([["selection.tau=15,75"], ["selection.k_ref_steps=3"], ["selection.tau=15"]]) == [
        {"selection.tau": "15"}, {"selection.tau": "75"}, {"selection.k_ref_steps": "3"}]
    assert parse_grid([]) == []
    for bad, match in ((["tau=15"], "section.key"), (["selection.tau="], "no values"),
                       (["selection.strategy=rho1,blade"], "--strategies")):
        with pytest.raises(BladeError, match=match):
            parse_grid([bad])
    for point in ({"selection.tau": "abc"}, {"selection.k_ref_steps": "0"}, {"selection.tau": "1.5"}):
        with pytest.raises(BladeError, match="positive integer"):
            stage_overrides("blade", 150, [], point)


def test_what_each_strategy_reads():
    assert not reads("full", "selection.gamma") and reads("full", "optim.lr")
    assert reads("random", "selection.gamma") and not reads("random", "selection.tau")
    assert reads("rho1", "selection.rho1_ref_steps") and not reads("rho1", "selection.lam")
    assert not reads("blade", "selection.rho1_ref_steps") and reads("blade", "selection.k_ref_steps")
    assert all(reads(s, "selection.diag_interval") for s in ("full", "random", "rho1", "blade"))


def test_equal_settings_share_a_run_and_rho1_gets_the_analogous_k0():
    default = {s: stage_overrides(s, 150, ["optim.lr=1e-3"], {}) for s in ("full", "random", "rho1", "blade")}
    assert default["blade"] == ["selection.tau=30", "selection.k_ref_steps=9", "selection.rho1_ref_steps=45",
                                "selection.diag_interval=7", "optim.lr=1e-3"]
    lam = {s: stage_overrides(s, 150, ["optim.lr=1e-3"], {"selection.lam": "0"}) for s in default}
    assert {s for s in default if lam[s] != default[s]} == {"blade"}  # lambda: blade runs only
    assert point_label("blade", lam["blade"], default["blade"]) == "blade[lam=0]"
    k = {s: stage_overrides(s, 150, [], {"selection.k_ref_steps": "3"}) for s in default}
    assert "selection.rho1_ref_steps=15" in k["rho1"] and "selection.k_ref_steps=9" in k["rho1"]
    assert "selection.rho1_ref_steps=45" in k["blade"]  # blade does not read K0: it keeps the default's
    base = {s: stage_overrides(s, 150, [], {}) for s in default}
    assert point_label("rho1", k["rho1"], base["rho1"]) == "rho1[rho1_ref_steps=15]"
    assert point_label("blade", k["blade"], base["blade"]) == "blade[k_ref_steps=3]"
    assert k["full"] == base["full"] and k["random"] == base["random"]
    gamma = {s: stage_overrides(s, 150, [], {"selection.gamma": "0.3"}) for s in default}
    assert {s for s in default if gamma[s] != base[s]} == {"random", "rho1", "blade"}
    tau = stage_overrides("blade", 150, [], {"selection.tau": "15"})
    assert point_label("blade", tau, base["blade"]) == "blade[tau=15,k_ref_steps=4]"  # K = round(0.3 tau)


def test_seeds():
    assert seed_list(1234, 3) == [1234, 1235, 1236]
    with pytest.raises(BladeError, match="at least 1"):
        seed_list(1, 0)
