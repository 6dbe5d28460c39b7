"""Reading images and labelled image collections.

Two labelled layouts are understood by :func:`discover_labelled_images`:

- **prefix** (NEU-CLS / NEU-DET): ``<root>/[images/]<class>_<n>.jpg``; the class is
  the file-name part before the last underscore (``rolled-in_scale_12.jpg`` is
  ``rolled-in_scale``).
- **folder** (torchvision ``ImageFolder``): ``<root>/<class>/<any>.png``.

:func:`load_image` converts every readable image to ``uint8`` RGB ``[H, W, 3]``:
grey images are repeated to 3 channels silently (the normal case for steel),
RGBA/palette and 16-bit images are converted with a warning. Corrupt or
non-image files raise :class:`ImageReadError` naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class ImageReadError(ValueError):
    """A file could not be decoded as an image; the message names the file."""


class DatasetError(ValueError):
    """A data folder does not have the expected layout; the message names path and field."""


@dataclass(frozen=True)
class LabelledImage:
    """One image file and its class index.

    Attributes:
        path: image file.
        label: class index into the collection's ``class_names``.
    """

    path: Path
    label: int


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to ``uint8`` RGB.

    Args:
        path: image file (JPEG, PNG, BMP, TIFF, WebP).

    Returns:
        Array ``[H, W, 3]``, dtype ``uint8``.

    Raises:
        ImageReadError: the file is missing, truncated or not an image.

    Warns:
        UserWarning: an RGBA/LA/palette image was flattened (alpha dropped) or a
        16/32-bit image was rescaled to 8 bits by its own min..max range.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                warnings.warn(
                    f"{path}: {mode} image ({'16' if 'I;16' in mode else '32'}-bit) rescaled to 8 bits "
                    f"from its range [{lo:g}, {hi:g}]",
                    stacklevel=2,
                )
                scale = 255.0 / (hi - lo) if hi > lo else 0.0
                grey = ((arr - lo) * scale).round().clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                warnings.warn(f"{path}: {mode} image converted to RGB (alpha channel dropped)", stacklevel=2)
            if mode == "L":
                grey = np.asarray(im, dtype=np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as exc:
        raise ImageReadError(f"{path}: file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(
            f"{path}: cannot be decoded as an image ({exc.__class__.__name__}: {exc}); "
            "expected a JPEG, PNG, BMP, TIFF or WebP file"
        ) from exc


def class_from_prefix(path: Path) -> str:
    """Class name of a NEU-style file: the stem before its last underscore.

    Raises:
        DatasetError: the stem has no underscore.
    """
    stem = path.stem
    if "_" not in stem:
        raise DatasetError(f"{path}: file name has no '<class>_<n>' prefix")
    return stem.rsplit("_", 1)[0]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def discover_labelled_images(
    root: str | Path, layout: str = "auto", class_names: list[str] | None = None
) -> tuple[list[LabelledImage], list[str], str]:
    """List the labelled images under ``root``.

    Args:
        root: data folder. For the prefix layout an ``images/`` sub-folder is used
            when present (NEU-DET keeps its images there).
        layout: ``prefix``, ``folder`` or ``auto`` (folder layout if ``root`` has
            sub-folders holding images, else prefix).
        class_names: fixed class order (from a trained model); unknown classes are
            then an error. ``None`` sorts the classes found alphabetically.

    Returns:
        ``(items, class_names, layout_used)``.

    Raises:
        DatasetError: ``root`` missing, no images, unknown layout or unknown class.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found")
    if layout not in ("auto", "prefix", "folder"):
        raise DatasetError(f"{root}: layout '{layout}' unknown; expected auto, prefix or folder")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if layout == "auto":
        has_class_dirs = any(_image_files(d) for d in subdirs if d.name not in ("images", "annotations"))
        layout = "folder" if has_class_dirs else "prefix"
    pairs: list[tuple[Path, str]] = []
    if layout == "folder":
        for d in subdirs:
            pairs += [(p, d.name) for p in _image_files(d)]
    else:
        folder = root / "images" if (root / "images").is_dir() else root
        pairs = [(p, class_from_prefix(p)) for p in _image_files(folder)]
    if not pairs:
        raise DatasetError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found ({layout} layout)")
    found = sorted({c for _, c in pairs})
    if class_names is None:
        class_names = found
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise DatasetError(
                f"{root}: classes {unknown} are not among the model's classes {class_names}"
            )
    index = {c: i for i, c in enumerate(class_names)}
    items = [LabelledImage(p, index[c]) for p, c in pairs]
    return items, list(class_names), layout


def resize_uint8(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize ``[H, W, 3]`` uint8 to ``size`` (int = square, or ``(H, W)``) with bilinear filtering."""
    h, w = (size, size) if isinstance(size, int) else size
    if img.shape[0] == h and img.shape[1] == w:
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def iter_images(files: list[Path]) -> Iterator[tuple[Path, np.ndarray | None, str | None]]:
    """Decode image files one at a time for ``predict``, format warnings silenced.

    Yields:
        ``(path, image uint8 [H, W, 3], None)`` per readable file and ``(path, None, reason)`` per
        unreadable one (the :class:`ImageReadError` message naming the file), in input order, so a
        command can report bad files instead of stopping at the first.
    """
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = load_image(f)
        except ImageReadError as exc:
            yield f, None, str(exc)
            continue
        yield f, img, None  # outside the warnings context: the caller's own warnings stay visible


def load_stack(paths: list[Path], size: int | tuple[int, int], progress: bool = False) -> np.ndarray:
    """Decode and resize many images into one ``uint8`` array ``[N, 3, H, W]``.

    Raises:
        ImageReadError: the first unreadable file, by name.
    """
    it = paths
    if progress:
        from rich.progress import track

        it = track(paths, description="Loading images", transient=True)
    h, w = (size, size) if isinstance(size, int) else size
    out = np.empty((len(paths), 3, h, w), dtype=np.uint8)
    for i, p in enumerate(it):
        out[i] = resize_uint8(load_image(p), (h, w)).transpose(2, 0, 1)
    return out


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted, recursive).

    Raises:
        FileNotFoundError: an input path does not exist.
    """
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files
