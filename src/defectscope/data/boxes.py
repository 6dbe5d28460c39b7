"""Bounding-box annotations: Pascal VOC XML reader, COCO JSON reader and writer, validation.

One image and its boxes are an :class:`ImageBoxes` record: the image file, its size
in pixels, the boxes as ``xmin, ymin, xmax, ymax`` pixel coordinates (float, origin
at the top-left corner, ``xmax``/``ymax`` exclusive edges, as torchvision and
pycocotools treat them) and one class name per box.

Conventions and checks (every problem names the file and the field):

- VOC: ``<size>/<width>``, ``<size>/<height>`` and, per ``<object>``, ``<name>`` and
  ``<bndbox>`` with ``xmin, ymin, xmax, ymax``. Values are used as written (no
  1-based shift), which is what NEU-DET's boxes mean in practice.
- COCO: ``images`` (``id``, ``file_name``, ``width``, ``height``), ``annotations``
  (``image_id``, ``category_id``, ``bbox`` = ``[x, y, w, h]``) and ``categories``
  (``id``, ``name``). Detections (``predict``) add a ``score`` to each annotation.
- Errors (:class:`BoxFormatError`): malformed XML/JSON, a missing or non-numeric field,
  ``xmin >= xmax`` or ``ymin >= ymax``, a box outside ``[0, width] x [0, height]``,
  a class name not in the given ``class_names``, an unknown ``image_id`` or
  ``category_id``, duplicate ids.
- An image without its annotation file (or an annotation without its image) is an
  error by default; with ``missing="warn"`` it is left out **with a warning that
  names it**. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import numpy as np

from defectscope.data.images import IMAGE_SUFFIXES, DatasetError
from defectscope.utils.io import write_json


class BoxFormatError(DatasetError):
    """An annotation file is malformed or inconsistent; the message names file and field."""


@dataclass
class ImageBoxes:
    """The boxes of one image.

    Attributes:
        image: path of the image file.
        width, height: image size in pixels, as the annotation states it.
        boxes: ``[N, 4]`` float64, ``xmin, ymin, xmax, ymax`` in pixels.
        labels: ``N`` class names.
        source: the annotation file (for error messages).
    """

    image: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: list[str]
    source: str = ""
    scores: np.ndarray | None = field(default=None)

    def normalised(self) -> np.ndarray:
        """Boxes ``[N, 4]`` divided by ``(width, height, width, height)``: values in [0, 1]."""
        return self.boxes / np.array([self.width, self.height, self.width, self.height], dtype=np.float64)


def check_box(box: Iterable[float], width: int, height: int, where: str) -> np.ndarray:
    """Validate one ``xmin, ymin, xmax, ymax`` pixel box against its image size.

    Args:
        box: four numbers.
        width, height: image size in pixels.
        where: "file, field" text used in the error message.

    Returns:
        The box as a float64 array ``[4]``.

    Raises:
        BoxFormatError: not finite, ``xmin >= xmax``, ``ymin >= ymax`` or outside the image.
    """
    b = np.asarray(list(box), dtype=np.float64)
    if b.shape != (4,) or not np.isfinite(b).all():
        raise BoxFormatError(f"{where}: expected 4 finite numbers xmin, ymin, xmax, ymax; got {b.tolist()}")
    x0, y0, x1, y1 = b
    if x0 >= x1:
        raise BoxFormatError(f"{where}: xmin ({x0:g}) must be smaller than xmax ({x1:g})")
    if y0 >= y1:
        raise BoxFormatError(f"{where}: ymin ({y0:g}) must be smaller than ymax ({y1:g})")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise BoxFormatError(
            f"{where}: box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] lies outside the image "
            f"(expected 0 <= x <= width={width}, 0 <= y <= height={height})"
        )
    return b


def _text(node: ET.Element, path: str, where: str) -> str:
    child = node.find(path)
    if child is None or child.text is None or not child.text.strip():
        raise BoxFormatError(f"{where}: missing field <{path}>")
    return child.text.strip()


def _number(node: ET.Element, path: str, where: str) -> float:
    raw = _text(node, path, where)
    try:
        value = float(raw)
    except ValueError:
        raise BoxFormatError(f"{where}: field <{path}> is not a number ({raw!r})") from None
    if not math.isfinite(value):
        raise BoxFormatError(f"{where}: field <{path}> must be a finite number, got {raw!r}")
    return value


def read_voc_xml(path: str | Path, image: str | Path | None = None, class_names: list[str] | None = None) -> ImageBoxes:
    """Read one Pascal VOC annotation file.

    Args:
        path: the XML file.
        image: the image file it describes (default: ``<filename>`` beside the XML).
        class_names: allowed class names; ``None`` accepts any name.

    Returns:
        :class:`ImageBoxes` (boxes in pixels). An annotation with no ``<object>`` gives 0 boxes.

    Raises:
        BoxFormatError: malformed XML, a missing/non-numeric field, a bad box, an unknown class.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise BoxFormatError(f"{path}: malformed XML ({exc})") from None
    except OSError as exc:
        raise BoxFormatError(f"{path}: cannot read ({exc})") from None
    if root.tag != "annotation":
        raise BoxFormatError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    width = _number(root, "size/width", str(path))
    height = _number(root, "size/height", str(path))
    if width <= 0 or height <= 0:
        raise BoxFormatError(f"{path}: <size> must be positive, got width={width:g}, height={height:g}")
    boxes, labels = [], []
    for i, obj in enumerate(root.findall("object")):
        where = f"{path}, object {i}"
        name = _text(obj, "name", where)
        if class_names is not None and name not in class_names:
            raise BoxFormatError(f"{where}: <name> '{name}' is not a known class; expected one of {class_names}")
        coords = [_number(obj, f"bndbox/{k}", where) for k in ("xmin", "ymin", "xmax", "ymax")]
        boxes.append(check_box(coords, int(width), int(height), f"{where} <bndbox>"))
        labels.append(name)
    if image is None:
        fname = root.findtext("filename")
        if not fname:
            raise BoxFormatError(f"{path}: missing field <filename> and no image path given")
        image = path.parent / fname.strip()
    arr = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    return ImageBoxes(Path(image), int(width), int(height), arr, labels, str(path))


def write_voc_xml(path: str | Path, record: ImageBoxes) -> Path:
    """Write one record as a Pascal VOC XML file (atomically); the inverse of :func:`read_voc_xml`."""
    from defectscope.utils.io import write_text

    ann = ET.Element("annotation")
    ET.SubElement(ann, "filename").text = Path(record.image).name
    size = ET.SubElement(ann, "size")
    ET.SubElement(size, "width").text = str(record.width)
    ET.SubElement(size, "height").text = str(record.height)
    ET.SubElement(size, "depth").text = "3"
    for b, name in zip(record.boxes, record.labels):
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = name
        bb = ET.SubElement(obj, "bndbox")
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), b):
            ET.SubElement(bb, k).text = f"{float(v):g}"
    return write_text(path, ET.tostring(ann, encoding="unicode") + "\n")


def _warn_or_raise(message: str, missing: str) -> None:
    if missing == "error":
        raise BoxFormatError(message + " (pass missing='warn' to leave it out with a warning)")
    warnings.warn(message + "; left out", stacklevel=3)


def read_voc_folder(root: str | Path, class_names: list[str] | None = None,
                    missing: Literal["error", "warn"] = "error") -> list[ImageBoxes]:
    """Read a VOC-style folder: ``root/images/<stem>.<ext>`` with ``root/annotations/<stem>.xml``.

    ``JPEGImages/`` and ``Annotations/`` (the VOC names) are accepted too.

    Args:
        root: the data folder.
        class_names: allowed class names (``None``: any).
        missing: ``error`` (default) or ``warn`` for an image without annotation or an
            annotation without image.

    Returns:
        Records sorted by image file name.

    Raises:
        DatasetError: folders missing. BoxFormatError: any bad annotation, or a missing
        pair with ``missing="error"``.
    """
    root = Path(root)
    img_dir = next((root / d for d in ("images", "JPEGImages") if (root / d).is_dir()), None)
    ann_dir = next((root / d for d in ("annotations", "Annotations") if (root / d).is_dir()), None)
    if img_dir is None or ann_dir is None:
        raise DatasetError(f"{root}: expected sub-folders images/ (or JPEGImages/) and annotations/ (or Annotations/)")
    images = {p.stem: p for p in sorted(img_dir.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    xmls = {p.stem: p for p in sorted(ann_dir.glob("*.xml"))}
    if not images:
        raise DatasetError(f"{img_dir}: no image files")
    records = []
    for stem in sorted(set(images) | set(xmls)):
        if stem not in xmls:
            _warn_or_raise(f"{images[stem]}: image has no annotation file {ann_dir / (stem + '.xml')}", missing)
            continue
        if stem not in images:
            _warn_or_raise(f"{xmls[stem]}: annotation has no image {img_dir / stem}.*", missing)
            continue
        records.append(read_voc_xml(xmls[stem], images[stem], class_names))
    return records


def _field(obj: dict, key: str, kind: type | tuple, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise BoxFormatError(f"{where}: missing field '{key}'")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BoxFormatError(f"{where}: field '{key}' has type {type(value).__name__}, expected {kind}")
    return value


def read_coco(path: str | Path, image_root: str | Path | None = None, class_names: list[str] | None = None,
              missing: Literal["error", "warn"] = "error") -> tuple[list[ImageBoxes], list[str]]:
    """Read a COCO JSON file (object detection, ``bbox`` = ``[x, y, w, h]`` pixels).

    Args:
        path: the JSON file.
        image_root: folder that ``file_name`` is relative to (default: the JSON's folder,
            then its ``images/`` sub-folder when the file is not found there).
        class_names: allowed class names (``None``: the file's categories).
        missing: what to do with an image entry whose file does not exist (``error``/``warn``).

    Returns:
        ``(records, class_names)``: records in the file's image order (with ``scores`` when the
        annotations carry a ``score``), class names in category-id order.

    Raises:
        BoxFormatError: malformed JSON, missing or mistyped fields, duplicate ids, unknown
        ``image_id``/``category_id``, a bad box, a category not in ``class_names``.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BoxFormatError(f"{path}: malformed JSON ({exc.__class__.__name__}: {exc})") from None
    except OSError as exc:
        raise BoxFormatError(f"{path}: cannot read ({exc})") from None
    for key in ("images", "annotations", "categories"):
        _field(data, key, list, str(path))
    cats: dict[int, str] = {}
    for i, c in enumerate(data["categories"]):
        where = f"{path}, categories[{i}]"
        cid, name = _field(c, "id", int, where), _field(c, "name", str, where)
        if cid in cats:
            raise BoxFormatError(f"{where}: duplicate category id {cid}")
        if class_names is not None and name not in class_names:
            raise BoxFormatError(f"{where}: name '{name}' is not a known class; expected one of {class_names}")
        cats[cid] = name
    root = Path(image_root) if image_root is not None else path.parent
    imgs: dict[int, ImageBoxes] = {}
    order: list[int] = []
    absent: set[int] = set()
    for i, im in enumerate(data["images"]):
        where = f"{path}, images[{i}]"
        iid = _field(im, "id", int, where)
        fname = _field(im, "file_name", str, where)
        w, h = _field(im, "width", (int, float), where), _field(im, "height", (int, float), where)
        if not (math.isfinite(w) and math.isfinite(h)) or w <= 0 or h <= 0:
            raise BoxFormatError(f"{where}: width and height must be positive finite numbers, got {w}, {h}")
        if iid in imgs or iid in absent:
            raise BoxFormatError(f"{where}: duplicate image id {iid}")
        file = root / fname
        if not file.exists() and image_root is None and (root / "images" / fname).exists():
            file = root / "images" / fname
        if not file.exists():
            _warn_or_raise(f"{where}: image file {file} not found", missing)
            absent.add(iid)
            continue
        imgs[iid] = ImageBoxes(file, int(w), int(h), np.zeros((0, 4)), [], str(path))
        order.append(iid)
    boxes: dict[int, list] = {k: [] for k in imgs}
    labels: dict[int, list] = {k: [] for k in imgs}
    scores: dict[int, list] = {k: [] for k in imgs}
    any_score = False
    for i, a in enumerate(data["annotations"]):
        where = f"{path}, annotations[{i}]"
        iid = _field(a, "image_id", int, where)
        cid = _field(a, "category_id", int, where)
        bbox = _field(a, "bbox", list, where)
        if iid in absent:
            continue
        if iid not in imgs:
            raise BoxFormatError(f"{where}: image_id {iid} is not among the images")
        if cid not in cats:
            raise BoxFormatError(f"{where}: category_id {cid} is not among the categories {sorted(cats)}")
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
            raise BoxFormatError(f"{where}: field 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
        x, y, bw, bh = (float(v) for v in bbox)
        rec = imgs[iid]
        boxes[iid].append(check_box([x, y, x + bw, y + bh], rec.width, rec.height, f"{where} 'bbox' (x, y, x+w, y+h)"))
        labels[iid].append(cats[cid])
        if "score" in a:
            any_score = True
            score = float(_field(a, "score", (int, float), where))
            if not math.isfinite(score):
                raise BoxFormatError(f"{where}: field 'score' must be a finite number, got {score}")
            scores[iid].append(score)
        else:
            scores[iid].append(1.0)
    for iid, rec in imgs.items():
        rec.boxes = np.array(boxes[iid], dtype=np.float64).reshape(-1, 4)
        rec.labels = labels[iid]
        if any_score:
            rec.scores = np.array(scores[iid], dtype=np.float64)
    names = [cats[k] for k in sorted(cats)] if class_names is None else list(class_names)
    return [imgs[k] for k in order], names


def coco_dict(records: list[ImageBoxes], class_names: list[str], relative_to: str | Path | None = None) -> dict:
    """COCO detection dict of ``records``: category ids are ``1..C`` in ``class_names`` order.

    ``file_name`` is relative to ``relative_to`` when the image lies under it, else the full
    path. Records with ``scores`` give annotations with a ``score`` (detections).

    Raises:
        BoxFormatError: a label not in ``class_names``.
    """
    cat_id = {n: i + 1 for i, n in enumerate(class_names)}
    images, anns = [], []
    for i, rec in enumerate(records, start=1):
        p = Path(rec.image)
        if relative_to is not None:
            try:
                p = p.resolve().relative_to(Path(relative_to).resolve())
            except ValueError:
                pass
        images.append({"id": i, "file_name": str(p), "width": int(rec.width), "height": int(rec.height)})
        for j, (b, name) in enumerate(zip(rec.boxes, rec.labels)):
            if name not in cat_id:
                raise BoxFormatError(f"{rec.source or rec.image}: label '{name}' is not among {class_names}")
            x0, y0, x1, y1 = (float(v) for v in b)
            ann = {"id": len(anns) + 1, "image_id": i, "category_id": cat_id[name],
                   "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
                   "area": round((x1 - x0) * (y1 - y0), 3), "iscrowd": 0}
            if rec.scores is not None:
                ann["score"] = round(float(rec.scores[j]), 6)
            anns.append(ann)
    return {"images": images, "annotations": anns,
            "categories": [{"id": cat_id[n], "name": n, "supercategory": "defect"} for n in class_names]}


def write_coco(path: str | Path, records: list[ImageBoxes], class_names: list[str],
               relative_to: str | Path | None = None, info: dict | None = None) -> Path:
    """Write ``records`` as a COCO JSON file (atomically); see :func:`coco_dict`."""
    d = coco_dict(records, class_names, relative_to)
    if info:
        d = {"info": info, **d}
    return write_json(path, d)


def read_boxes(source: str | Path, class_names: list[str] | None = None,
               missing: Literal["error", "warn"] = "error") -> tuple[list[ImageBoxes], list[str]]:
    """Read either format: a ``.json`` file (COCO) or a folder with images/ + annotations/ (VOC).

    Returns:
        ``(records, class_names)``; for VOC without ``class_names`` the names found, sorted.

    Raises:
        DatasetError / BoxFormatError: see :func:`read_coco` and :func:`read_voc_folder`.
    """
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".json":
        return read_coco(source, class_names=class_names, missing=missing)
    if not source.is_dir():
        raise DatasetError(f"{source}: expected a COCO .json file or a folder with images/ and annotations/")
    records = read_voc_folder(source, class_names, missing)
    names = list(class_names) if class_names is not None else sorted({n for r in records for n in r.labels})
    return records, names


def image_class(record: ImageBoxes, class_names: list[str]) -> int:
    """One class per image, for stratified splits and image-level accuracy.

    The file-name prefix (NEU: ``patches_12.jpg`` is ``patches``) when it is a class name,
    else the most frequent box label (ties: the first box's). Some NEU-DET images hold
    boxes of two or three classes (e.g. ``patches`` with ``inclusion``); the prefix names
    the class the image was collected for.

    Raises:
        BoxFormatError: an image without boxes and without a class prefix.
    """
    stem = Path(record.image).stem
    prefix = stem.rsplit("_", 1)[0] if "_" in stem else ""
    if prefix in class_names:
        return class_names.index(prefix)
    if not record.labels:
        raise BoxFormatError(f"{record.source or record.image}: no boxes and no class prefix in the file name")
    counts = {n: record.labels.count(n) for n in record.labels}
    best = max(counts.values())
    return class_names.index(next(n for n in record.labels if counts[n] == best))


def load_record_images(records: list[ImageBoxes], size: int) -> np.ndarray:
    """Decode and resize the images of ``records`` to ``[N, 3, size, size]`` uint8.

    Raises:
        ImageReadError: an unreadable image (named).
        BoxFormatError: an image whose pixel size differs from its annotation's width/height.
    """
    from defectscope.data.images import load_image, resize_uint8

    out = np.empty((len(records), 3, size, size), dtype=np.uint8)
    for i, r in enumerate(records):
        img = load_image(r.image)
        if img.shape[0] != r.height or img.shape[1] != r.width:
            raise BoxFormatError(f"{r.source}: size says {r.width}x{r.height} (width x height) but image {r.image} "
                                 f"is {img.shape[1]}x{img.shape[0]}")
        out[i] = resize_uint8(img, size).transpose(2, 0, 1)
    return out
