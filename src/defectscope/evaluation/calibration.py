"""Calibration of classifier probabilities: expected calibration error, temperature scaling, reliability diagram.

- **ECE** (Naeini et al. 2015; Guo et al., "On Calibration of Modern Neural Networks", ICML 2017,
  eq. 3): top-label confidences ``conf_i = max_k p_ik`` go into ``M = 15`` equal-width bins
  ``B_m = ((m - 1) / M, m / M]`` (bin 1 also holds confidence 0); ``ECE = sum_m |B_m| / N *
  |acc(B_m) - conf(B_m)|`` with ``acc`` the fraction of correct top-1 predictions and ``conf`` the
  mean confidence of the bin. It agrees with ``torchmetrics``' ``multiclass_calibration_error``
  (``norm="l1"``) except for confidences exactly on a bin edge (torchmetrics bins are ``[lo, hi)``).
- **Temperature scaling** (Guo et al. 2017, section 4.2): ``p = softmax(z / T)`` with one scalar
  ``T > 0`` fitted on validation logits by minimising the negative log-likelihood. The NLL is
  convex in ``1 / T``, so a bounded scalar search over ``log T`` (scipy's Brent method) finds the
  global minimum. Top-1 predictions do not change. When a model only gives probabilities, ``log p``
  serves as logits (``softmax(log p) = p``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

N_BINS = 15
#: search range of the fitted temperature
T_MIN, T_MAX = 0.05, 50.0


def _check_probs(probs: np.ndarray, y_true: np.ndarray, name: str = "probs") -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"{name}: expected [N, K] with K >= 2 classes, got shape {p.shape}")
    if y.shape != (p.shape[0],):
        raise ValueError(f"y_true: expected shape ({p.shape[0]},) like {name}, got {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1] or not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"y_true: expected integer class indices in [0, {p.shape[1] - 1}]")
    if not np.isfinite(p).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return p, y.astype(np.int64)


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per-bin counts, accuracy and mean confidence of the top-label (the data of the diagram).

    Args:
        probs: ``[N, K]`` probabilities.
        y_true: ``[N]`` class indices.
        n_bins: number of equal-width confidence bins on [0, 1].

    Returns:
        ``{"edges": [n_bins + 1], "count": [n_bins], "accuracy": [n_bins], "confidence": [n_bins]}``;
        empty bins have accuracy and confidence NaN.
    """
    p, y = _check_probs(probs, y_true)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)  # (lo, hi] bins
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
    return {"edges": edges, "count": count, "accuracy": acc, "confidence": mean_conf}


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width bins (Guo et al. 2017, eq. 3).

    Args:
        probs: ``[N, K]`` class probabilities.
        y_true: ``[N]`` integer class indices.
        n_bins: default 15.

    Returns:
        ECE in [0, 1].

    Raises:
        ValueError: shapes, labels or values not as described.
    """
    b = reliability_bins(probs, y_true, n_bins)
    n = b["count"].sum()
    if n == 0:
        raise ValueError("probs: no sample to measure the calibration error on")
    used = b["count"] > 0
    return float((b["count"][used] / n * np.abs(b["accuracy"][used] - b["confidence"][used])).sum())


def _check_logits(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits: expected [N, K] with K >= 2 classes, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits: contains NaN or infinite values (for probabilities use log(p) clipped above 0)")
    return z


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)`` ([N, K], [N]), in nats."""
    z = _check_logits(logits)
    y = np.asarray(y_true, dtype=np.int64)
    return float(-log_softmax(z / temperature, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(val_logits: np.ndarray, val_y: np.ndarray) -> float:
    """Temperature ``T`` minimising the validation NLL of ``softmax(z / T)`` (Guo et al. 2017, sec. 4.2).

    Args:
        val_logits: ``[N, K]`` validation logits (or ``log`` of probabilities).
        val_y: ``[N]`` integer class indices.

    Returns:
        ``T`` in ``[T_MIN, T_MAX]`` = [0.05, 50]; ``T > 1`` softens over-confident predictions.

    Raises:
        ValueError: bad shapes or values, or fewer than 2 samples.
    """
    z = _check_logits(val_logits)
    _, y = _check_probs(softmax(z, axis=1), val_y, "val_logits")
    if len(y) < 2:
        raise ValueError(f"val_logits: need at least 2 samples to fit a temperature, got {len(y)}")
    rows = np.arange(len(y))

    def objective(log_t: float) -> float:
        return float(-log_softmax(z / np.exp(log_t), axis=1)[rows, y].mean())

    res = minimize_scalar(objective, bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


def apply_temperature(logits, temperature: float):
    """Calibrated probabilities ``softmax(logits / temperature)``.

    Args:
        logits: ``[N, K]`` numpy array or torch tensor (also ``[K]``).
        temperature: the fitted ``T > 0``.

    Returns:
        Probabilities of the same type and shape as ``logits``.

    Raises:
        ValueError: ``temperature <= 0`` or not finite.
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    try:
        import torch

        if isinstance(logits, torch.Tensor):
            return torch.softmax(logits / temperature, dim=-1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)


def logits_from_probs(probs: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``log(max(p, eps))``: logits that give back ``probs`` under softmax, for models that only output probabilities."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), eps, None))


def calibrate(val_logits: np.ndarray, val_y: np.ndarray, eval_logits: np.ndarray | None = None,
              eval_y: np.ndarray | None = None, n_bins: int = N_BINS) -> dict:
    """Fit a temperature on validation and measure ECE and NLL before and after.

    Args:
        val_logits, val_y: ``[N, K]`` and ``[N]`` of the validation part (the fit uses only these).
        eval_logits, eval_y: the part to measure on (the test part); default: the validation part.
        n_bins: ECE bins (15).

    Returns:
        ``{"temperature", "ece_before", "ece_after", "nll_before", "nll_after", "n_bins",
        "measured_on"}`` with ``measured_on`` ``"test"`` or ``"validation"``.
    """
    if (eval_logits is None) != (eval_y is None):
        raise ValueError("eval_logits and eval_y must be given together")
    t = fit_temperature(val_logits, val_y)
    z, y, where = (val_logits, val_y, "validation") if eval_logits is None else (eval_logits, eval_y, "test")
    z = _check_logits(z)
    return {
        "temperature": t,
        "ece_before": expected_calibration_error(softmax(z, axis=1), y, n_bins),
        "ece_after": expected_calibration_error(apply_temperature(z, t), y, n_bins),
        "nll_before": nll(z, y),
        "nll_after": nll(z, y, t),
        "n_bins": n_bins,
        "measured_on": where,
    }


def plot_reliability_diagram(probs_before: np.ndarray, probs_after: np.ndarray | None, y_true: np.ndarray,
                             path: str | Path, n_bins: int = N_BINS, temperature: float | None = None,
                             title: str = "Reliability diagram") -> Path:
    """Reliability diagram (accuracy vs confidence per bin) before and after temperature scaling, side by side.

    Each panel shows the bin accuracy as bars, the diagonal of perfect calibration, the gap to the
    bin's mean confidence in red, the share of samples per bin as a grey line, and the ECE in the
    title. ``probs_after=None`` draws one panel. Written atomically as PNG (matplotlib, Agg).

    Returns:
        ``Path(path)``.
    """
    from defectscope.evaluation.plots import plt, save_figure

    panels = [("before", probs_before)] + ([("after T = %.2f" % temperature if temperature else "after", probs_after)]
                                          if probs_after is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    for ax, (name, probs) in zip(axes[0], panels):
        b = reliability_bins(probs, y_true, n_bins)
        centers = (b["edges"][:-1] + b["edges"][1:]) / 2
        width = 1.0 / n_bins
        used = b["count"] > 0
        ax.bar(centers[used], b["accuracy"][used], width=width * 0.95, color="#4c72b0", edgecolor="k", lw=0.4,
               label="accuracy")
        gap_lo = np.minimum(b["accuracy"], b["confidence"])[used]
        gap_hi = np.maximum(b["accuracy"], b["confidence"])[used]
        ax.bar(centers[used], gap_hi - gap_lo, bottom=gap_lo, width=width * 0.95, color="#dd4444", alpha=0.45,
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.plot(centers, b["count"] / max(b["count"].sum(), 1), color="0.5", lw=1, marker=".", label="share of samples")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-label probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {expected_calibration_error(probs, y_true, n_bins):.4f}")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    return save_figure(fig, path)
