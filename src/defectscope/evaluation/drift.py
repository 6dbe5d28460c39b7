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

Two channels (:class:`DriftAlarm`): a fine-tuned backbone learns to ignore what does not change
the class, e.g. global brightness: on NEU, a 40 % darkening moved its pooled features by less than
half the threshold. So the alarm also watches three **image statistics** of the model input
(:func:`image_statistics`: mean intensity, intensity standard deviation (contrast), mean absolute
gradient (sharpness)), standardised by the reference's per-statistic standard deviation, with the
same MMD test. Each channel is calibrated at ``alpha / 2`` (Bonferroni), so a window of
in-distribution images alarms in at least one channel with probability at most ``alpha``.

The reference is plain numbers (:meth:`DriftAlarm.to_dict`: lists of floats), stored in JSON
or a checkpoint without pickle.

This module holds the statistics, the fitted alarm and the window scans, so that training (the
classification task stores a reference in ``model.ckpt``) and deployment
(:mod:`defectscope.deploy.drift`: the service's sliding-window monitor, ``inspect``) import it from
the same lower layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

FORMAT = "defectscope-drift-reference"
VERSION = 1
STATISTIC = "mmd2_unbiased_rbf_median"
ALARM_FORMAT = "defectscope-drift-alarm"
ALARM_VERSION = 2
IMAGE_STATISTICS = ("mean_intensity", "std_intensity", "mean_abs_gradient")
"""Names of the columns of :func:`image_statistics` (units: intensity in [0, 1])."""


def image_statistics(images) -> np.ndarray:
    """Per-image intensity statistics of model inputs, the drift alarm's second channel.

    Args:
        images: ``[B, C, H, W]`` float in [0, 1] (the model input) or uint8 in [0, 255]
            (divided by 255); ``C`` channels are averaged into one grey image.

    Returns:
        ``float64 [B, 3]``: mean grey intensity, its standard deviation over the pixels
        (contrast) and the mean absolute difference of horizontally and vertically adjacent
        pixels (sharpness; a blurred or out-of-focus image has less), all in [0, 1] units.

    Raises:
        ValueError: not a 4-D array, or images smaller than 2 x 2 pixels.
    """
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"images: expected [B, C, H >= 2, W >= 2], got shape {x.shape}")
    grey = x.astype(np.float64).mean(1)
    if x.dtype == np.uint8:
        grey /= 255.0
    grad = 0.5 * (np.abs(np.diff(grey, axis=2)).mean((1, 2)) + np.abs(np.diff(grey, axis=1)).mean((1, 2)))
    return np.stack([grey.mean((1, 2)), grey.std((1, 2)), grad], 1)


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
        scale: ``[D]`` per-coordinate divisor applied after centring (the reference standard
            deviations when fitted with ``standardize=True``; ``None`` = no scaling).
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
    scale: np.ndarray | None = None

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
        c = x - self.mean
        if self.scale is not None:
            c = c / self.scale
        return c @ self.basis.T

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
            n_calibration: int = 2000, max_points: int = 1000, standardize: bool = False) -> "DriftReference":
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
        scale = None
        if standardize:
            scale = x.std(0)
            scale = np.where(scale > 0, scale, 1.0)
        z = (x - mean) / (scale if scale is not None else 1.0)
        _, _, vt = np.linalg.svd(z, full_matrices=False)
        k = int(min(n_components, n - 1, x.shape[1]))
        basis = vt[:k]
        keep = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
        pts = z[keep] @ basis.T
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
                   calibration=summary, scale=scale)

    def to_dict(self) -> dict:
        """Plain JSON-able numbers (lists of floats): store in ``model.ckpt`` or a ``.json`` file."""
        return {
            "format": FORMAT, "version": VERSION, "statistic": STATISTIC,
            "mean": self.mean.astype(np.float32).tolist(), "basis": self.basis.astype(np.float32).tolist(),
            "points": self.points.astype(np.float32).tolist(), "bandwidth": self.bandwidth,
            "threshold": self.threshold, "alpha": self.alpha, "window": self.window,
            "n_features": self.n_features, "n_calibration": self.n_calibration, "seed": self.seed,
            "calibration": dict(self.calibration),
            **({"scale": self.scale.astype(np.float64).tolist()} if self.scale is not None else {}),
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
        scale = None
        if d.get("scale") is not None:
            scale = arr("scale", 1)
            if scale.shape != mean.shape or not (scale > 0).all():
                raise ValueError(f"{source}: field 'scale' must be {mean.shape[0]} positive numbers, got shape {scale.shape}")
        bandwidth = float(d["bandwidth"])
        if not bandwidth > 0:
            raise ValueError(f"{source}: field 'bandwidth' must be > 0, got {bandwidth}")
        return cls(mean=mean, basis=basis, points=points, bandwidth=bandwidth, threshold=float(d["threshold"]),
                   alpha=float(d["alpha"]), window=int(d["window"]), n_features=int(d.get("n_features", len(points))),
                   n_calibration=int(d.get("n_calibration", 0)), seed=int(d.get("seed", 0)),
                   calibration=dict(d.get("calibration", {})), scale=scale)


CHANNELS = ("features", "image_statistics")
"""Channel names of :class:`DriftAlarm`: pooled backbone features ``[D]`` and :func:`image_statistics` ``[3]``."""


@dataclass
class DriftAlarm:
    """The drift alarm of a model: one :class:`DriftReference` per channel, Bonferroni-combined.

    A window alarms when any channel's MMD² exceeds that channel's threshold; each channel is
    calibrated at ``alpha / len(channels)``, so the per-window false-alarm rate is at most ``alpha``
    (Bonferroni's inequality).

    Attributes:
        channels: ``{"features": ref, "image_statistics": ref}`` (either may be missing; at least one).
        alpha: the combined false-alarm rate per window.
        window: the window size ``w`` (the same for every channel).
    """

    channels: dict[str, DriftReference]
    alpha: float
    window: int

    @classmethod
    def fit(cls, features=None, image_stats=None, window: int = 32, alpha: float = 0.01, seed: int = 0,
            n_calibration: int | None = None) -> "DriftAlarm":
        """Fit the channels that are given.

        Args:
            features: ``[N, D]`` pooled features of reference images, or ``None``.
            image_stats: ``[N, 3]`` :func:`image_statistics` of the same images, or ``None``
                (standardised per statistic).
            window, alpha, seed: as :meth:`DriftReference.fit`; each channel gets ``alpha / m``
                for ``m`` channels.
            n_calibration: resampled windows per channel (default: enough for ``alpha / m``, at least 2000).

        Raises:
            ValueError: no channel given, or a channel's ``DriftReference.fit`` error.
        """
        given = {k: v for k, v in (("features", features), ("image_statistics", image_stats)) if v is not None}
        if not given:
            raise ValueError("DriftAlarm.fit: give features, image_stats or both")
        a = alpha / len(given)
        b = n_calibration or max(2000, math.ceil((1 - a) / a) + 1)
        refs = {k: DriftReference.fit(v, window=window, alpha=a, seed=seed, n_calibration=b,
                                      standardize=(k == "image_statistics")) for k, v in given.items()}
        return cls(channels=refs, alpha=float(alpha), window=int(window))

    def project(self, inputs: dict) -> np.ndarray:
        """Compact per-image coordinates: each channel's :meth:`DriftReference.project`, concatenated
        in channel order (``float32 [B, sum of k]``; 32 + 3 for a classifier's alarm). What
        ``inspect`` stores per row; :meth:`split` takes them apart again.

        Raises:
            ValueError: a channel missing or of the wrong shape.
        """
        missing = set(self.channels) - set(inputs)
        if missing:
            raise ValueError(f"drift inputs: channel(s) {sorted(missing)} missing")
        return np.concatenate([ref.project(inputs[k]) for k, ref in self.channels.items()], 1).astype(np.float32)

    def split(self, coordinates) -> dict:
        """``[B, sum of k]`` from :meth:`project` -> ``{channel: [B, k_channel]}``.

        Raises:
            ValueError: the wrong number of columns.
        """
        q = np.asarray(coordinates, dtype=np.float64)
        ks = [r.basis.shape[0] for r in self.channels.values()]
        if q.ndim != 2 or q.shape[1] != sum(ks):
            raise ValueError(f"drift coordinates: expected [B, {sum(ks)}], got shape {q.shape}")
        return dict(zip(self.channels, np.split(q, np.cumsum(ks)[:-1], axis=1)))

    def statistics(self, window: dict, projected: bool = False) -> dict:
        """Test one window per channel.

        Args:
            window: ``{channel: [w, D_channel]}`` for every channel of the alarm (with
                ``projected``: ``[w, k_channel]`` coordinates, e.g. from :meth:`split`).

        Returns:
            ``{channel: {"statistic": MMD², "threshold", "ratio": statistic / threshold, "alarm": bool}}``.

        Raises:
            ValueError: a channel missing from ``window`` or of the wrong shape.
        """
        out = {}
        for name, ref in self.channels.items():
            if name not in window:
                raise ValueError(f"drift window: channel '{name}' missing (have {sorted(window)})")
            stat = ref.statistic_projected(np.asarray(window[name], np.float64)) if projected else ref.statistic(window[name])
            out[name] = {"statistic": stat, "threshold": ref.threshold, "ratio": stat / ref.threshold,
                         "alarm": bool(stat > ref.threshold)}
        return out

    def to_dict(self) -> dict:
        """Plain JSON-able numbers, for ``model.ckpt`` or an ONNX metadata entry."""
        return {"format": ALARM_FORMAT, "version": ALARM_VERSION, "alpha": self.alpha, "window": self.window,
                "combination": "bonferroni", "channels": {k: r.to_dict() for k, r in self.channels.items()}}

    @classmethod
    def from_dict(cls, d: dict, source: str = "drift reference") -> "DriftAlarm":
        """Rebuild from :meth:`to_dict`, or from a single :meth:`DriftReference.to_dict` (version 1:
        the ``features`` channel alone, as runs of the first drift version stored it).

        Raises:
            ValueError: wrong format, missing fields, channels of different windows (names ``source``).
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a dict, got {type(d).__name__}")
        if d.get("format") == FORMAT:
            ref = DriftReference.from_dict(d, source)
            return cls(channels={"features": ref}, alpha=ref.alpha, window=ref.window)
        if d.get("format") != ALARM_FORMAT or d.get("version") != ALARM_VERSION:
            raise ValueError(f"{source}: field 'format'/'version' is {d.get('format')!r}/{d.get('version')!r}, "
                             f"expected {ALARM_FORMAT!r}/{ALARM_VERSION} (or a {FORMAT!r} reference)")
        chans = d.get("channels")
        if not isinstance(chans, dict) or not chans or set(chans) - set(CHANNELS):
            raise ValueError(f"{source}: field 'channels' must map some of {CHANNELS} to references, got "
                             f"{sorted(chans) if isinstance(chans, dict) else type(chans).__name__}")
        refs = {k: DriftReference.from_dict(v, f"{source}: channels.{k}") for k, v in chans.items()}
        window = int(d.get("window", 0))
        if any(r.window != window for r in refs.values()):
            raise ValueError(f"{source}: the channels' windows {[r.window for r in refs.values()]} differ from field 'window' {window}")
        return cls(channels=refs, alpha=float(d["alpha"]), window=window)


def window_scan(alarm: DriftAlarm, coordinates, labels: Sequence[str] | None = None) -> dict:
    """Test consecutive non-overlapping windows of a finished stream (``inspect``'s rows in path order).

    Args:
        alarm: the fitted alarm.
        coordinates: ``[N, sum of k]`` per-image coordinates from :meth:`DriftAlarm.project`, in
            stream order.
        labels: optional ``N`` names of the images (paths); the windows report their first and last.

    Returns:
        ``{"windows": tested, "alarms": windows that alarm, "first_alarm_window": index or None,
        "max_ratio": largest MMD² / threshold, "per_window": [{"start", "ratio", "triggered_by"
        (, "first", "last")}], "window", "alpha", "images_not_tested": the tail shorter than one
        window}``. Each window is one test at the false-alarm rate ``alpha``.

    Raises:
        ValueError: wrong coordinates shape or ``labels`` of another length.
    """
    per_channel = alarm.split(coordinates)
    total = len(next(iter(per_channel.values())))
    if labels is not None and len(labels) != total:
        raise ValueError(f"window_scan: {len(labels)} labels for {total} images")
    w = alarm.window
    per = []
    for start in range(0, total - w + 1, w):
        st = alarm.statistics({k: v[start:start + w] for k, v in per_channel.items()}, projected=True)
        row = {"start": start, "ratio": round(max(v["ratio"] for v in st.values()), 4),
               "triggered_by": [k for k, v in st.items() if v["alarm"]]}
        if labels is not None:
            row.update(first=str(labels[start]), last=str(labels[start + w - 1]))
        per.append(row)
    alarms = [p for p in per if p["triggered_by"]]
    return {"windows": len(per), "alarms": len(alarms), "first_alarm_window": alarms[0]["start"] // w if alarms else None,
            "max_ratio": max((p["ratio"] for p in per), default=None), "per_window": per, "window": w,
            "alpha": alarm.alpha, "images_not_tested": total - len(per) * w}


def random_windows(alarm: DriftAlarm, coordinates, n_windows: int = 200, seed: int = 0) -> dict:
    """Test ``n_windows`` windows drawn at random (without replacement inside a window) from all images.

    Where :func:`window_scan` asks "did the stream change over time?", this asks "does the archive as
    a whole look like the reference?": random windows mix every part of the archive, so a class-sorted
    or folder-sorted archive of in-distribution images gives about ``alpha`` alarms here even though
    its path-order windows (one class each) alarm.

    Args:
        alarm: the fitted alarm.
        coordinates: ``[N, sum of k]`` from :meth:`DriftAlarm.project`, ``N >= window``.
        n_windows: windows to draw; seed: their random seed.

    Returns:
        ``{"windows", "alarms", "rate": alarms / windows, "alpha", "window", "median_ratio"}`` (empty
        counts when ``N < window``).

    Raises:
        ValueError: wrong coordinates shape.
    """
    per_channel = alarm.split(coordinates)
    total = len(next(iter(per_channel.values())))
    w = alarm.window
    if total < w or n_windows < 1:
        return {"windows": 0, "alarms": 0, "rate": None, "alpha": alarm.alpha, "window": w, "median_ratio": None}
    rng = np.random.default_rng(seed)
    hits, ratios = 0, []
    for _ in range(n_windows):
        i = rng.choice(total, w, replace=False)
        st = alarm.statistics({k: v[i] for k, v in per_channel.items()}, projected=True)
        hits += any(v["alarm"] for v in st.values())
        ratios.append(max(v["ratio"] for v in st.values()))
    return {"windows": n_windows, "alarms": hits, "rate": hits / n_windows, "alpha": alarm.alpha, "window": w,
            "median_ratio": round(float(np.median(ratios)), 4)}
