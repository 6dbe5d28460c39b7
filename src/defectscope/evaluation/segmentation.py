"""Segmentation metrics: Dice, IoU (Kaggle convention), pixel AUROC, image-level AP/AUROC.

Conventions (Kaggle "Severstal: Steel Defect Detection"): Dice is computed per
image and class, ``2 |P ∩ T| / (|P| + |T|)``, and an empty prediction on an
empty mask scores **1**; the mean Dice averages over all (image, class) pairs.
IoU ``|P ∩ T| / |P ∪ T|`` uses the same convention. The image-level "defect
present" score of an image comes from its mask probabilities (:func:`image_scores`:
the maximum over pixels and classes by default); image AP (average precision) and
AUROC are computed from it against "the true mask is non-empty".
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter
from sklearn.metrics import average_precision_score, roc_auc_score

IMAGE_SCORE_METHODS = ("max", "blur_max", "top_mean")


def dice_per_image(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Dice of binary masks per image and class.

    Args:
        pred, true: ``[N, K, H, W]`` (non-zero = defect), same shape.

    Returns:
        ``[N, K]`` float64 in [0, 1]; 1 where both masks are empty.

    Raises:
        ValueError: shapes differ or are not 4-D.
    """
    p, t = _check(pred, true)
    inter = (p & t).sum(axis=(2, 3)).astype(np.float64)
    total = p.sum(axis=(2, 3)).astype(np.float64) + t.sum(axis=(2, 3))
    return np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))


def iou_per_image(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """IoU (Jaccard) of binary masks per image and class, ``[N, K]``; 1 where both are empty.

    Raises:
        ValueError: shapes differ or are not 4-D.
    """
    p, t = _check(pred, true)
    inter = (p & t).sum(axis=(2, 3)).astype(np.float64)
    union = (p | t).sum(axis=(2, 3)).astype(np.float64)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def _check(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape or pred.ndim != 4:
        raise ValueError(f"masks must both be [N, K, H, W]; got {pred.shape} and {true.shape}")
    return pred != 0, true != 0


def image_scores(probs: np.ndarray, method: str = "max", sigma: float = 2.0, top_fraction: float = 0.001) -> np.ndarray:
    """"Defect present" score per image from its mask probabilities, ``[N, K, H, W]`` -> ``[N]``.

    Methods:
        ``max``: the largest pixel probability over pixels and classes.
        ``blur_max``: the largest value after a Gaussian blur of each probability map
            (``sigma`` in pixels of the map), as anomaly maps are scored in PatchCore /
            anomalib: a lone hot pixel counts less than a hot region.
        ``top_mean``: the mean of the ``top_fraction`` highest pixel probabilities per
            class (at least one pixel), maximum over classes.

    Raises:
        ValueError: unknown method, or ``probs`` is not 4-D.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if method not in IMAGE_SCORE_METHODS:
        raise ValueError(f"image score method must be one of {IMAGE_SCORE_METHODS}; got {method!r}")
    if probs.ndim != 4:
        raise ValueError(f"probs must be [N, K, H, W]; got shape {probs.shape}")
    if not len(probs):
        return np.zeros(0)
    if method == "blur_max":
        probs = gaussian_filter(probs, sigma=(0, 0, sigma, sigma), mode="nearest")
    if method == "top_mean":
        flat = probs.reshape(*probs.shape[:2], -1)
        k = max(1, int(round(top_fraction * flat.shape[-1])))
        return np.partition(flat, -k, axis=-1)[..., -k:].mean(axis=-1).max(axis=1)
    return probs.reshape(len(probs), -1).max(axis=1)


def segmentation_metrics(probs: np.ndarray, true: np.ndarray, threshold: float = 0.5,
                         max_auroc_pixels: int = 4_000_000, seed: int = 0, score_method: str = "max") -> dict:
    """All segmentation figures of a held-out split.

    Args:
        probs: mask probabilities ``[N, K, H, W]`` in [0, 1].
        true: true masks ``[N, K, H, W]`` (0/1).
        threshold: probability at or above which a pixel is predicted defective.
        score_method: how :func:`image_scores` turns a mask into the image-level score.
        max_auroc_pixels: pixel AUROC uses a fixed random subset of this many pixels
            when there are more (seeded, so repeatable); all pixels otherwise.

    Returns:
        dict with ``n``, ``n_defective``, ``threshold``, ``dice`` and ``iou`` (means over
        all image-class pairs, Kaggle convention), ``dice_defective``/``iou_defective``
        (means over images with a non-empty true mask), ``pixel_auroc``, ``image_ap``,
        ``image_auroc`` (``None`` when only one kind of image/pixel is present),
        ``image_scores`` and ``per_image_dice``.

    Raises:
        ValueError: shapes differ.
    """
    probs = np.asarray(probs, dtype=np.float32)
    true = np.asarray(true)
    pred = probs >= threshold
    dice = dice_per_image(pred, true)
    iou = iou_per_image(pred, true)
    defective = true.reshape(len(true), -1).any(axis=1)
    scores = image_scores(probs, score_method)
    flat_t = (true != 0).reshape(-1)
    flat_p = probs.reshape(-1)
    if flat_t.size > max_auroc_pixels:
        idx = np.random.default_rng(seed).choice(flat_t.size, max_auroc_pixels, replace=False)
        flat_t, flat_p = flat_t[idx], flat_p[idx]
    two_pix = flat_t.any() and not flat_t.all()
    two_img = defective.any() and not defective.all()
    return {
        "n": int(len(true)),
        "n_defective": int(defective.sum()),
        "threshold": threshold,
        "image_score": score_method,
        "dice": float(dice.mean()) if dice.size else None,
        "iou": float(iou.mean()) if iou.size else None,
        "dice_defective": float(dice[defective].mean()) if defective.any() else None,
        "iou_defective": float(iou[defective].mean()) if defective.any() else None,
        "pixel_auroc": float(roc_auc_score(flat_t, flat_p)) if two_pix else None,
        "image_ap": float(average_precision_score(defective, scores)) if two_img else None,
        "image_auroc": float(roc_auc_score(defective, scores)) if two_img else None,
        "image_scores": [round(float(s), 6) for s in scores],
        "per_image_dice": [round(float(d), 6) for d in dice.mean(axis=1)],
    }
