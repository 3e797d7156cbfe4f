"""The statistics of the experiment report (blade/experiment/stats.py) against closed forms and
published t-table values (scipy is not a dependency, so the t tail is computed by hand)."""
import math

import pytest

from blade.experiment.stats import betainc, paired, sign_test_p, stderr, summary, t_two_sided_p


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 3.0, 10.0, 250.0])
def test_t_tail_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-12, abs=1e-15)  # Cauchy
    assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-12, abs=1e-15)
    assert t_two_sided_p(-t, 2) == t_two_sided_p(t, 2)


@pytest.mark.parametrize("df, t, p", [(1, 12.7062047, 0.05), (2, 4.30265273, 0.05), (4, 4.60409487, 0.01),
                                      (5, 2.57058184, 0.05), (10, 2.22813885, 0.05), (30, 2.04227246, 0.05),
                                      (3, 5.84090931, 0.01)])
def test_t_tail_matches_the_t_table(df, t, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, rel=1e-6)


def test_t_tail_tends_to_the_normal_and_betainc_is_symmetric():
    for t in (0.5, 1.96, 4.0):
        assert t_two_sided_p(t, 1e7) == pytest.approx(math.erfc(t / math.sqrt(2)), rel=1e-5)
    assert betainc(2.5, 0.5, 0.3) == pytest.approx(1 - betainc(0.5, 2.5, 0.7), rel=1e-12)
    assert betainc(1.0, 1.0, 0.37) == pytest.approx(0.37, rel=1e-12)  # uniform
    assert t_two_sided_p(math.inf, 3) == 0.0


def test_sign_test_is_the_exact_binomial_tail():
    assert sign_test_p([-1, -2, -3]) == 0.25                 # 2 * (1/2)^3
    assert sign_test_p([-1, -2, -3, -4, -5, 1]) == pytest.approx(2 * 7 / 64)
    assert sign_test_p([0.0, 0.0]) == 1.0 and sign_test_p([1, -1]) == 1.0
    assert sign_test_p([-1] * 10) == pytest.approx(2 / 1024)


def test_paired_difference_by_seed():
    a, b = {1: 3.0, 2: 2.0, 3: 2.5, 9: 7.0}, {1: 3.5, 2: 2.25, 3: 3.25}
    c = paired(a, b)  # seed 9 has no partner
    diffs = [-0.5, -0.25, -0.75]
    assert c["seeds"] == [1, 2, 3] and c["diffs"] == diffs and c["lower"] == 3
    se = math.sqrt(sum((d + 0.5) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert c["mean"] == pytest.approx(-0.5) and c["se"] == pytest.approx(se)
    assert c["t"] == pytest.approx(-0.5 / se)
    t = 0.5 / se  # 2 degrees of freedom: P(|T| > t) = 1 - t / sqrt(t^2 + 2)
    assert c["p_t"] == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-10)
    assert c["p_sign"] == 0.25
    one = paired({1: 1.0}, {1: 2.0})
    assert one["se"] is None and one["p_t"] is None and one["p_sign"] == 1.0
    assert paired({1: 1.0}, {2: 1.0}) is None


def test_summary_and_stderr():
    s = summary([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3) and s["sd"] == pytest.approx(math.sqrt(7 / 3))
    assert s["se"] == pytest.approx(math.sqrt(7 / 9))
    assert stderr([5.0]) is None and summary([5.0])["se"] is None
