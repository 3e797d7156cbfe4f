"""Statistics over seeds for the experiment report: mean and standard error, and paired comparisons
(per seed differences) with a two-sided paired t-test and an exact two-sided sign test.

Pure Python (math only; scipy is not a dependency). The Student t tail comes from the regularized
incomplete beta function, P(|T| > t) = I_{df / (df + t^2)}(df / 2, 1 / 2), evaluated by its continued
fraction (modified Lentz), as in Numerical Recipes' betacf.
"""
from __future__ import annotations

import math

ALPHA = 0.05  # a difference with a paired t-test p-value below this is "beyond noise"


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def stdev(xs: list[float]) -> float | None:
    """The sample standard deviation (n - 1); None for fewer than 2 values."""
    if len(xs) < 2:
        return None
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def stderr(xs: list[float]) -> float | None:
    sd = stdev(xs)
    return None if sd is None else sd / math.sqrt(len(xs))


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "mean": mean(xs), "sd": stdev(xs), "se": stderr(xs)}


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 3e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def sign_test_p(diffs: list[float]) -> float:
    """Exact two-sided sign test of median 0 (zero differences dropped)."""
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = pos + neg
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(pos, neg) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a: dict, b: dict) -> dict | None:
    """a - b over the seeds both have ({seed: value}): n, mean difference, its standard error, t,
    the t-test and sign-test p-values and how often a is lower; None without a common seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    out = {"n": len(diffs), "seeds": seeds, "diffs": diffs, "mean": mean(diffs), "se": stderr(diffs),
           "t": None, "p_t": None, "p_sign": sign_test_p(diffs), "lower": sum(d < 0 for d in diffs)}
    if out["se"] is not None:
        out["t"] = (out["mean"] / out["se"] if out["se"] > 0
                    else math.copysign(math.inf, out["mean"]) if out["mean"] else 0.0)
        out["p_t"] = t_two_sided_p(out["t"], len(diffs) - 1)
    return out


def beyond_noise(comparison: dict | None) -> bool:
    return bool(comparison) and comparison["p_t"] is not None and comparison["p_t"] < ALPHA
