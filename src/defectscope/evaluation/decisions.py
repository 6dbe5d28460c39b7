"""Accept/reject decisions at the line: thresholds for a target escape rate, with exact bounds.

Conventions (every function here):

- A **score** is higher for "more defective" (anomaly score, ``1 - p(ok)``, image score of a
  segmentation model).
- A sample is **rejected** when ``score >= threshold`` and **accepted** otherwise.
- **Escape**: a defective sample that is accepted. Escape rate = escapes / defective samples
  (the miss rate, 1 - recall of the defect class).
- **False call**: a good sample that is rejected. False-call rate = false calls / good samples
  (the false-positive rate of the defect class).

Thresholds are chosen on validation or out-of-fold scores only (:func:`choose_threshold`,
:func:`operating_points`); the test part is re-measured at the chosen threshold, never used to
choose it.

Confidence bounds are exact binomial (Clopper-Pearson 1934) bounds from the beta distribution:
for ``k`` events in ``n`` trials, the one-sided upper ``1 - a`` bound is
``Beta.ppf(1 - a; k + 1, n - k)`` (1 when ``k = n``), the lower one ``Beta.ppf(a; k, n - k + 1)``
(0 when ``k = 0``); the two-sided ``1 - a`` interval uses ``a / 2`` on each side. With zero
events the upper bound has the closed form ``1 - a^(1/n)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import beta

DEFAULT_TARGETS = (0.05, 0.01, 0.001)

#: keys of one operating point, in report order
OPERATING_POINT_KEYS = (
    "target_escape_rate", "threshold", "escape_rate_upper_95", "false_call_rate", "false_call_rate_ci_95",
    "test_escape_rate", "test_false_call_rate", "n_defective_used", "n_defective_needed", "bound_reaches_target",
)


def _check_counts(k: int, n: int, confidence: float) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(k, (int, np.integer))):
        raise TypeError(f"k and n must be integers, got k={k!r}, n={n!r}")
    if n <= 0:
        raise ValueError(f"n must be at least 1 (number of trials), got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in [0, n={n}], got {k}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """Exact one-sided upper confidence bound of a binomial proportion (Clopper-Pearson).

    ``P(X <= k | n, p_u) = 1 - confidence`` solved for ``p_u``, i.e.
    ``p_u = Beta.ppf(confidence; k + 1, n - k)``; 1.0 when ``k == n``.

    Args:
        k: observed events (e.g. escapes), ``0 <= k <= n``.
        n: trials (e.g. defective samples), ``n >= 1``.
        confidence: one-sided confidence level, default 0.95.

    Returns:
        The upper bound in [0, 1].

    Raises:
        ValueError: ``n < 1``, ``k`` outside ``[0, n]`` or ``confidence`` outside (0, 1).
    """
    _check_counts(k, n, confidence)
    if k == n:
        return 1.0
    return float(beta.ppf(confidence, k + 1, n - k))


def clopper_pearson_lower(k: int, n: int, confidence: float = 0.95) -> float:
    """Exact one-sided lower confidence bound (Clopper-Pearson): ``Beta.ppf(1 - confidence; k, n - k + 1)``,
    0.0 when ``k == 0``. Arguments and errors as :func:`clopper_pearson_upper`."""
    _check_counts(k, n, confidence)
    if k == 0:
        return 0.0
    return float(beta.ppf(1.0 - confidence, k, n - k + 1))


def clopper_pearson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided confidence interval (Clopper-Pearson): each tail holds ``(1 - confidence) / 2``.

    Returns:
        ``(lower, upper)``; the 95 % interval for 0 of 10 is ``(0.0, 0.3085)``.

    Raises:
        ValueError: as :func:`clopper_pearson_upper`.
    """
    tail = 1.0 - (1.0 - confidence) / 2.0
    return clopper_pearson_lower(k, n, tail), clopper_pearson_upper(k, n, tail)


def n_defective_needed(target_escape_rate: float, confidence: float = 0.95) -> int:
    """Smallest number of defective samples that, with zero escapes, proves ``escape rate <= target``.

    With ``k = 0`` the Clopper-Pearson upper bound is ``1 - (1 - confidence)^(1/n)``; it is
    ``<= target`` from ``n = ceil(ln(1 - confidence) / ln(1 - target))`` on (the "rule of three"
    ``n ~ 3 / target`` for 95 %). The result is checked against :func:`clopper_pearson_upper`.
    For 95 %: 59 defects for a 5 % target, 299 for 1 %, 2995 for 0.1 %.

    Raises:
        ValueError: target outside (0, 1).
    """
    if not 0.0 < target_escape_rate < 1.0:
        raise ValueError(f"target_escape_rate must lie in (0, 1), got {target_escape_rate}")
    n = max(1, math.ceil(math.log(1.0 - confidence) / math.log1p(-target_escape_rate)))
    while n > 1 and clopper_pearson_upper(0, n - 1, confidence) <= target_escape_rate:  # float safety
        n -= 1
    while clopper_pearson_upper(0, n, confidence) > target_escape_rate:
        n += 1
    return n


def _as_scores(scores: np.ndarray | Sequence[float], is_defective: np.ndarray | Sequence, name: str
               ) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_defective)
    if s.ndim != 1:
        raise ValueError(f"{name}_scores: expected a 1-D array [N], got shape {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"{name}_defective: expected shape {s.shape} like {name}_scores, got {y.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name}_scores: {int((~np.isfinite(s)).sum())} values are NaN or infinite")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"{name}_defective: expected booleans or 0/1, got values {np.unique(y)[:5].tolist()}")
        y = y.astype(bool)
    return s, y


def escape_rate(scores: np.ndarray, is_defective: np.ndarray, threshold: float) -> tuple[int, int]:
    """Escapes (defective samples with ``score < threshold``) and the number of defective samples.

    Args:
        scores: ``[N]`` defect scores (higher = more defective).
        is_defective: ``[N]`` bool or 0/1.
        threshold: reject when ``score >= threshold``.

    Returns:
        ``(escapes, n_defective)``; the rate is their ratio.
    """
    s, y = _as_scores(scores, is_defective, "eval")
    return int((s[y] < threshold).sum()), int(y.sum())


def false_call_rate(scores: np.ndarray, is_defective: np.ndarray, threshold: float) -> tuple[int, int]:
    """False calls (good samples with ``score >= threshold``) and the number of good samples; see
    :func:`escape_rate` for the arguments."""
    s, y = _as_scores(scores, is_defective, "eval")
    return int((s[~y] >= threshold).sum()), int((~y).sum())


def choose_threshold(scores: np.ndarray, is_defective: np.ndarray, target_escape_rate: float) -> float:
    """The highest threshold whose empirical escape rate on these (validation) scores is <= target.

    Rule: with ``n`` defective samples at most ``k = floor(target * n)`` may escape, so the
    threshold is the ``(k + 1)``-th smallest defective score. Rejection is ``score >= threshold``,
    so samples tied with the threshold are rejected (ties never add escapes). Any higher
    threshold lets at least ``k + 1`` defects escape; any lower one only adds false calls.

    Args:
        scores: ``[N]`` validation or out-of-fold defect scores.
        is_defective: ``[N]`` bool or 0/1 ground truth.
        target_escape_rate: in (0, 1).

    Returns:
        The threshold (one of the defective scores).

    Raises:
        ValueError: no defective sample, non-finite scores, mismatched shapes, target outside (0, 1).
    """
    if not 0.0 < target_escape_rate < 1.0:
        raise ValueError(f"target_escape_rate must lie in (0, 1), got {target_escape_rate}")
    s, y = _as_scores(scores, is_defective, "val")
    d = np.sort(s[y])
    if d.size == 0:
        raise ValueError("val_defective: no defective sample, so no escape rate can be measured")
    k = int(math.floor(target_escape_rate * d.size + 1e-9))
    return float(d[min(k, d.size - 1)])


def operating_points(
    val_scores: np.ndarray,
    val_defective: np.ndarray,
    targets: Sequence[float] = DEFAULT_TARGETS,
    test_scores: np.ndarray | None = None,
    test_defective: np.ndarray | None = None,
    confidence: float = 0.95,
) -> list[dict]:
    """Operating points for target escape rates, chosen on validation, re-measured on test.

    For each target: the threshold from :func:`choose_threshold` on ``val_*`` only, the exact
    one-sided upper bound of the escape rate there (Clopper-Pearson, ``confidence``), the
    false-call rate there with its two-sided interval, and the escape and false-call rates of
    ``test_*`` at that same threshold. The test arrays are read after every threshold is fixed
    and never change a threshold.

    Args:
        val_scores, val_defective: ``[N]`` validation or out-of-fold scores and ground truth.
        targets: target escape rates in (0, 1), default 5 %, 1 %, 0.1 %.
        test_scores, test_defective: ``[M]`` held-out test part (both or neither).
        confidence: level of the bounds (default 0.95).

    Returns:
        One dict per target with the keys :data:`OPERATING_POINT_KEYS`:
        ``target_escape_rate``, ``threshold``, ``escape_rate_upper_95``, ``false_call_rate``
        (``None`` without good validation samples), ``false_call_rate_ci_95`` (``[lo, hi]`` or
        ``None``), ``test_escape_rate`` / ``test_false_call_rate`` (``None`` without test data or
        without test samples of that kind), ``n_defective_used`` (defective validation samples),
        ``n_defective_needed`` (defects needed, with zero escapes, for the bound to reach the
        target; :func:`n_defective_needed`), ``bound_reaches_target`` (upper bound <= target).

    Raises:
        ValueError: as :func:`choose_threshold`, or only one of the two test arrays given.
    """
    if (test_scores is None) != (test_defective is None):
        raise ValueError("test_scores and test_defective must be given together")
    vs, vy = _as_scores(val_scores, val_defective, "val")
    thresholds = [choose_threshold(vs, vy, float(t)) for t in targets]  # fixed before test is read
    test = _as_scores(test_scores, test_defective, "test") if test_scores is not None else None
    points = []
    for target, thr in zip(targets, thresholds):
        esc, n_def = escape_rate(vs, vy, thr)
        fc, n_good = false_call_rate(vs, vy, thr)
        upper = clopper_pearson_upper(esc, n_def, confidence)
        point = {
            "target_escape_rate": float(target),
            "threshold": thr,
            "escape_rate_upper_95": upper,
            "false_call_rate": fc / n_good if n_good else None,
            "false_call_rate_ci_95": list(clopper_pearson_interval(fc, n_good, confidence)) if n_good else None,
            "test_escape_rate": None,
            "test_false_call_rate": None,
            "n_defective_used": n_def,
            "n_defective_needed": n_defective_needed(float(target), confidence),
            "bound_reaches_target": bool(upper <= target),
        }
        if test is not None:
            t_esc, t_def = escape_rate(*test, thr)
            t_fc, t_good = false_call_rate(*test, thr)
            point["test_escape_rate"] = t_esc / t_def if t_def else None
            point["test_false_call_rate"] = t_fc / t_good if t_good else None
        points.append(point)
    return points


def decide(scores: np.ndarray | float, threshold: float) -> np.ndarray | str:
    """``"reject"`` where ``score >= threshold``, else ``"accept"`` (a str for a scalar, else an array of str)."""
    s = np.asarray(scores, dtype=np.float64)
    out = np.where(s >= threshold, "reject", "accept")
    return str(out) if out.ndim == 0 else out


def ok_class_index(class_names: Sequence[str], ok_class: str) -> int:
    """Index of ``ok_class`` in ``class_names``.

    Raises:
        ValueError: ``ok_class`` is not one of the names (the message lists them).
    """
    names = list(class_names)
    if ok_class not in names:
        raise ValueError(f"ok_class '{ok_class}' is not a class of this run; classes: {', '.join(names)}")
    return names.index(ok_class)


def ok_vs_defect_scores(probs: np.ndarray, class_names: Sequence[str], ok_class: str) -> np.ndarray:
    """Defect scores of a classifier with an OK class: ``1 - p(ok)``.

    Args:
        probs: ``[N, K]`` class probabilities (rows sum to 1).
        class_names: the ``K`` class names.
        ok_class: the name of the good/OK class.

    Returns:
        ``[N]`` float64 scores in [0, 1], higher = more defective.

    Raises:
        ValueError: ``probs`` not ``[N, K]`` with ``K = len(class_names)``, or unknown ``ok_class``.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(class_names):
        raise ValueError(f"probs: expected shape [N, {len(class_names)}] (one column per class), got {p.shape}")
    return 1.0 - p[:, ok_class_index(class_names, ok_class)]


def is_defective_labels(y_true: np.ndarray, class_names: Sequence[str], ok_class: str) -> np.ndarray:
    """``[N]`` bool: the true class index differs from the OK class's (for :func:`operating_points`)."""
    return np.asarray(y_true) != ok_class_index(class_names, ok_class)
