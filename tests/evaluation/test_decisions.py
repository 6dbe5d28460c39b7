"""Operating points: exact Clopper-Pearson bounds, threshold choice on validation only."""

from __future__ import annotations

import math

import numpy as np
import pytest

from defectscope.evaluation.decisions import (
    OPERATING_POINT_KEYS,
    choose_threshold,
    clopper_pearson_interval,
    clopper_pearson_lower,
    clopper_pearson_upper,
    decide,
    escape_rate,
    false_call_rate,
    is_defective_labels,
    n_defective_needed,
    ok_vs_defect_scores,
    operating_points,
)


def _binom_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def _upper_by_bisection(k: int, n: int, tail: float) -> float:
    """The p with P(X <= k | n, p) = tail, by bisection on the exact binomial sum (no scipy)."""
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _binom_cdf(k, n, mid) > tail else (lo, mid)
    return (lo + hi) / 2


def test_clopper_pearson_hand_values():
    # zero events: closed form 1 - a^(1/n)
    assert clopper_pearson_upper(0, 10) == pytest.approx(1 - 0.05 ** (1 / 10), abs=1e-12)  # 0.2589
    assert clopper_pearson_upper(0, 10) == pytest.approx(0.2589, abs=1e-4)
    lo, hi = clopper_pearson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-12)  # 0.3085
    # all events: the lower bound mirrors it
    assert clopper_pearson_lower(10, 10) == pytest.approx(0.05 ** (1 / 10), abs=1e-12)
    assert clopper_pearson_upper(10, 10) == 1.0
    # textbook interval for 1 of 20 (two-sided 95 %): 0.0013 - 0.2487
    lo, hi = clopper_pearson_interval(1, 20)
    assert lo == pytest.approx(0.00127, abs=1e-5) and hi == pytest.approx(0.24873, abs=1e-5)


@pytest.mark.parametrize("k,n", [(0, 7), (1, 20), (3, 52), (7, 40), (12, 13)])
def test_clopper_pearson_solves_the_binomial_tail(k, n):
    assert clopper_pearson_upper(k, n) == pytest.approx(_upper_by_bisection(k, n, 0.05), abs=1e-9)
    # lower bound: P(X >= k | p_l) = a  <=>  P(X <= k - 1 | p_l) = 1 - a
    assert clopper_pearson_lower(k, n) == pytest.approx(_upper_by_bisection(k - 1, n, 0.95) if k else 0.0, abs=1e-9)
    lo, hi = clopper_pearson_interval(k, n)
    assert hi == pytest.approx(_upper_by_bisection(k, n, 0.025), abs=1e-9)
    assert lo <= k / n < hi


def test_clopper_pearson_rejects_bad_counts():
    with pytest.raises(ValueError, match="n must be at least 1"):
        clopper_pearson_upper(0, 0)
    with pytest.raises(ValueError, match=r"k must lie in \[0, n=5\]"):
        clopper_pearson_upper(6, 5)
    with pytest.raises(ValueError, match="confidence"):
        clopper_pearson_upper(1, 5, confidence=1.0)


def test_n_defective_needed_is_the_smallest_n():
    assert [n_defective_needed(t) for t in (0.05, 0.01, 0.001)] == [59, 299, 2995]
    for t in (0.2, 0.05, 0.013, 0.001):
        n = n_defective_needed(t)
        assert clopper_pearson_upper(0, n) <= t < clopper_pearson_upper(0, n - 1)


def _scores(seed: int, n_good: int, n_def: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = np.concatenate([rng.beta(2, 6, n_good), rng.beta(5, 2, n_def)])
    return s, np.r_[np.zeros(n_good, bool), np.ones(n_def, bool)]


@pytest.mark.parametrize("target", [0.3, 0.1, 0.05, 0.01, 0.001])
def test_choose_threshold_is_the_highest_meeting_the_target(target):
    s, y = _scores(0, 300, 120)
    thr = choose_threshold(s, y, target)
    esc, n = escape_rate(s, y, thr)
    assert esc / n <= target
    higher = np.sort(s[y])[np.sort(s[y]) > thr]
    if higher.size:  # the next defective score above would let too many escape
        assert escape_rate(s, y, higher[0])[0] / n > target


def test_choose_threshold_ties_are_rejected():
    s = np.array([0.1, 0.2, 0.5, 0.5, 0.5, 0.9])
    y = np.array([0, 0, 1, 1, 1, 1])
    thr = choose_threshold(s, y, 0.2)  # 4 defects, floor(0.8) = 0 escapes allowed
    assert thr == 0.5
    assert escape_rate(s, y, thr) == (0, 4)
    assert list(decide(s, thr)) == ["accept", "accept", "reject", "reject", "reject", "reject"]
    assert decide(0.49, thr) == "accept" and decide(0.5, thr) == "reject"
    assert false_call_rate(s, y, 0.15) == (1, 2)


def test_choose_threshold_errors():
    with pytest.raises(ValueError, match="no defective sample"):
        choose_threshold([0.1, 0.2], [0, 0], 0.05)
    with pytest.raises(ValueError, match=r"val_defective: expected shape \(3,\)"):
        choose_threshold([0.1, 0.2, 0.3], [0, 1], 0.05)
    with pytest.raises(ValueError, match="NaN"):
        choose_threshold([0.1, np.nan], [0, 1], 0.05)
    with pytest.raises(ValueError, match="target_escape_rate"):
        choose_threshold([0.1, 0.2], [0, 1], 0.0)


def test_operating_points_keys_bounds_and_test_remeasurement():
    vs, vy = _scores(1, 200, 52)  # KolektorSDD-like: 52 defects
    ts, ty = _scores(2, 150, 40)
    pts = operating_points(vs, vy, (0.05, 0.01), ts, ty)
    assert [set(p) for p in pts] == [set(OPERATING_POINT_KEYS)] * 2
    for p in pts:
        esc, n = escape_rate(vs, vy, p["threshold"])
        assert p["n_defective_used"] == n == 52
        assert p["escape_rate_upper_95"] == pytest.approx(clopper_pearson_upper(esc, n))
        fc, ng = false_call_rate(vs, vy, p["threshold"])
        assert p["false_call_rate"] == fc / ng
        lo, hi = p["false_call_rate_ci_95"]
        assert lo <= p["false_call_rate"] <= hi
        assert p["test_escape_rate"] == escape_rate(ts, ty, p["threshold"])[0] / 40
        assert p["test_false_call_rate"] == false_call_rate(ts, ty, p["threshold"])[0] / 150
        # 52 defects cannot prove 5 % (needs 59) or 1 % (needs 299), even with zero escapes
        assert p["bound_reaches_target"] is False
    assert [p["n_defective_needed"] for p in pts] == [59, 299]
    # a lower target never gets a higher threshold
    assert pts[1]["threshold"] <= pts[0]["threshold"]
    # enough defects with few escapes: the bound reaches a loose target
    vs2, vy2 = _scores(3, 500, 400)
    (p,) = operating_points(vs2, vy2, (0.05,))
    assert p["bound_reaches_target"] is (p["escape_rate_upper_95"] <= 0.05)
    assert p["test_escape_rate"] is None and p["test_false_call_rate"] is None


def test_operating_points_never_read_the_test_part():
    vs, vy = _scores(4, 200, 60)
    ts, ty = _scores(5, 100, 30)
    ref = operating_points(vs, vy, test_scores=ts, test_defective=ty)
    rng = np.random.default_rng(0)
    variants = [
        (rng.permutation(ts), ty),                      # scores shuffled against labels
        (ts, rng.permutation(ty)),
        (ts * 0.1 + 0.9, ty),                           # shifted
        (rng.uniform(size=500), rng.integers(0, 2, 500)),  # another size altogether
        (1.0 - ts, ty),                                 # reversed
    ]
    val_keys = [k for k in OPERATING_POINT_KEYS if not k.startswith("test_")]
    for t_s, t_y in variants:
        got = operating_points(vs, vy, test_scores=t_s, test_defective=t_y)
        assert [[g[k] for k in val_keys] for g in got] == [[r[k] for k in val_keys] for r in ref]
    without = operating_points(vs, vy)
    assert [[g[k] for k in val_keys] for g in without] == [[r[k] for k in val_keys] for r in ref]
    # while the validation part does change the thresholds
    moved = operating_points(vs + 0.05, vy)
    assert [m["threshold"] for m in moved] != [r["threshold"] for r in ref]
    with pytest.raises(ValueError, match="together"):
        operating_points(vs, vy, test_scores=ts)


def test_ok_vs_defect_scores():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    names = ["scratch", "good", "dent"]
    np.testing.assert_allclose(ok_vs_defect_scores(probs, names, "good"), [0.8, 0.9])
    assert is_defective_labels(np.array([1, 0, 2]), names, "good").tolist() == [False, True, True]
    with pytest.raises(ValueError, match="ok_class 'ok' is not a class.*scratch, good, dent"):
        ok_vs_defect_scores(probs, names, "ok")
    with pytest.raises(ValueError, match=r"expected shape \[N, 3\]"):
        ok_vs_defect_scores(probs[:, :2], names, "good")
