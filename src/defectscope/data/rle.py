"""Run-length encoding of defect masks in the Severstal / Kaggle convention.

Format (Kaggle "Severstal: Steel Defect Detection", ``train.csv``): a mask of
``H x W`` pixels is flattened in **column-major** order (top to bottom, then
left to right: pixel ``(row r, column c)`` has number ``c * H + r + 1``); the
encoding lists ``start length`` pairs separated by single spaces, where
``start`` is the **1-indexed** number of the first pixel of a run of ones and
``length`` the number of pixels in it. Runs are sorted, do not overlap and do
not touch (touching runs are merged by :func:`rle_encode`; the decoder accepts
them). An empty string is an empty mask.

The csv has the header ``ImageId,ClassId,EncodedPixels`` with one row per
(image, class); ``ClassId`` is 1-based; ``EncodedPixels`` may be empty.

Example: the 3 x 2 mask ``[[0, 1], [1, 1], [0, 0]]`` flattens column-major to
``0 1 0 1 1 0``, i.e. runs starting at pixel 2 (length 1) and 4 (length 2):
``"2 1 4 2"``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectscope.errors import DefectscopeError
from defectscope.utils.io import write_text

CSV_HEADER = ("ImageId", "ClassId", "EncodedPixels")


class RLEError(DefectscopeError, ValueError):
    """A run-length string or csv is malformed; the message names the file, row and problem."""


@dataclass(frozen=True)
class RLERecord:
    """One csv row: the mask of class ``class_id`` (1-based) on image ``image_id``.

    Attributes:
        image_id: file name of the image (``ImageId``).
        class_id: defect class, 1-based (``ClassId``).
        encoded: the run-length string (``EncodedPixels``), ``""`` for an empty mask.
    """

    image_id: str
    class_id: int
    encoded: str


def rle_encode(mask: np.ndarray) -> str:
    """Encode a binary mask as ``"start length ..."`` (column-major, 1-indexed starts).

    Args:
        mask: ``[H, W]``, any dtype; non-zero pixels are the defect.

    Returns:
        The run-length string, ``""`` for an empty mask.

    Raises:
        ValueError: ``mask`` is not two-dimensional.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode: expected a 2-D mask [H, W], got shape {mask.shape}")
    flat = np.concatenate([[0], (mask.T.reshape(-1) != 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))  # 0-based index where a run starts / one past where it ends
    starts, ends = edges[0::2], edges[1::2]
    pairs = np.empty(2 * len(starts), dtype=np.int64)
    pairs[0::2] = starts + 1
    pairs[1::2] = ends - starts
    return " ".join(map(str, pairs.tolist()))


def parse_rle(encoded: str, where: str = "run-length string") -> np.ndarray:
    """Parse and check a run-length string without knowing the image size.

    Args:
        encoded: ``"start length ..."`` (``""`` or whitespace: no runs).
        where: prefix of error messages (e.g. ``"masks.csv, row 3"``).

    Returns:
        ``[R, 2]`` int64 array of (1-indexed start, length).

    Raises:
        RLEError: an odd number of values, a value that is not a positive integer,
            runs not in increasing order, or overlapping runs.
    """
    tokens = str(encoded).split()
    if not tokens:
        return np.zeros((0, 2), dtype=np.int64)
    if len(tokens) % 2:
        raise RLEError(f"{where}: odd number of values ({len(tokens)}); expected 'start length' pairs")
    values = []
    for i, tok in enumerate(tokens):
        if not (tok.isascii() and tok.isdigit()):  # str.isdigit alone accepts '²' and other non-ASCII digits
            raise RLEError(f"{where}: value {i + 1} {tok!r} is not a positive integer (ASCII digits 0-9)")
        if len(tok) > 18:
            raise RLEError(f"{where}: value {i + 1} {tok[:24]}... has {len(tok)} digits; pixel numbers have at most 18")
        values.append(int(tok))
    runs = np.asarray(values, dtype=np.int64).reshape(-1, 2)
    if (runs[:, 0] < 1).any():
        k = int(np.flatnonzero(runs[:, 0] < 1)[0])
        raise RLEError(f"{where}: run {k + 1} starts at pixel {runs[k, 0]}; starts are 1-indexed (>= 1)")
    if (runs[:, 1] < 1).any():
        k = int(np.flatnonzero(runs[:, 1] < 1)[0])
        raise RLEError(f"{where}: run {k + 1} has length {runs[k, 1]}; lengths must be >= 1")
    if len(runs) > 1:
        order = np.diff(runs[:, 0])
        if (order <= 0).any():
            k = int(np.flatnonzero(order <= 0)[0])
            raise RLEError(f"{where}: runs not sorted: run {k + 2} starts at {runs[k + 1, 0]}, "
                           f"not after run {k + 1} at {runs[k, 0]}")
        ends = runs[:-1, 0] + runs[:-1, 1]  # one past the last pixel of each run
        overlap = ends > runs[1:, 0]
        if overlap.any():
            k = int(np.flatnonzero(overlap)[0])
            raise RLEError(f"{where}: run {k + 1} (pixels {runs[k, 0]}..{ends[k] - 1}) overlaps run {k + 2} "
                           f"starting at {runs[k + 1, 0]}")
    return runs


def rle_decode(encoded: str, shape: tuple[int, int], where: str = "run-length string") -> np.ndarray:
    """Decode a run-length string into a mask.

    Args:
        encoded: ``"start length ..."`` in the Kaggle convention.
        shape: ``(H, W)`` of the image.
        where: prefix of error messages.

    Returns:
        ``uint8`` mask ``[H, W]`` with values 0/1.

    Raises:
        RLEError: malformed string (see :func:`parse_rle`) or a run past the last pixel ``H * W``.
    """
    h, w = int(shape[0]), int(shape[1])
    runs = parse_rle(encoded, where)
    flat = np.zeros(h * w, dtype=np.uint8)
    if len(runs):
        last = runs[-1, 0] + runs[-1, 1] - 1
        if last > h * w:
            raise RLEError(f"{where}: run {len(runs)} ends at pixel {last}, past the image's {h * w} pixels ({h}x{w})")
        for start, length in runs:
            flat[start - 1 : start - 1 + length] = 1
    return flat.reshape(w, h).T.copy()


def masks_to_records(image_id: str, masks: np.ndarray, include_empty: bool = True) -> list[RLERecord]:
    """One record per class channel of ``masks`` ``[K, H, W]`` (class ids ``1..K``).

    Args:
        include_empty: also write rows with an empty ``EncodedPixels`` (submission style);
            ``False`` keeps only non-empty masks (Severstal ``train.csv`` style).
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks_to_records: expected [K, H, W], got shape {masks.shape}")
    out = []
    for k in range(masks.shape[0]):
        enc = rle_encode(masks[k])
        if enc or include_empty:
            out.append(RLERecord(image_id, k + 1, enc))
    return out


def write_rle_csv(path: str | Path, records: list[RLERecord]) -> Path:
    """Write ``ImageId,ClassId,EncodedPixels`` rows atomically.

    Raises:
        ValueError: a record has a class id < 1 or an ``image_id`` with a newline.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for i, r in enumerate(records, 1):
        if int(r.class_id) < 1:
            raise ValueError(f"{path}: record {i}: ClassId {r.class_id} must be >= 1")
        if "\n" in r.image_id or "\r" in r.image_id:
            raise ValueError(f"{path}: record {i}: ImageId {r.image_id!r} contains a line break")
        w.writerow([r.image_id, int(r.class_id), r.encoded])
    return write_text(path, buf.getvalue())


def read_rle_csv(path: str | Path, shapes: dict[str, tuple[int, int]] | tuple[int, int] | None = None) -> list[RLERecord]:
    """Read and check an ``ImageId,ClassId,EncodedPixels`` csv.

    Rows are numbered from 1 for the first row after the header (the file line is
    one more). Every ``EncodedPixels`` is parsed; with ``shapes`` (one ``(H, W)``
    for all images, e.g. Severstal's ``(256, 1600)``, or per ``ImageId``) runs past
    the image are errors too.

    Raises:
        FileNotFoundError: no such file.
        RLEError: wrong header, wrong column count, empty ImageId, bad ClassId,
            duplicate (ImageId, ClassId), malformed run-length string, or a run
            past the image; each message names the file and row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run-length csv not found")
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    except UnicodeDecodeError as exc:
        raise RLEError(f"{path}: not UTF-8 text (byte {exc.start}); expected a CSV file") from None
    except csv.Error as exc:
        raise RLEError(f"{path}: not a readable CSV file ({exc})") from None
    if not rows or tuple(c.strip() for c in rows[0]) != CSV_HEADER:
        got = ",".join(rows[0]) if rows else "an empty file"
        raise RLEError(f"{path}: header must be {','.join(CSV_HEADER)}, got {got!r}")
    out: list[RLERecord] = []
    seen: set[tuple[str, int]] = set()
    for n, row in enumerate(rows[1:], 1):
        where = f"{path}, row {n} (line {n + 1})"
        if not row:
            continue
        if len(row) != 3:
            raise RLEError(f"{where}: expected 3 columns ImageId,ClassId,EncodedPixels, got {len(row)}")
        image_id, class_raw, encoded = row[0].strip(), row[1].strip(), row[2].strip()
        if not image_id:
            raise RLEError(f"{where}: empty ImageId")
        if not (class_raw.isascii() and class_raw.isdigit()) or int(class_raw) < 1:
            raise RLEError(f"{where}: ClassId {class_raw!r} is not an integer >= 1")
        class_id = int(class_raw)
        if (image_id, class_id) in seen:
            raise RLEError(f"{where}: duplicate row for ImageId {image_id!r}, ClassId {class_id}")
        seen.add((image_id, class_id))
        if shapes is None:
            parse_rle(encoded, where)
        else:
            shape = shapes if isinstance(shapes, tuple) else shapes.get(image_id)
            if shape is None:
                raise RLEError(f"{where}: no image size known for ImageId {image_id!r}")
            rle_decode(encoded, shape, where)
        out.append(RLERecord(image_id, class_id, encoded))
    return out


def records_to_masks(records: list[RLERecord], image_id: str, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """Masks ``uint8 [K, H, W]`` of one image from csv records (missing classes are empty).

    Raises:
        RLEError: a record's class id exceeds ``num_classes`` or its runs do not fit ``shape``.
    """
    out = np.zeros((num_classes, *shape), dtype=np.uint8)
    for r in records:
        if r.image_id != image_id:
            continue
        if r.class_id > num_classes:
            raise RLEError(f"ImageId {image_id!r}: ClassId {r.class_id} > number of classes {num_classes}")
        out[r.class_id - 1] = rle_decode(r.encoded, shape, f"ImageId {image_id!r}, ClassId {r.class_id}")
    return out
