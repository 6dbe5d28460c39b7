"""The MVTec AD folder layout (Bergmann et al., "MVTec AD - A Comprehensive Real-World Dataset for
Unsupervised Anomaly Detection", CVPR 2019) for the anomaly task.

Layout of one category (``bottle/``, ``metal_nut/``, ... or a user's own folder)::

    train/good/000.png                      normal images, the only ones a model is fitted on
    test/good/000.png                       normal test images
    test/<defect>/000.png                   defective test images, one folder per defect type
    ground_truth/<defect>/000_mask.png      0/255 mask of test/<defect>/000.png (optional; no masks
                                            for test/good: a good image's mask is empty)

Items are :class:`MVTecItem`, a :class:`~defectscope.data.masks.MaskedImage` (the type of the
KolektorSDD anomaly reader, ``KolektorItem``) with ``split`` ``train``/``test``, ``mask`` ``None``
where the image has no mask file (every good image, and defects when ``ground_truth/`` is absent),
and the extra field ``defect_type``. :func:`mvtec_protocol` returns the same
``{"fit", "calibration", "test"}`` dict as :func:`defectscope.data.kolektor.anomaly_protocol`, and
:func:`load_item_mask` replaces ``kolektor.load_mask(item.mask, size)`` (an empty mask for ``None``).

MVTec AD itself cannot be obtained on these machines; :func:`mvtec_from_kolektor` writes the same
layout from KolektorSDD images for tests and the README.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectscope.data.images import IMAGE_SUFFIXES, DatasetError
from defectscope.data.masks import MaskedImage, load_mask, resize_mask


@dataclass(frozen=True)
class MVTecItem(MaskedImage):
    """One MVTec-layout image.

    Attributes (beyond :class:`~defectscope.data.masks.MaskedImage`):
        id: ``<split>/<defect_type>/<stem>`` (unique: MVTec reuses ``000`` in every folder).
        mask: the ``ground_truth`` file, or ``None`` (good images; defects without masks).
        split: ``train`` or ``test``.
        defective: ``defect_type != "good"``.
        defect_type: the ``test/`` sub-folder name (``good`` for normal images).
    """

    defect_type: str = "good"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def read_mvtec(root: str | Path, require_masks: bool = False) -> list[MVTecItem]:
    """List the images of an MVTec AD category folder.

    Args:
        root: the category folder (holding ``train/``, ``test/``, optionally ``ground_truth/``).
        require_masks: every defective image must have its mask (pixel metrics).

    Returns:
        Train items (``train/good``) then test items (``test/good`` first, then defect types
        alphabetically), each folder sorted by file name.

    Raises:
        DatasetError: ``train/good`` missing or without images; ``test/`` missing or empty;
            ``ground_truth/<defect>/`` present but ``<stem>_mask.png`` missing for an image (both
            named); a mask without its image; ``require_masks`` and a defect type without masks.
    """
    root = Path(root)
    good = root / "train" / "good"
    if not good.is_dir():
        raise DatasetError(f"{root}: train/good/ not found; expected the MVTec AD layout "
                           "train/good, test/<defect>, ground_truth/<defect>/<name>_mask.png")
    items = [MVTecItem(f"train/good/{p.stem}", p, None, "train", False, defect_type="good") for p in _images(good)]
    if not items:
        raise DatasetError(f"{good}: no image files")
    test = root / "test"
    if not test.is_dir():
        raise DatasetError(f"{root}: test/ not found (test/good and test/<defect> folders expected)")
    types = sorted(d.name for d in test.iterdir() if d.is_dir() and not d.name.startswith("."))
    types = (["good"] if "good" in types else []) + [t for t in types if t != "good"]
    n_test = 0
    for t in types:
        gt = root / "ground_truth" / t
        files = _images(test / t)
        masks = {p.name for p in gt.iterdir()} if gt.is_dir() else set()
        for p in files:
            mask = None
            if t != "good" and gt.is_dir():
                mask = gt / f"{p.stem}_mask.png"
                if not mask.is_file():
                    raise DatasetError(f"{p}: mask {mask} not found (ground_truth/{t}/ exists, so every image of "
                                       f"test/{t}/ needs <name>_mask.png)")
                masks.discard(mask.name)
            elif t != "good" and require_masks:
                raise DatasetError(f"{root}: ground_truth/{t}/ missing; pixel metrics need a mask for every defective image")
            items.append(MVTecItem(f"test/{t}/{p.stem}", p, mask, "test", t != "good", defect_type=t))
            n_test += 1
        stray = sorted(m for m in masks if m.endswith("_mask.png"))
        if stray:
            raise DatasetError(f"{gt / stray[0]}: mask without an image test/{t}/{stray[0][:-len('_mask.png')]}.* "
                               f"({len(stray)} such masks)")
    if n_test == 0:
        raise DatasetError(f"{test}: no test images")
    return items


def has_pixel_masks(items: list[MVTecItem]) -> bool:
    """``True`` when every defective item has a mask file (pixel AUROC can be computed)."""
    return all(it.mask is not None for it in items if it.defective)


def mvtec_protocol(items: list[MVTecItem], calibration_fraction: float = 0.0,
                   seed: int = 0) -> dict[str, list[MVTecItem]]:
    """The MVTec AD protocol in the shape of :func:`defectscope.data.kolektor.anomaly_protocol`.

    Args:
        items: from :func:`read_mvtec`.
        calibration_fraction: share of ``train/good`` held out of model fitting (to fit the
            one-class SVM / the threshold on unseen normal images); 0 keeps all for fitting.
        seed: seed of the calibration draw.

    Returns:
        ``{"fit": train/good minus calibration, "calibration": held-out train/good,
        "test": every test image}``; no defective image is in ``fit`` or ``calibration``.

    Raises:
        DatasetError: a defective image in ``train`` (impossible from :func:`read_mvtec`), no
            training image, or an empty test set.
    """
    train = [it for it in items if it.split == "train"]
    if any(it.defective for it in train):
        raise DatasetError("MVTec protocol: a defective image is in train/; only good images may be fitted on")
    test = [it for it in items if it.split == "test"]
    if not train:
        raise DatasetError("MVTec protocol: no train/good image")
    if not test:
        raise DatasetError("MVTec protocol: empty test set")
    n_cal = int(round(calibration_fraction * len(train)))
    perm = np.random.default_rng(seed).permutation(len(train))
    cal = set(perm[:n_cal].tolist())
    return {"fit": [it for i, it in enumerate(train) if i not in cal],
            "calibration": [it for i, it in enumerate(train) if i in cal], "test": test}


def load_item_mask(item: MaskedImage, size: tuple[int, int]) -> np.ndarray:
    """The mask of ``item`` resized to ``size = (H, W)``, ``bool [H, W]``; all False when ``item.mask`` is None.

    A pixel is defective when at least half of its area is (:func:`defectscope.data.masks.resize_mask`).

    Raises:
        ImageReadError: an undecodable mask file.
    """
    if item.mask is None:
        return np.zeros(size, dtype=bool)
    return resize_mask(load_mask(item.mask), size).astype(bool)


def mvtec_from_kolektor(ksdd_root: str | Path, out: str | Path, n_train_good: int = 40, n_test_good: int = 20,
                        n_defect: int = 20, link: bool = True) -> Path:
    """Write an MVTec-layout folder from KolektorSDD images (tests, README; MVTec AD is not available here).

    Good images of the manifest's ``train`` split go to ``train/good`` (the first ``n_train_good``)
    and ``test/good`` (the next ``n_test_good``); the first ``n_defect`` defective images (any split)
    go to ``test/defect`` with their masks as ``ground_truth/defect/<id>_mask.png``. File names keep
    the KolektorSDD id (``005.jpg``).

    Args:
        ksdd_root: folder with ``manifest.csv``, ``images/``, ``masks/``.
        out: folder to create (must not exist or be empty).
        n_train_good, n_test_good, n_defect: how many images of each part.
        link: symbolic links (fast, no copy) instead of copies.

    Returns:
        ``out``.

    Raises:
        DatasetError: missing manifest or files, ``out`` not empty, or fewer images than asked.
    """
    ksdd_root, out = Path(ksdd_root), Path(out)
    man = ksdd_root / "manifest.csv"
    if not man.is_file():
        raise DatasetError(f"{man}: KolektorSDD manifest not found")
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: exists and is not empty")
    with man.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    good = [r["id"] for r in rows if r["defective"] == "0" and r["split"] == "train"]
    bad = [r["id"] for r in rows if r["defective"] == "1"]
    if len(good) < n_train_good + n_test_good or len(bad) < n_defect:
        raise DatasetError(f"{man}: {len(good)} good train / {len(bad)} defective images; asked for "
                           f"{n_train_good}+{n_test_good} good and {n_defect} defective")

    def put(src: Path, dst: Path) -> None:
        if not src.is_file():
            raise DatasetError(f"{src}: file named by {man} is missing")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if link:
            dst.symlink_to(src.resolve())
        else:
            shutil.copy2(src, dst)

    for i, sid in enumerate(good[: n_train_good + n_test_good]):
        part = "train/good" if i < n_train_good else "test/good"
        put(ksdd_root / "images" / f"{sid}.jpg", out / part / f"{sid}.jpg")
    for sid in bad[:n_defect]:
        put(ksdd_root / "images" / f"{sid}.jpg", out / "test" / "defect" / f"{sid}.jpg")
        put(ksdd_root / "masks" / f"{sid}.png", out / "ground_truth" / "defect" / f"{sid}_mask.png")
    return out
