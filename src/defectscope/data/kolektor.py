"""KolektorSDD (Tabernik et al., J. Intell. Manuf. 31, 2020) for unsupervised inspection.

Folder layout (``../shared/datasets/kolektorsdd``)::

    images/NNN.jpg     greyscale, about 500 x 1235-1285 px (W x H)
    masks/NNN.png      0/255 defect masks, same size as the image
    manifest.csv       id, split (train/val), defective (0/1), n_polygons, mask_pixels, width, height

The unsupervised protocol (:func:`anomaly_protocol`) fits on the *good* images of
the manifest's ``train`` split only and tests on every ``val`` image plus the
defective ``train`` images (never seen in fitting). This module only reads what
the anomaly task needs; a general masks reader is kept apart from it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from defectscope.data.images import DatasetError, ImageReadError

MANIFEST_FIELDS = ("id", "split", "defective")


@dataclass(frozen=True)
class KolektorItem:
    """One KolektorSDD image with its manifest row.

    Attributes:
        id: image id (file stem, e.g. ``"042"``).
        split: ``train`` or ``val`` (the source's split).
        defective: ``True`` if the image holds a defect (its mask is not empty).
        image: path of the image file.
        mask: path of the 0/255 mask file.
    """

    id: str
    split: str
    defective: bool
    image: Path
    mask: Path


def read_kolektor_manifest(root: str | Path) -> list[KolektorItem]:
    """Read ``root/manifest.csv`` into items (ordered as in the file).

    Raises:
        DatasetError: missing folder/manifest, a missing column, a split other than
            train/val, a ``defective`` value other than 0/1, or a listed image that
            does not exist; the message names the file, the row and the field.
    """
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise DatasetError(f"{manifest}: KolektorSDD manifest not found (expected id,split,defective,... columns)")
    with manifest.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [f for f in MANIFEST_FIELDS if f not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{manifest}: missing column(s) {missing}; found {reader.fieldnames}")
        items = []
        for line, row in enumerate(reader, start=2):
            if row["split"] not in ("train", "val"):
                raise DatasetError(f"{manifest}, line {line}: field 'split' is {row['split']!r}; expected 'train' or 'val'")
            if row["defective"] not in ("0", "1"):
                raise DatasetError(f"{manifest}, line {line}: field 'defective' is {row['defective']!r}; expected 0 or 1")
            image = root / "images" / f"{row['id']}.jpg"
            if not image.is_file():
                raise DatasetError(f"{manifest}, line {line}: image {image} listed but not found")
            items.append(KolektorItem(row["id"], row["split"], row["defective"] == "1", image,
                                      root / "masks" / f"{row['id']}.png"))
    if not items:
        raise DatasetError(f"{manifest}: no rows")
    return items


def anomaly_protocol(items: list[KolektorItem], calibration_fraction: float = 0.0,
                     seed: int = 0) -> dict[str, list[KolektorItem]]:
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
        area is (area resampling, then threshold 0.5).

    Raises:
        ImageReadError: missing or undecodable mask file.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            m = im.convert("L")
            small = m.resize((size[1], size[0]), Image.BOX)
    except FileNotFoundError as exc:
        raise ImageReadError(f"{path}: mask file not found") from exc
    except (OSError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot be decoded as a mask image ({exc})") from exc
    return np.asarray(small, dtype=np.float32) >= 127.5
