"""Drift alarm: do the images on the line still look like the training images?

Statistic: the unbiased squared **maximum mean discrepancy** (MMD², Gretton et al., "A Kernel
Two-Sample Test", JMLR 13, 2012, eq. 3) between a sliding window ``X`` of the last ``w``
incoming feature vectors and the reference sample ``Y`` of ``n`` training feature vectors::

    MMD²_u = 1/(w(w-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{a!=b} k(y_a, y_b) - 2/(wn) sum_{i,a} k(x_i, y_a)

with the RBF kernel ``k(x, y) = exp(-||x - y||² / h)`` and ``h`` the median of the squared
pairwise distances of the reference (the median heuristic, i.e. ``sigma = median distance / sqrt 2``).
Features are the model's pooled features ``[D]``, centred on the training mean and projected on
the first ``k <= 32`` principal axes of the training features (no whitening).

Why MMD and not a Mahalanobis mean shift: MMD reacts to any change of the distribution (a shift,
a new mode such as another product, a change of spread), needs no covariance inverse (unstable
with a few hundred images in 1280 dimensions), and on real NEU features kept its false-alarm
rate while Mahalanobis/whitened variants over-fitted the small principal axes: windows of new
in-distribution images then alarmed far more often than ``alpha`` (measured in docs/decisions.md).

Threshold (false-alarm rate ``alpha``, default 0.01 per window): resampling of in-distribution
windows from the reference itself, leaving each window out: ``B`` times, ``w`` reference vectors
are drawn without replacement and compared with the remaining ``n - w``; the threshold is the
``ceil((B + 1)(1 - alpha))``-th smallest of the ``B`` statistics (the finite-sample quantile of a
permutation test). Leaving the window out makes it new to the reference as the incoming images
are; the smaller reference (``n - w`` instead of ``n``) makes the threshold slightly
conservative. ``alpha`` is the chance that one window of in-distribution images alarms; a
stream checked after every image tests overlapping windows, so its chance of at least one false
alarm over a long run is larger.

The reference is plain numbers (:meth:`DriftReference.to_dict`: lists of floats), stored in JSON
or a checkpoint without pickle.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

FORMAT = "defectscope-drift-reference"
VERSION = 1
STATISTIC = "mmd2_unbiased_rbf_median"


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[len(a), len(b)]``."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _check_features(features, name: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"{name}: expected feature vectors [N, D], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} features per vector (the reference's D), got {x.shape[1]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def mmd2_unbiased(k_xx: np.ndarray, k_yy_offdiag_mean: float, k_xy: np.ndarray) -> float:
    """Unbiased MMD² (Gretton et al. 2012, eq. 3) from kernel blocks.

    Args:
        k_xx: ``[w, w]`` kernel of the window (its diagonal is ignored), ``w >= 2``.
        k_yy_offdiag_mean: mean of the reference kernel over pairs ``a != b``.
        k_xy: ``[w, n]`` kernel between window and reference.
    """
    w = k_xx.shape[0]
    return float((k_xx.sum() - np.trace(k_xx)) / (w * (w - 1)) + k_yy_offdiag_mean - 2.0 * k_xy.mean())


@dataclass
class DriftReference:
    """A compact reference of training features and the calibrated alarm threshold.

    Attributes:
        mean: ``[D]`` mean training feature.
        basis: ``[k, D]`` principal axes (rows, orthonormal), ``k <= 32``.
        points: ``[n, k]`` projected reference features.
        bandwidth: ``h`` of the RBF kernel ``exp(-d² / h)`` (median squared distance of ``points``).
        threshold: MMD² above which a full window alarms.
        alpha: the false-alarm rate per window the threshold was calibrated for.
        window: the window size ``w`` the threshold holds for.
        n_features: ``n`` of the features the reference was fitted on (before any subsampling).
        n_calibration: ``B`` resampled windows used for the threshold.
        seed: random seed of subsampling and resampling.
        calibration: summary of the in-distribution statistics (median, 0.95/0.99 quantiles, max).
    """

    mean: np.ndarray
    basis: np.ndarray
    points: np.ndarray
    bandwidth: float
    threshold: float
    alpha: float
    window: int
    n_features: int
    n_calibration: int
    seed: int
    calibration: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        k_yy = np.exp(-_sq_dists(self.points, self.points) / self.bandwidth)
        n = len(self.points)
        self._k_yy_mean = float((k_yy.sum() - n) / (n * (n - 1)))

    @property
    def dim(self) -> int:
        """``D``, the length of one feature vector."""
        return int(self.mean.shape[0])

    def project(self, features) -> np.ndarray:
        """``[B, D]`` features -> ``[B, k]`` coordinates on the principal axes."""
        x = _check_features(features, "features", self.dim)
        return (x - self.mean) @ self.basis.T

    def statistic(self, features) -> float:
        """MMD² between the window ``features`` ``[w, D]`` (``w >= 2``) and the reference.

        Raises:
            ValueError: fewer than 2 vectors, wrong ``D``, non-finite values.
        """
        return self.statistic_projected(self.project(features))

    def statistic_projected(self, q: np.ndarray) -> float:
        """:meth:`statistic` of a window already projected by :meth:`project` (``[w, k]``, ``w >= 2``)."""
        if q.ndim != 2 or len(q) < 2 or q.shape[1] != self.basis.shape[0]:
            raise ValueError(f"window: need [w >= 2, k = {self.basis.shape[0]}] projected vectors, got {q.shape}")
        return mmd2_unbiased(np.exp(-_sq_dists(q, q) / self.bandwidth), self._k_yy_mean,
                             np.exp(-_sq_dists(q, self.points) / self.bandwidth))

    @classmethod
    def fit(cls, features, window: int = 32, alpha: float = 0.01, seed: int = 0, n_components: int = 32,
            n_calibration: int = 2000, max_points: int = 1000) -> "DriftReference":
        """Build the reference from training features and calibrate the threshold.

        Args:
            features: ``[N, D]`` pooled features of the training images, ``N >= 2 * window``.
            window: sliding-window size ``w`` (incoming images per test), ``>= 2``.
            alpha: false-alarm rate per in-distribution window, in (0, 0.5).
            seed: seed of subsampling and of the calibration draws.
            n_components: principal axes kept (``k = min(n_components, N - 1, D)``).
            n_calibration: resampled windows ``B``; needs ``B >= (1 - alpha) / alpha``.
            max_points: at most this many reference points are kept (random subset) after the
                axes are fitted on all ``N``; bounds storage (``max_points * k`` floats) and time.

        Returns:
            The fitted :class:`DriftReference`.

        Raises:
            ValueError: bad shapes, too few features for the window, bad ``alpha`` or ``B``.
        """
        x = _check_features(features, "features")
        if window < 2:
            raise ValueError(f"window must be at least 2, got {window}")
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
        if n_calibration < math.ceil((1 - alpha) / alpha):
            raise ValueError(f"n_calibration={n_calibration} is too small for alpha={alpha}: "
                             f"need at least {math.ceil((1 - alpha) / alpha)}")
        n = len(x)
        if min(n, max_points) < 2 * window:
            raise ValueError(f"features: need at least 2 * window = {2 * window} reference vectors "
                             f"(and max_points >= that), got {n} (max_points {max_points})")
        rng = np.random.default_rng(seed)
        mean = x.mean(0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        k = int(min(n_components, n - 1, x.shape[1]))
        basis = vt[:k]
        keep = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
        pts = (x[keep] - mean) @ basis.T
        d = _sq_dists(pts, pts)
        m = len(pts)
        h = float(np.median(d[np.triu_indices(m, 1)]))
        if not h > 0:
            raise ValueError("features: all reference vectors are identical; no kernel bandwidth can be set")
        kern = np.exp(-d / h)
        row = kern.sum(1)
        total = kern.sum()
        stats = np.empty(n_calibration)
        r = m - window
        for b in range(n_calibration):
            a = rng.choice(m, window, replace=False)
            k_aa = kern[np.ix_(a, a)]
            s_aa = k_aa.sum()
            s_ar = row[a].sum() - s_aa
            s_rr = total - 2.0 * row[a].sum() + s_aa
            stats[b] = ((s_aa - window) / (window * (window - 1)) + (s_rr - r) / (r * (r - 1))
                        - 2.0 * s_ar / (window * r))
        stats.sort()
        rank = math.ceil((n_calibration + 1) * (1 - alpha))
        summary = {"median": float(np.median(stats)), "q95": float(np.quantile(stats, 0.95)),
                   "q99": float(np.quantile(stats, 0.99)), "max": float(stats[-1])}
        return cls(mean=mean, basis=basis, points=pts, bandwidth=h, threshold=float(stats[rank - 1]), alpha=alpha,
                   window=int(window), n_features=n, n_calibration=int(n_calibration), seed=int(seed),
                   calibration=summary)

    def to_dict(self) -> dict:
        """Plain JSON-able numbers (lists of floats): store in ``model.ckpt`` or a ``.json`` file."""
        return {
            "format": FORMAT, "version": VERSION, "statistic": STATISTIC,
            "mean": self.mean.astype(np.float32).tolist(), "basis": self.basis.astype(np.float32).tolist(),
            "points": self.points.astype(np.float32).tolist(), "bandwidth": self.bandwidth,
            "threshold": self.threshold, "alpha": self.alpha, "window": self.window,
            "n_features": self.n_features, "n_calibration": self.n_calibration, "seed": self.seed,
            "calibration": dict(self.calibration),
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "drift reference") -> "DriftReference":
        """Rebuild from :meth:`to_dict` output (lists, numpy arrays or CPU tensors are accepted).

        Args:
            d: the dict.
            source: name used in error messages (e.g. the checkpoint path).

        Raises:
            ValueError: a missing field, a wrong format tag or shapes that do not fit together
                (the message names ``source`` and the field).
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a dict, got {type(d).__name__}")
        for key in ("format", "mean", "basis", "points", "bandwidth", "threshold", "alpha", "window"):
            if key not in d:
                raise ValueError(f"{source}: missing field '{key}'")
        if d["format"] != FORMAT or d.get("version") != VERSION:
            raise ValueError(f"{source}: field 'format'/'version' is {d['format']!r}/{d.get('version')!r}, "
                             f"expected {FORMAT!r}/{VERSION}")

        def arr(key: str, ndim: int) -> np.ndarray:
            a = np.asarray(d[key], dtype=np.float64)
            if a.ndim != ndim or not np.isfinite(a).all():
                raise ValueError(f"{source}: field '{key}' must be a finite {ndim}-D array, got shape {a.shape}")
            return a

        mean, basis, points = arr("mean", 1), arr("basis", 2), arr("points", 2)
        if basis.shape[1] != mean.shape[0]:
            raise ValueError(f"{source}: field 'basis' has {basis.shape[1]} columns, expected D = {mean.shape[0]}")
        if points.shape[1] != basis.shape[0] or len(points) < 2:
            raise ValueError(f"{source}: field 'points' must be [n >= 2, k = {basis.shape[0]}], got {points.shape}")
        bandwidth = float(d["bandwidth"])
        if not bandwidth > 0:
            raise ValueError(f"{source}: field 'bandwidth' must be > 0, got {bandwidth}")
        return cls(mean=mean, basis=basis, points=points, bandwidth=bandwidth, threshold=float(d["threshold"]),
                   alpha=float(d["alpha"]), window=int(d["window"]), n_features=int(d.get("n_features", len(points))),
                   n_calibration=int(d.get("n_calibration", 0)), seed=int(d.get("seed", 0)),
                   calibration=dict(d.get("calibration", {})))


class DriftMonitor:
    """A sliding window of incoming feature vectors tested against a :class:`DriftReference`.

    Thread-safe (one lock), so a service can share one monitor between requests.

    Args:
        reference: the fitted reference; its ``window`` and ``threshold`` are used.
    """

    def __init__(self, reference: DriftReference) -> None:
        self.reference = reference
        self._buf: deque[np.ndarray] = deque(maxlen=reference.window)
        self._lock = threading.Lock()
        self._last: dict = self._state(None)
        self.n_seen = 0
        self.n_alarms = 0

    def _state(self, stat: float | None) -> dict:
        ref = self.reference
        alarm = stat is not None and stat > ref.threshold
        return {
            "status": "filling" if stat is None else ("drift" if alarm else "ok"),
            "statistic": stat,
            "threshold": ref.threshold,
            "window_fill": len(self._buf) / ref.window,
            "alarm": bool(alarm),
            "window": ref.window,
            "alpha": ref.alpha,
        }

    def update(self, features) -> dict:
        """Append ``[B, D]`` (or ``[D]``) feature vectors and test the newest full window.

        Returns:
            ``{"status": "filling" | "ok" | "drift", "statistic": MMD² or None while filling,
            "threshold", "window_fill": fraction in [0, 1], "alarm": bool, "window", "alpha",
            "n_seen": vectors seen so far, "n_alarms": updates that alarmed so far}``.

        Raises:
            ValueError: wrong feature length ``D`` or non-finite values (nothing is appended then).
        """
        x = _check_features(features, "features", self.reference.dim)
        with self._lock:
            self._buf.extend(x)
            self.n_seen += len(x)
            stat = self.reference.statistic(np.stack(self._buf)) if len(self._buf) == self.reference.window else None
            self._last = self._state(stat)
            self.n_alarms += int(self._last["alarm"])
            return self._snapshot()

    def _snapshot(self) -> dict:
        return {**self._last, "n_seen": self.n_seen, "n_alarms": self.n_alarms}

    def state(self) -> dict:
        """The result of the latest :meth:`update` (for ``GET /v1/drift``)."""
        with self._lock:
            return self._snapshot()

    def reset(self) -> None:
        """Empty the window and the counters."""
        with self._lock:
            self._buf.clear()
            self.n_seen = self.n_alarms = 0
            self._last = self._state(None)
