"""Segmentation data with PNG masks (KolektorSDD layout).

Layout::

    <root>/images/NNN.jpg     grey (or RGB) images
    <root>/masks/NNN.png      0/255 masks of the same size (0: good, 255: defect)
    <root>/manifest.csv       id,[split,]defective[,...]  (KolektorSDD: train 320 / val 79)

The ``split`` column is optional: without it every row has ``split == ""`` and the task splits the
images itself. Further columns (KolektorSDD: n_polygons, mask_pixels, width, height) are kept as
text in :attr:`MaskedImage.extra`.

Images are returned as ``uint8`` RGB (grey repeated), masks as ``uint8`` 0/1.
Resizing for the network: images bilinear, masks by area (box filter) then
``>= 0.5`` coverage, so that a mask pixel is a defect when at least half of the
original pixels under it are.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from defectscope.data.images import DatasetError, ImageReadError, _too_large, check_pixels, load_image, resize_uint8, resolve_pixel_limit

MANIFEST_FIELDS = ("id", "defective")  # required; "split" is optional
#: ``split`` values :func:`read_manifest` accepts unless told otherwise.
MANIFEST_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class MaskedImage:
    """One image with its mask file.

    Attributes:
        id: the manifest id (file stem), e.g. ``"005"``.
        image: image file.
        mask: mask file (PNG, 0/255).
        split: manifest split (``train``/``val``/...); ``""`` when the manifest has no split column.
        defective: manifest flag (the mask is non-empty).
        extra: the row's other manifest columns, as text (not part of equality or hash).
    """

    id: str
    image: Path
    mask: Path
    split: str
    defective: bool
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


def read_manifest(root: str | Path, splits: tuple[str, ...] | None = MANIFEST_SPLITS) -> list[MaskedImage]:
    """List the images of a KolektorSDD-layout folder from its ``manifest.csv``.

    Args:
        root: the data folder.
        splits: the ``split`` values allowed (a row with another value, e.g. a typo ``tset``,
            would otherwise be dropped silently by whoever selects ``train``/``val``);
            ``None`` accepts any non-empty value.

    Raises:
        DatasetError: missing folder/manifest, missing column, bad ``defective`` value, a
            ``split`` not in ``splits``, a file that is not UTF-8 CSV, or an image/mask file
            named by the manifest is missing (file and row named).
    """
    root = Path(root)
    man = root / "manifest.csv"
    if not man.is_file():
        raise DatasetError(f"{man}: manifest not found (expected id,[split,]defective columns; KolektorSDD layout)")
    try:
        return _read_manifest_rows(root, man, splits)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{man}: not UTF-8 text (byte {exc.start}); expected a CSV file") from None
    except csv.Error as exc:
        raise DatasetError(f"{man}: not a readable CSV file ({exc})") from None


def _read_manifest_rows(root: Path, man: Path, splits: tuple[str, ...] | None) -> list[MaskedImage]:
    with man.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in MANIFEST_FIELDS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{man}: missing column(s) {missing}; got {reader.fieldnames}")
        items = []
        for n, row in enumerate(reader, 1):
            where = f"{man}, row {n}"
            if row["defective"] not in ("0", "1"):
                raise DatasetError(f"{where}: field 'defective' must be 0 or 1, got {row['defective']!r}")
            if not isinstance(row["id"], str) or not row["id"].strip() or "/" in row["id"] or "\\" in row["id"]:
                raise DatasetError(f"{where}: field 'id' must be a file stem (no folder), got {row['id']!r}")
            has_split = "split" in (reader.fieldnames or [])
            if has_split and (not row["split"] or (splits is not None and row["split"] not in splits)):
                raise DatasetError(f"{where}: field 'split' is {row['split']!r}; expected one of {list(splits or ['a non-empty value'])}")
            img = _find_image(root / "images", row["id"])
            if img is None:
                raise DatasetError(f"{where}: no image file images/{row['id']}.* for id {row['id']!r}")
            mask = root / "masks" / f"{row['id']}.png"
            if not mask.is_file():
                raise DatasetError(f"{where}: mask file {mask} missing")
            extra = {k: v for k, v in row.items() if k not in ("id", "split", "defective") and k is not None}
            items.append(MaskedImage(row["id"], img, mask, row.get("split") or "", row["defective"] == "1", extra))
    if not items:
        raise DatasetError(f"{man}: no rows")
    return items


def manifest_has_split(root: str | Path) -> bool:
    """Whether ``root/manifest.csv`` has a ``split`` column (reads only the header line).

    Raises:
        DatasetError: the manifest is missing.
    """
    man = Path(root) / "manifest.csv"
    if not man.is_file():
        raise DatasetError(f"{man}: manifest not found (expected id,[split,]defective columns; KolektorSDD layout)")
    with man.open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    return "split" in header


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in (".jpg", ".png", ".bmp", ".jpeg", ".tif", ".tiff"):
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def load_mask(path: str | Path) -> np.ndarray:
    """Read a PNG mask as ``uint8`` 0/1 ``[H, W]`` (non-zero grey values are defect).

    Raises:
        ImageReadError: missing or undecodable file, or a mask with more than one channel
            whose channels differ (a colour image, not a mask).
    """
    path = Path(path)
    limit = resolve_pixel_limit(None)
    try:
        with Image.open(path) as im:
            check_pixels(im, str(path), limit)
            im.load()
            arr = np.asarray(im)
    except FileNotFoundError as exc:
        raise ImageReadError(f"{path}: mask file not found") from exc
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise _too_large(str(path), exc, None) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot be decoded as a mask image ({exc})") from exc
    if arr.ndim == 3:
        if not (arr[..., :3] == arr[..., :1]).all():
            raise ImageReadError(f"{path}: mask has differing colour channels; expected a grey 0/255 mask")
        arr = arr[..., 0]
    return (arr > 0).astype(np.uint8)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 0/1 mask ``[H, W]`` to ``size = (h, w)`` by area coverage ``>= 0.5``."""
    h, w = size
    if mask.shape == (h, w):
        return mask.astype(np.uint8)
    cover = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((w, h), Image.BOX))
    return (cover >= 0.5).astype(np.uint8)


def load_masked_stack(items: list[MaskedImage], size: tuple[int, int], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize images and masks.

    Args:
        items: from :func:`read_manifest`.
        size: ``(H, W)`` of the network input.

    Returns:
        ``(x, y)``: ``uint8 [N, 3, H, W]`` images and ``uint8 [N, 1, H, W]`` 0/1 masks.

    Raises:
        ImageReadError: unreadable file, or image and mask of different sizes (both named).
    """
    h, w = size
    x = np.empty((len(items), 3, h, w), dtype=np.uint8)
    y = np.empty((len(items), 1, h, w), dtype=np.uint8)
    it = items
    if progress:
        from rich.progress import track

        it = track(items, description="Loading images and masks", transient=True)
    for i, item in enumerate(it):
        img = load_image(item.image)
        mask = load_mask(item.mask)
        if mask.shape != img.shape[:2]:
            raise ImageReadError(f"{item.mask}: mask is {mask.shape[0]}x{mask.shape[1]}, image {item.image} is "
                                 f"{img.shape[0]}x{img.shape[1]}; they must match")
        x[i] = resize_uint8(img, (h, w)).transpose(2, 0, 1)
        y[i, 0] = resize_mask(mask, (h, w))
    return x, y


class MaskStack:
    """Images and masks of ``items``, resized to ``size``, decoded on first use and then kept.

    A task's samples hold one stack; training, prediction and reports ask it for the positions they
    need, so images nobody asks for are never read (cross-validation on KolektorSDD's train split
    never decodes the val images).

    Args:
        items: from :func:`read_manifest`.
        size: ``(H, W)`` of the network input.

    Attributes:
        loaded: ``[N]`` bool, which positions have been decoded.
    """

    def __init__(self, items: list[MaskedImage], size: tuple[int, int]) -> None:
        self.items = list(items)
        self.size = tuple(size)
        h, w = self.size
        self.x = np.zeros((len(self.items), 3, h, w), dtype=np.uint8)
        self.y = np.zeros((len(self.items), 1, h, w), dtype=np.uint8)
        self.loaded = np.zeros(len(self.items), dtype=bool)

    def __len__(self) -> int:
        return len(self.items)

    def get(self, idx: np.ndarray | list[int], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(x uint8 [n, 3, H, W], y uint8 [n, 1, H, W])`` of positions ``idx`` (copies, in that order).

        Raises:
            ImageReadError: as :func:`load_masked_stack` (unreadable file, image/mask size mismatch).
        """
        idx = np.asarray(idx, dtype=int).reshape(-1)
        todo = np.unique(idx[~self.loaded[idx]])
        if len(todo):
            x, y = load_masked_stack([self.items[i] for i in todo], self.size, progress=progress)
            self.x[todo], self.y[todo] = x, y
            self.loaded[todo] = True
        return self.x[idx], self.y[idx]
