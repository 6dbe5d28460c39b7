"""KolektorSDD (Tabernik et al., J. Intell. Manuf. 31, 2020) for unsupervised inspection.

Folder layout (``../shared/datasets/kolektorsdd``), read by :func:`defectscope.data.masks.read_manifest`::

    images/NNN.jpg     greyscale, about 500 x 1235-1285 px (W x H)
    masks/NNN.png      0/255 defect masks, same size as the image
    manifest.csv       id, split (train/val), defective (0/1), n_polygons, mask_pixels, width, height

The unsupervised protocol (:func:`anomaly_protocol`) fits on the *good* images of
the manifest's ``train`` split only and tests on every ``val`` image plus the
defective ``train`` images (never seen in fitting).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectscope.data.images import DatasetError
from defectscope.data.masks import MaskedImage, read_manifest
from defectscope.data.masks import load_mask as _load_mask_01
from defectscope.data.masks import resize_mask

#: One KolektorSDD image with its manifest row (the segmentation reader's item type).
KolektorItem = MaskedImage


def read_kolektor_manifest(root: str | Path) -> list[MaskedImage]:
    """Read ``root/manifest.csv`` (ordered as in the file) and check that every split is train/val.

    Raises:
        DatasetError: everything :func:`defectscope.data.masks.read_manifest` raises (missing
            manifest, column, image or mask; bad ``defective`` value), and a ``split`` other than
            ``train``/``val``; the message names the file, the row and the field.
    """
    items = read_manifest(root)
    for row, it in enumerate(items, start=1):
        if it.split not in ("train", "val"):
            raise DatasetError(f"{Path(root) / 'manifest.csv'}, row {row}: field 'split' is {it.split!r}; "
                               "expected 'train' or 'val'")
    return items


def anomaly_protocol(items: list[MaskedImage], calibration_fraction: float = 0.0,
                     seed: int = 0) -> dict[str, list[MaskedImage]]:
    """Split items for fitting on normal images only.

    Args:
        items: from :func:`read_kolektor_manifest`.
        calibration_fraction: share of the good ``train`` images held out of model
            fitting (used to fit the one-class SVM / the threshold on unseen normal
            images); ``0`` keeps them all for fitting.
        seed: seed of the calibration draw.

    Returns:
        ``{"fit": good train images, "calibration": held-out good train images,
        "test": every val image + the defective train images}``. No defective image
        is ever in ``fit`` or ``calibration``.

    Raises:
        DatasetError: no good training image, or an empty test set.
    """
    good_train = [it for it in items if it.split == "train" and not it.defective]
    test = [it for it in items if it.split == "val"] + [it for it in items if it.split == "train" and it.defective]
    if not good_train:
        raise DatasetError("KolektorSDD protocol: no good image in the train split")
    if not test:
        raise DatasetError("KolektorSDD protocol: empty test set")
    n_cal = int(round(calibration_fraction * len(good_train)))
    perm = np.random.default_rng(seed).permutation(len(good_train))
    cal_idx = set(perm[:n_cal].tolist())
    fit = [it for i, it in enumerate(good_train) if i not in cal_idx]
    cal = [it for i, it in enumerate(good_train) if i in cal_idx]
    return {"fit": fit, "calibration": cal, "test": test}


def load_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Read a 0/255 mask and resize it to ``size = (H, W)``.

    Returns:
        ``bool`` array ``[H, W]``; a pixel is defective when at least half of its
        area is (area resampling, then threshold 0.5; :func:`defectscope.data.masks.resize_mask`).

    Raises:
        ImageReadError: missing or undecodable mask file.
    """
    return resize_mask(_load_mask_01(path), size).astype(bool)
