"""Drift alarm in deployment: the service's sliding-window :class:`DriftMonitor`.

The statistic, the fitted :class:`DriftAlarm` (stored with a classifier's run) and the window scans
of ``inspect`` live in :mod:`defectscope.evaluation.drift` (training builds the reference there too);
their names are re-exported here.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

from defectscope.evaluation.drift import (  # noqa: F401 (re-exported)
    ALARM_FORMAT,
    ALARM_VERSION,
    CHANNELS,
    FORMAT,
    IMAGE_STATISTICS,
    STATISTIC,
    VERSION,
    DriftAlarm,
    DriftReference,
    image_statistics,
    _check_features,
    mmd2_unbiased,
    random_windows,
    window_scan,
)


class DriftMonitor:
    """A sliding window of incoming images tested against a :class:`DriftAlarm`.

    Thread-safe (one lock), so a service can share one monitor between requests.

    Args:
        alarm: the fitted alarm (a :class:`DriftReference` is taken as a features-only alarm);
            its ``window`` and thresholds are used.
    """

    def __init__(self, alarm: "DriftAlarm | DriftReference") -> None:
        if isinstance(alarm, DriftReference):
            alarm = DriftAlarm(channels={"features": alarm}, alpha=alarm.alpha, window=alarm.window)
        self.alarm = alarm
        self._buf: dict[str, deque] = {k: deque(maxlen=alarm.window) for k in alarm.channels}
        self._lock = threading.Lock()
        self._last: dict = self._state(None)
        self.n_seen = 0
        self.n_alarms = 0

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels this monitor needs in :meth:`update`."""
        return tuple(self.alarm.channels)

    def _state(self, per: dict | None) -> dict:
        a = self.alarm
        fill = len(next(iter(self._buf.values()))) / a.window
        if per is None:
            return {"status": "filling", "alarm": False, "ratio": None, "triggered_by": [], "channels": {},
                    "window_fill": fill, "window": a.window, "alpha": a.alpha}
        trig = [k for k, v in per.items() if v["alarm"]]
        return {"status": "drift" if trig else "ok", "alarm": bool(trig),
                "ratio": max(v["ratio"] for v in per.values()), "triggered_by": trig,
                "channels": {k: {kk: (float(vv) if kk != "alarm" else vv) for kk, vv in v.items()} for k, v in per.items()},
                "window_fill": fill, "window": a.window, "alpha": a.alpha}

    def update(self, **inputs) -> dict:
        """Append one or more images' channel vectors and test the newest full window.

        Args:
            **inputs: per channel of the alarm, ``[B, D]`` (or ``[D]``) vectors of the same ``B``
                images, e.g. ``update(features=f, image_statistics=s)``.

        Returns:
            ``{"status": "filling" | "ok" | "drift", "alarm": bool, "ratio": the largest
            MMD² / threshold over the channels (None while filling), "triggered_by": channels that
            alarm, "channels": {name: {statistic, threshold, ratio, alarm}}, "window_fill" in [0, 1],
            "window", "alpha", "n_seen", "n_alarms"}``.

        Raises:
            ValueError: a missing channel, different counts, wrong lengths or non-finite values
                (nothing is appended then).
        """
        missing = set(self.alarm.channels) - set(inputs)
        if missing:
            raise ValueError(f"drift update: channel(s) {sorted(missing)} missing")
        arrays = {k: _check_features(inputs[k], k, self.alarm.channels[k].dim) for k in self.alarm.channels}
        counts = {len(v) for v in arrays.values()}
        if len(counts) != 1:
            raise ValueError(f"drift update: channels hold different numbers of images {[len(v) for v in arrays.values()]}")
        # each image is projected once, when it arrives; the window keeps the k-D coordinates
        projected = {k: self.alarm.channels[k].project(v) for k, v in arrays.items()}
        with self._lock:
            for k, v in projected.items():
                self._buf[k].extend(v)
            self.n_seen += counts.pop()
            full = len(next(iter(self._buf.values()))) == self.alarm.window
            per = self.alarm.statistics({k: np.stack(b) for k, b in self._buf.items()}, projected=True) if full else None
            self._last = self._state(per)
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
            for b in self._buf.values():
                b.clear()
            self.n_seen = self.n_alarms = 0
            self._last = self._state(None)
