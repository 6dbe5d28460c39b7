"""Recognise the layout of a data folder the project has never seen, and the task it implies.

:func:`guess_layout` looks at the folder's structure (never decodes an image; it reads image
headers for the sizes and small text files such as a manifest's first line) and returns a
:class:`LayoutGuess` whose ``layout`` is one the existing readers understand:

==============  ================  ==========================================================================
task            layout            what is found, and the reader
==============  ================  ==========================================================================
classification  ``folder``        ``ROOT/<class>/*.png`` (at least 2 class folders holding images; empty
                                  class folders are listed); :func:`~defectscope.data.images.discover_labelled_images`
classification  ``prefix``        ``ROOT/[images/]<class>_<n>.jpg`` (NEU-CLS: at least 2 classes, numeric
                                  ``<n>``); :func:`~defectscope.data.images.discover_labelled_images`
segmentation    ``kolektor``      ``manifest.csv`` (id, split, defective) + ``images/`` + ``masks/``;
                                  :func:`~defectscope.data.masks.read_manifest`
segmentation    ``images_masks``  ``images/<stem>.*`` + ``masks/<stem>.png``, no manifest (``details``
                                  lists the pairs; the manifest reader needs a manifest written for them)
segmentation    ``rle_csv``       a csv with header ``ImageId,ClassId,EncodedPixels`` (Severstal) and an
                                  image folder; :func:`~defectscope.data.rle.read_rle_csv`
detection       ``voc``           ``images/`` (or ``JPEGImages/``) + ``annotations/`` (or ``Annotations/``)
                                  with Pascal VOC ``.xml``; :func:`~defectscope.data.boxes.read_voc_folder`
detection       ``coco``          a ``.json`` with ``images``, ``annotations``, ``categories`` (``ROOT`` may be
                                  the file itself); :func:`~defectscope.data.boxes.read_coco`
anomaly         ``mvtec``         MVTec AD: ``train/good``, ``test/<defect>``, optional
                                  ``ground_truth/<defect>/<name>_mask.png``; :func:`~defectscope.data.mvtec.read_mvtec`
weld            ``weld``          ``manifest.json`` with ``"format": "defectscope-weld/..."``;
                                  :func:`~defectscope.data.weld.format.read_weld_dataset`
==============  ================  ==========================================================================

Precedence (several signals at once; documented because they are decisions, not accidents):

- A weld manifest owns its ``images/`` and ``masks/`` folders: ``weld``.
- A KolektorSDD ``manifest.csv`` describes its ``images/`` + ``masks/`` pairs: ``kolektor``.
- **NEU-DET rule**: a folder with VOC boxes whose image names also carry class prefixes
  (``../shared/datasets/neu-det``: ``images/crazing_1.jpg`` + ``annotations/crazing_1.xml``) is
  ``detection``/``voc``: the boxes are the richer, deliberately made labels and they hold the
  prefix class too (:func:`~defectscope.data.boxes.image_class`), whereas a prefix may be a mere
  naming habit. ``details["alternatives"]`` records that ``--task classification`` (``prefix``
  layout) reads the same folder as an image classification set. COCO beside prefixes: same rule.
- Any other combination (e.g. VOC annotations *and* class folders, class folders *and* an MVTec
  tree, a COCO json *and* VOC xml) is ambiguous: :class:`~defectscope.data.images.DatasetError`
  lists every signal found and asks for ``--task`` / a cleaner folder. So does a folder where
  nothing is recognised (the message lists what is there).
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from defectscope.data.images import IMAGE_SUFFIXES, DatasetError

#: Sub-folder names that are structure, never classes.
STRUCTURAL_DIRS = {"images", "jpegimages", "annotations", "masks", "ground_truth", "train", "test", "val",
                   "spectra", "labels"}
TASKS = ("classification", "segmentation", "detection", "anomaly", "weld")
_PREFIX_RX = re.compile(r"^(?P<cls>.+)_(?P<n>\d+)$")


@dataclass
class LayoutGuess:
    """What :func:`guess_layout` found.

    Attributes:
        task: ``classification``, ``segmentation``, ``detection``, ``anomaly`` or ``weld``.
        layout: the reader's layout name (see the module table).
        evidence: human-readable lines, one per signal used (printed by ``train``).
        details: ``root`` (the path to put in the recipe's ``data.root``), ``n_images``,
            ``class_counts`` (``{name: images}``; for segmentation/anomaly ``good``/``defective`` or
            defect types), ``image_hw`` (median ``(H, W)`` in pixels over up to 64 image headers),
            and layout-specific fields (``empty_classes``, ``csv``, ``json``, ``alternatives``, ...).
    """

    task: str
    layout: str
    evidence: list[str]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Signal:
    task: str
    layout: str
    evidence: list[str]
    details: dict[str, Any]


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))


def _find_dir(root: Path, *names: str) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def median_hw(paths: list[Path], sample: int = 64) -> tuple[int, int] | None:
    """Median ``(H, W)`` in pixels of up to ``sample`` evenly spaced image files (headers only).

    Unreadable files are skipped (:mod:`defectscope.data.check` names them); ``None`` when none reads.
    """
    if not paths:
        return None
    idx = np.unique(np.linspace(0, len(paths) - 1, min(sample, len(paths))).round().astype(int))
    sizes = []
    for i in idx:
        try:
            with Image.open(paths[i]) as im:
                sizes.append((im.height, im.width))
        except Exception:  # noqa: BLE001 - any unreadable header is simply not sampled
            continue
    if not sizes:
        return None
    a = np.array(sizes)
    return int(np.median(a[:, 0])), int(np.median(a[:, 1]))


def _prefix_classes(files: list[Path]) -> Counter | None:
    """Class counts when every file is ``<class>_<n>`` with at least 2 classes, else ``None``."""
    if len(files) < 2:
        return None
    counts: Counter = Counter()
    for p in files:
        m = _PREFIX_RX.match(p.stem)
        if m is None:
            return None
        counts[m.group("cls")] += 1
    return counts if len(counts) >= 2 else None


def _is_coco(path: Path) -> bool:
    if path.stat().st_size > 512 * 1024 * 1024:
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories"))


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return [c.strip() for c in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _weld_signal(root: Path) -> _Signal | None:
    man = root / "manifest.json"
    if not man.is_file():
        return None
    try:
        data = json.loads(man.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    fmt = data.get("format") if isinstance(data, dict) else None
    if not (isinstance(fmt, str) and fmt.startswith("defectscope-weld/")):
        return None
    samples = data.get("samples") if isinstance(data.get("samples"), list) else []
    counts = Counter(str(s.get("label")) for s in samples if isinstance(s, dict))
    images = [root / s["image"] for s in samples if isinstance(s, dict) and isinstance(s.get("image"), str)]
    return _Signal("weld", "weld", [f"manifest.json with format {fmt!r} ({len(samples)} samples)"],
                   {"root": str(root), "n_images": len(samples), "class_counts": dict(sorted(counts.items())),
                    "image_hw": median_hw(images), "format": fmt})


def _mvtec_signal(root: Path) -> _Signal | None:
    good = root / "train" / "good"
    if not good.is_dir():
        return None
    test = root / "test"
    defect_dirs = [d for d in _subdirs(test) if d.name != "good"] if test.is_dir() else []
    n_train = len(_images_in(good))
    counts = {"train/good": n_train, "test/good": len(_images_in(test / "good"))}
    for d in defect_dirs:
        counts[d.name] = len(_images_in(d))
    gt = root / "ground_truth"
    with_masks = [d.name for d in defect_dirs if (gt / d.name).is_dir()]
    ev = [f"train/good with {n_train} images", f"test/ with defect types {[d.name for d in defect_dirs]}"]
    ev.append(f"ground_truth/ masks for {with_masks}" if with_masks else "no ground_truth/ masks (image metrics only)")
    return _Signal("anomaly", "mvtec", ev,
                   {"root": str(root), "n_images": sum(counts.values()), "class_counts": counts,
                    "image_hw": median_hw(_images_in(good)), "defect_types": [d.name for d in defect_dirs],
                    "masks_for": with_masks})


def _mask_signal(root: Path) -> _Signal | None:
    img_dir, mask_dir = root / "images", root / "masks"
    if not (img_dir.is_dir() and mask_dir.is_dir()):
        return None
    images = _images_in(img_dir)
    masks = {p.stem: p for p in _images_in(mask_dir)}
    paired = [p for p in images if p.stem in masks]
    if not paired:
        return None
    hw = median_hw(images)
    man = root / "manifest.csv"
    header = _csv_header(man) if man.is_file() else []
    if all(c in header for c in ("id", "split", "defective")):
        defective = 0
        with man.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        defective = sum(r.get("defective") == "1" for r in rows)
        return _Signal("segmentation", "kolektor",
                       [f"manifest.csv with columns {header}", f"images/ + masks/ ({len(paired)} pairs)"],
                       {"root": str(root), "n_images": len(rows), "image_hw": hw,
                        "class_counts": {"good": len(rows) - defective, "defective": defective}})
    unpaired = [p.name for p in images if p.stem not in masks]
    return _Signal("segmentation", "images_masks",
                   [f"images/ + masks/ with {len(paired)} image/mask pairs by file stem"]
                   + ([f"{len(unpaired)} images without a mask (e.g. {unpaired[:3]})"] if unpaired else []),
                   {"root": str(root), "n_images": len(paired), "image_hw": hw, "unpaired": unpaired,
                    "class_counts": {"images": len(paired)}})


def _rle_signal(root: Path) -> _Signal | None:
    for c in sorted(root.glob("*.csv")):
        header = _csv_header(c)
        if header[:3] == ["ImageId", "ClassId", "EncodedPixels"]:
            img_dir = next((d for d in [root / "train_images", root / "images", root] if _images_in(d)), None)
            images = _images_in(img_dir) if img_dir else []
            with c.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            per_class = Counter(f"class_{r['ClassId']}" for r in rows if (r.get("EncodedPixels") or "").strip())
            return _Signal("segmentation", "rle_csv",
                           [f"{c.name} with header ImageId,ClassId,EncodedPixels ({len(rows)} rows)",
                            f"{len(images)} images in {img_dir.name if img_dir else 'no folder'}/"],
                           {"root": str(root), "csv": str(c), "images_dir": str(img_dir) if img_dir else None,
                            "n_images": len(images), "image_hw": median_hw(images),
                            "class_counts": dict(sorted(per_class.items()))})
    return None


def _voc_signal(root: Path) -> _Signal | None:
    ann = _find_dir(root, "annotations", "Annotations")
    img = _find_dir(root, "images", "JPEGImages")
    if ann is None or img is None:
        return None
    xmls = sorted(ann.glob("*.xml"))
    if not xmls:
        return None
    images = _images_in(img)
    stems = {p.stem for p in images}
    matched = sum(x.stem in stems for x in xmls)
    prefixes = _prefix_classes(images)
    counts = dict(sorted(prefixes.items())) if prefixes else {"images": len(images)}
    d = {"root": str(root), "n_images": len(images), "image_hw": median_hw(images), "class_counts": counts}
    ev = [f"{ann.name}/ with {len(xmls)} VOC .xml files ({matched} match an image in {img.name}/)"]
    if prefixes:
        d["alternatives"] = ["classification (prefix layout: the file names carry classes "
                             f"{sorted(prefixes)}; use --task classification)"]
    return _Signal("detection", "voc", ev, d)


def _coco_signal(root: Path) -> _Signal | None:
    candidates = [root] if root.is_file() else sorted(root.glob("*.json")) + sorted(root.glob("annotations/*.json"))
    for j in candidates:
        if j.suffix.lower() == ".json" and _is_coco(j):
            data = json.loads(j.read_text(encoding="utf-8"))
            cats = {c.get("id"): str(c.get("name")) for c in data["categories"] if isinstance(c, dict)}
            per_cat = Counter(cats.get(a.get("category_id"), "?") for a in data["annotations"] if isinstance(a, dict))
            base = j.parent
            imgs = [base / str(im.get("file_name")) for im in data["images"] if isinstance(im, dict)]
            imgs = [p if p.exists() else base / "images" / p.name for p in imgs]
            return _Signal("detection", "coco",
                           [f"{j.name}: COCO json with {len(data['images'])} images, {len(data['annotations'])} "
                            f"annotations, {len(cats)} categories"],
                           {"root": str(j), "json": str(j), "n_images": len(data["images"]),
                            "image_hw": median_hw([p for p in imgs if p.exists()]),
                            "class_counts": dict(sorted(per_cat.items()))})
    return None


def _folder_signal(root: Path) -> _Signal | None:
    dirs = [d for d in _subdirs(root) if d.name.lower() not in STRUCTURAL_DIRS]
    with_images = {d.name: _images_in(d) for d in dirs}
    filled = [n for n, f in with_images.items() if f]
    if len(filled) < 2:
        return None
    empty = [n for n, f in with_images.items() if not f]
    counts = {n: len(f) for n, f in with_images.items()}
    ev = [f"{len(filled)} class folders holding images: {filled}"]
    if empty:
        ev.append(f"empty class folders: {empty}")
    all_files = [p for f in with_images.values() for p in f]
    xml_beside = sum(1 for d in dirs for _ in d.glob("*.xml"))
    d = {"root": str(root), "n_images": len(all_files), "image_hw": median_hw(all_files),
         "class_counts": counts, "empty_classes": empty}
    if xml_beside:
        d["xml_in_class_folders"] = xml_beside
    return _Signal("classification", "folder", ev, d)


def _prefix_signal(root: Path) -> _Signal | None:
    folder = root / "images" if (root / "images").is_dir() else root
    files = _images_in(folder)
    counts = _prefix_classes(files)
    if counts is None:
        return None
    return _Signal("classification", "prefix",
                   [f"{len(files)} images in {'images/' if folder != root else 'the folder'} named <class>_<n> "
                    f"with classes {sorted(counts)}"],
                   {"root": str(root), "n_images": len(files), "image_hw": median_hw(files),
                    "class_counts": dict(sorted(counts.items()))})


def _inventory(root: Path) -> str:
    """One line describing what is in ``root`` (for errors)."""
    if root.is_file():
        return f"{root} is a file ({root.suffix or 'no suffix'})"
    dirs = _subdirs(root)
    files = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    suffixes = Counter(p.suffix.lower() or "(none)" for p in files)
    parts = []
    if dirs:
        parts.append("sub-folders " + ", ".join(f"{d.name}/ ({sum(1 for _ in d.iterdir())} entries)" for d in dirs[:12])
                     + (f" and {len(dirs) - 12} more" if len(dirs) > 12 else ""))
    if files:
        parts.append("files " + ", ".join(f"{n} x {s}" for s, n in suffixes.most_common(8)))
    return "; ".join(parts) or "nothing (empty folder)"


def guess_layout(folder: str | Path, task: str | None = None) -> LayoutGuess:
    """Recognise the layout of ``folder`` and the task it implies.

    Args:
        folder: a data folder (or a COCO ``.json`` file).
        task: ``--task`` override: only layouts of this task are considered (so
            ``task="classification"`` reads NEU-DET as the ``prefix`` layout).

    Returns:
        :class:`LayoutGuess`; ``details["root"]`` is what the task's recipe ``data.root`` takes.

    Raises:
        DatasetError: ``folder`` does not exist; nothing is recognised (the message lists the
            sub-folders and file types found); several layouts at once that the precedence rules of
            the module docstring do not settle (the message lists each with its evidence); several
            MVTec categories side by side (the message names them: point at one); an unknown ``task``
            or no layout of ``task`` (the message says what the folder looks like instead).
    """
    root = Path(folder)
    if task is not None and task not in TASKS:
        raise DatasetError(f"--task {task!r} unknown; expected one of {', '.join(TASKS)}")
    if not root.exists():
        raise DatasetError(f"{root}: data folder not found")
    if root.is_file():
        sig = _coco_signal(root) if root.suffix.lower() == ".json" else None
        if sig is None or task not in (None, "detection"):
            raise DatasetError(f"{root}: a file that is not a COCO json (keys images, annotations, categories); "
                               "expected a data folder or a COCO .json")
        return LayoutGuess(sig.task, sig.layout, sig.evidence, sig.details)

    signals = [s for s in (_weld_signal(root), _mvtec_signal(root), _mask_signal(root), _rle_signal(root),
                           _voc_signal(root), _coco_signal(root), _folder_signal(root), _prefix_signal(root)) if s]
    if task is not None:
        other = [s for s in signals if s.task != task]
        signals = [s for s in signals if s.task == task]
        if not signals:
            seen = "; ".join(f"{s.task} ({s.layout}): {'; '.join(s.evidence)}" for s in other) or _inventory(root)
            raise DatasetError(f"{root}: no {task} layout found (--task {task}); the folder looks like: {seen}")
    layouts = {s.layout for s in signals}

    # precedence rules (module docstring)
    if "weld" in layouts:
        signals = [s for s in signals if s.layout not in ("images_masks", "prefix")]
    if "voc" in layouts or "coco" in layouts:
        signals = [s for s in signals if s.layout != "prefix"]
    if not signals:
        nested = [d.name for d in _subdirs(root) if (d / "train" / "good").is_dir()]
        if nested:
            raise DatasetError(f"{root}: holds {len(nested)} MVTec AD categories ({', '.join(nested)}); "
                               f"point at one of them, e.g. {root / nested[0]}")
        raise DatasetError(
            f"{root}: no known data layout recognised; found {_inventory(root)}. Expected one of: class folders "
            "(<class>/*.png), NEU names (<class>_<n>.jpg), images/ + masks/ (+ manifest.csv), an RLE csv "
            "(ImageId,ClassId,EncodedPixels), images/ + annotations/*.xml (VOC), a COCO .json, the MVTec AD tree "
            "(train/good, test/<defect>, ground_truth/<defect>) or a defectscope-weld manifest.json")
    if len(signals) > 1:
        lines = "\n".join(f"  - {s.task} ({s.layout}): {'; '.join(s.evidence)}" for s in signals)
        raise DatasetError(f"{root}: ambiguous data folder, several layouts found:\n{lines}\n"
                           "Pass --task to choose, or move the other files out of the folder.")
    s = signals[0]
    if s.details.get("xml_in_class_folders"):
        raise DatasetError(
            f"{root}: ambiguous data folder: class folders ({'; '.join(s.evidence)}) also hold "
            f"{s.details['xml_in_class_folders']} .xml annotation files (VOC boxes?). For detection put images in "
            "images/ and the .xml files in annotations/; for classification remove the .xml files.")
    return LayoutGuess(s.task, s.layout, s.evidence, s.details)
