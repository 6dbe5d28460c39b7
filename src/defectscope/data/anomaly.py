"""The images an anomaly run reads (:func:`protocol_items`): the KolektorSDD protocol
(:func:`defectscope.data.kolektor.anomaly_protocol`) or the MVTec AD one
(:func:`defectscope.data.mvtec.mvtec_protocol`), subset for quick runs.

The settings come from the recipe's ``data`` block (:class:`defectscope.recipes.anomaly.AnomalyData`:
``root``, ``layout``, ``calibration_fraction``, ``max_fit``, ``max_test``); any object with those
attributes does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from defectscope.data.kolektor import KolektorItem, anomaly_protocol, read_kolektor_manifest


def protocol_items(d: Any, seed: int) -> tuple[list[KolektorItem], np.ndarray]:
    """The images the task reads, in manifest order, and which good ones are calibration images.

    :func:`defectscope.data.kolektor.anomaly_protocol` draws the calibration images (seed
    ``seed``); ``max_fit`` keeps the first ``max_fit`` fitting and ``max(2, max_fit // 4)``
    calibration images, ``max_test`` a proportional subset of the protocol's test images.

    Returns:
        ``(items, calibration [N] bool)``.

    Raises:
        DatasetError: a bad manifest (named), no good train image or an empty test set.
    """
    if d.layout == "mvtec":
        from defectscope.data.mvtec import mvtec_protocol, read_mvtec

        items = read_mvtec(d.root)
        parts = mvtec_protocol(items, d.calibration_fraction, seed)
    else:
        items = read_kolektor_manifest(d.root)
        parts = anomaly_protocol(items, d.calibration_fraction, seed)
    fit, cal = parts["fit"], parts["calibration"]
    if d.max_fit:
        fit = fit[: d.max_fit]
        cal = cal[: max(2, d.max_fit // 4)] if cal else []
    test = _subset_test(parts["test"], d.max_test, seed)
    keep = {id(it) for it in fit + cal + test}
    kept = [it for it in items if id(it) in keep]
    cal_ids = {id(it) for it in cal}
    return kept, np.array([id(it) in cal_ids for it in kept], dtype=bool)


def _subset_test(items: list[KolektorItem], n: int | None, seed: int) -> list[KolektorItem]:
    if n is None or n >= len(items):
        return items
    rng = np.random.default_rng(seed)
    bad = [it for it in items if it.defective]
    good = [it for it in items if not it.defective]
    nb = max(1, min(len(bad), round(n * len(bad) / len(items))))
    keep = {id(bad[i]) for i in rng.permutation(len(bad))[:nb]} | {id(good[i]) for i in rng.permutation(len(good))[: n - nb]}
    return [it for it in items if id(it) in keep]
