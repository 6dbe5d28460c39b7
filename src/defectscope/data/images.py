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

Decompression bombs: an image of more pixels than the limit (a small PNG can declare
20000 x 20000) is refused from its header, before any pixel is decoded, with
:class:`ImageTooLargeError` (an :class:`ImageReadError`, so ``predict`` reports it like any
unreadable file and keeps the rest of the batch). The limit is :data:`MAX_PIXELS` (40 Mpx) unless
the environment variable :data:`MAX_MEGAPIXELS_ENV` (``DEFECTSCOPE_MAX_MEGAPIXELS``, set by the
CLI's ``--max-megapixels``) raises or lowers it: :func:`pixel_limit`, read by every reader
(training, ``predict``, ``serve``, ``inspect``, ``data check``). Line-scan images (16k px wide)
need it raised; readers that resize anyway decode such images reduced (:func:`load_image_resized`:
JPEG draft scaling, PIL ``reduce``), so memory stays near one byte or three per stored pixel
instead of several copies.

Multi-page TIFF and animated GIF files are read at their first frame with a
:class:`MultiFrameWarning` ("frame 1 of N used"); :func:`frame_note` gives that sentence for
answers (the service's ``warnings`` field, ``predict``'s console).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from defectscope.errors import DefectscopeError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
#: Default largest image accepted, pixels (H * W): 40 Mpx, 30x a KolektorSDD image, 1000x a NEU image.
MAX_PIXELS = 40_000_000
#: Environment variable overriding :data:`MAX_PIXELS`, in megapixels (the CLI's ``--max-megapixels`` sets it).
MAX_MEGAPIXELS_ENV = "DEFECTSCOPE_MAX_MEGAPIXELS"


class ImageReadError(DefectscopeError, ValueError):
    """A file could not be decoded as an image; the message names the file."""


class DatasetError(DefectscopeError, ValueError):
    """A data folder does not have the expected layout; the message names path and field."""


class ImageTooLargeError(ImageReadError):
    """The image has more pixels than allowed (decompression-bomb guard); the message names the file."""


class MultiFrameWarning(UserWarning):
    """A multi-page TIFF or animated GIF was read at its first frame only."""


def pixel_limit() -> int:
    """The largest image accepted, pixels: ``DEFECTSCOPE_MAX_MEGAPIXELS`` x 10^6 if set, else :data:`MAX_PIXELS`.

    Also raises PIL's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, 89 Mpx, an error
    above twice that) to the same value when ours is higher, so that one option governs both.

    Raises:
        ImageTooLargeError: the variable is not a positive number (named, with its value).
    """
    text = os.environ.get(MAX_MEGAPIXELS_ENV, "").strip()
    if not text:
        return MAX_PIXELS
    try:
        mpx = float(text)
    except ValueError:
        mpx = float("nan")
    if not math.isfinite(mpx) or mpx <= 0:
        raise ImageTooLargeError(f"{MAX_MEGAPIXELS_ENV}={text!r} (--max-megapixels): expected a positive number of "
                                 f"megapixels, e.g. 200 (default {MAX_PIXELS // 1_000_000})")
    return _sync_pil_limit(max(int(mpx * 1_000_000), 1))


def _sync_pil_limit(limit: int) -> int:
    """Raise PIL's own bomb limit (checked inside ``Image.open``) to ``limit`` if it is lower; returns ``limit``."""
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit
    return limit


def resolve_pixel_limit(max_pixels: int | None) -> int:
    """``max_pixels``, or :func:`pixel_limit` when ``None``; PIL's own limit is raised to match. Call it
    before ``Image.open`` (where PIL checks)."""
    return pixel_limit() if max_pixels is None else _sync_pil_limit(int(max_pixels))


def check_pixels(im: Image.Image, name: str, max_pixels: int | None = None) -> None:
    """Refuse an opened (not yet decoded) image above ``max_pixels`` pixels (``None``: :func:`pixel_limit`).

    Raises:
        ImageTooLargeError: ``width * height > max_pixels`` (both named, with the option that raises it).
    """
    max_pixels = resolve_pixel_limit(max_pixels)
    w, h = im.size
    if w * h > max_pixels:
        need = math.ceil(w * h / 1_000_000)
        raise ImageTooLargeError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels "
                                 f"({max_pixels / 1e6:g} Mpx, decompression-bomb guard); if the image is genuine, raise "
                                 f"the limit with --max-megapixels {need} (or {MAX_MEGAPIXELS_ENV}={need})")


def _too_large(name: str, exc: BaseException, max_pixels: int | None) -> ImageTooLargeError:
    """PIL's own decompression-bomb error (raised in ``open``, before our check) as :class:`ImageTooLargeError`."""
    limit = pixel_limit() if max_pixels is None else max_pixels
    return ImageTooLargeError(f"{name}: too many pixels ({exc}); limit {limit} pixels; if the image is genuine, "
                              f"raise it with --max-megapixels (or {MAX_MEGAPIXELS_ENV})")


def frame_note(im: Image.Image, name: str) -> str | None:
    """``"NAME: GIF file has N frames (pages); frame 1 of N used"`` for a multi-frame image, else ``None``."""
    n = int(getattr(im, "n_frames", 1) or 1)
    if n > 1:
        return f"{name}: {im.format} file has {n} frames (pages); frame 1 of {n} used"
    return None


def warn_multiframe(im: Image.Image, name: str, notes: list[str] | None = None) -> None:
    """Warn (:class:`MultiFrameWarning`) when ``im`` has more than one frame; only the first is used.

    ``notes``: a list that also receives the sentence (:func:`frame_note`), for answers that carry it.
    """
    note = frame_note(im, name)
    if note:
        if notes is not None:
            notes.append(note)
        warnings.warn(note, MultiFrameWarning, stacklevel=3)


@dataclass(frozen=True)
class LabelledImage:
    """One image file and its class index.

    Attributes:
        path: image file.
        label: class index into the collection's ``class_names``.
    """

    path: Path
    label: int


def _to_rgb(im: Image.Image, name: str) -> np.ndarray:
    """A loaded PIL image as ``uint8 [H, W, 3]`` (the conversions of :func:`load_image`, with its warnings)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        warnings.warn(
            f"{name}: {mode} image ({'16' if 'I;16' in mode else '32'}-bit) rescaled to 8 bits "
            f"from its range [{lo:g}, {hi:g}]",
            stacklevel=3,
        )
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        grey = ((arr - lo) * scale).round().clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        warnings.warn(f"{name}: {mode} image converted to RGB (alpha channel dropped)", stacklevel=3)
    if mode == "L":
        grey = np.asarray(im, dtype=np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _read(path: str | Path, max_pixels: int | None, size: tuple[int, int] | None,
          notes: list[str] | None) -> np.ndarray:
    """Open, check and decode ``path`` (see :func:`load_image`, :func:`load_image_resized`)."""
    path = Path(path)
    max_pixels = resolve_pixel_limit(max_pixels)
    try:
        with Image.open(path) as im:
            check_pixels(im, str(path), max_pixels)
            warn_multiframe(im, str(path), notes)
            if size is not None and im.width * im.height > MAX_PIXELS:
                return _reduced(im, size, str(path))
            im.load()
            return _to_rgb(im, str(path))
    except FileNotFoundError as exc:
        raise ImageReadError(f"{path}: file not found") from exc
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:  # not an OSError; PIL's own limit, above ours
        raise _too_large(str(path), exc, max_pixels) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(
            f"{path}: cannot be decoded as an image ({exc.__class__.__name__}: {exc}); "
            "expected a JPEG, PNG, BMP, TIFF or WebP file"
        ) from exc


def _reduced(im: Image.Image, size: tuple[int, int], name: str) -> np.ndarray:
    """Decode an opened large image straight to ``size = (h, w)`` in bounded memory.

    JPEG: ``draft`` makes the decoder itself scale by 1/2 .. 1/8 (DCT scaling), so the full image
    never exists. Other formats are decoded at their stored mode (one byte per pixel for grey, three
    for RGB: the bound), then shrunk by an integer box ``reduce`` before any conversion to RGB, and
    resized bilinearly to ``size``; no float or RGB copy of the full image is made (16-bit images
    pass through a 32-bit integer copy; palette and CMYK images through an RGB one).
    """
    h, w = size
    if im.format == "JPEG":
        im.draft(im.mode if im.mode in ("L", "RGB") else None, (w, h))
    im.load()
    factor = min(im.width // w, im.height // h)
    small: Image.Image = im
    if factor >= 2:
        base = (im.convert("L") if im.mode == "1" else im.convert("RGB") if im.mode in ("P", "PA", "CMYK", "YCbCr")
                else im.convert("I") if im.mode.startswith("I;16") else im)
        try:
            small = base.reduce(factor)
        except (ValueError, NotImplementedError):  # a mode PIL cannot reduce: full-size conversion below
            small = base
    return resize_uint8(_to_rgb(small, name), (h, w))


def load_image(path: str | Path, max_pixels: int | None = None, notes: list[str] | None = None) -> np.ndarray:
    """Decode an image file to ``uint8`` RGB.

    Args:
        path: image file (JPEG, PNG, BMP, TIFF, WebP, GIF).
        max_pixels: largest ``H * W`` accepted (checked from the header, before decoding);
            ``None``: :func:`pixel_limit` (40 Mpx unless ``DEFECTSCOPE_MAX_MEGAPIXELS`` says otherwise).
        notes: a list that receives notes for the answer ("frame 1 of N used").

    Returns:
        Array ``[H, W, 3]``, dtype ``uint8``.

    Raises:
        ImageReadError: the file is missing, truncated or not an image.
        ImageTooLargeError: more than ``max_pixels`` pixels (an :class:`ImageReadError`); the message
            names the option that raises the limit.

    Warns:
        UserWarning: an RGBA/LA/palette image was flattened (alpha dropped) or a
        16/32-bit image was rescaled to 8 bits by its own min..max range.
        MultiFrameWarning: a multi-page TIFF / animated GIF; the first frame is used.
    """
    return _read(path, max_pixels, None, notes)


def load_image_resized(path: str | Path, size: int | tuple[int, int], max_pixels: int | None = None,
                       notes: list[str] | None = None) -> np.ndarray:
    """Decode an image file to ``uint8`` RGB ``[h, w, 3]`` at ``size`` (int = square, or ``(h, w)``).

    For readers that resize anyway (classification training and ``predict``). An image within the
    default :data:`MAX_PIXELS` gives exactly ``resize_uint8(load_image(path), size)``; a larger one
    (allowed by a raised :func:`pixel_limit`) is decoded reduced (JPEG draft scaling, PIL ``reduce``
    by an integer factor, then bilinear), so a 13000 x 13000 grey PNG needs about 170 MB (its
    stored pixels) instead of several full RGB copies (over 1 GB).

    Raises / warns: as :func:`load_image`.
    """
    h, w = (size, size) if isinstance(size, int) else size
    return resize_uint8(_read(path, max_pixels, (h, w), notes), (h, w))
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
        DatasetError: ``root`` missing, no images, unknown layout or unknown class; without
            ``class_names`` (training), a single class (a classifier needs at least two).

    Warns:
        UserWarning: a class sub-folder (folder layout) holds no image file; it is not a class.
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
            files = _image_files(d)
            if not files and d.name not in ("images", "annotations"):
                warnings.warn(f"{d}: class folder holds no image file ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                              f"class '{d.name}' is left out", stacklevel=2)
            pairs += [(p, d.name) for p in files]
    else:
        folder = root / "images" if (root / "images").is_dir() else root
        pairs = [(p, class_from_prefix(p)) for p in _image_files(folder)]
    if not pairs:
        raise DatasetError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found ({layout} layout)")
    found = sorted({c for _, c in pairs})
    if class_names is None:
        if len(found) < 2:
            raise DatasetError(f"{root}: only one class ({found[0]!r}) found ({layout} layout, {len(pairs)} images); "
                               "training a classifier needs at least 2 classes"
                               + (" (one sub-folder per class)" if layout == "folder" else " ('<class>_<n>' file names)"))
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


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted, recursive; :data:`IMAGE_SUFFIXES`).

    Used by every task's ``predict``.

    Raises:
        FileNotFoundError: an input path does not exist (named).
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


def iter_images(files: list[Path], size: int | tuple[int, int] | None = None
                ) -> Iterator[tuple[Path, np.ndarray | None, str | None]]:
    """Decode image files one at a time for ``predict``, format warnings silenced.

    A multi-frame file still raises its :class:`MultiFrameWarning` ("frame 1 of N used"): the CLI's
    ``predict`` prints it beside the file.

    Args:
        files: image files.
        size: when the caller resizes anyway, ``(h, w)`` (or a side): images come at that size,
            large ones decoded reduced (:func:`load_image_resized`); ``None``: full resolution.

    Yields:
        ``(path, image uint8 [H, W, 3], None)`` per readable file and ``(path, None, reason)`` per
        unreadable one (the :class:`ImageReadError` message naming the file), in input order, so a
        command can report bad files instead of stopping at the first.
    """
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                warnings.simplefilter("default", MultiFrameWarning)  # a silently dropped page would be a wrong answer
                img = load_image(f) if size is None else load_image_resized(f, size)
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
        out[i] = load_image_resized(p, (h, w)).transpose(2, 0, 1)
    return out


@dataclass
class LabelledImages:
    """A decoded labelled image collection (see :func:`load_labelled_samples`).

    Attributes:
        files: ``N`` image files, in discovery order.
        labels: ``[N]`` int class indices into ``class_names``.
        class_names: class names in index order.
        x: ``uint8 [N, 3, S, S]`` images resized to ``S x S``.
        layout: the layout used (``prefix`` or ``folder``).
        description: one line naming the folder, layout, image and class counts.
    """

    files: list[Path]
    labels: np.ndarray
    class_names: list[str]
    x: np.ndarray
    layout: str
    description: str


def load_labelled_samples(root: str | Path, image_size: int, layout: str = "auto", max_per_class: int | None = None,
                          subset_seed: int = 0, progress: bool = False) -> LabelledImages:
    """Discover the labelled images of ``root``, keep at most ``max_per_class`` per class, decode them.

    Shared by every image-classification task (``classification``, ``multicnn``).

    Args:
        root: data folder (see :func:`discover_labelled_images`).
        image_size: side ``S`` in pixels of the decoded square images.
        layout: ``auto``, ``prefix`` or ``folder``.
        max_per_class: keep at most this many images per class (``None``: all), chosen at random
            with ``subset_seed`` and kept in discovery order.
        subset_seed: seed of that choice.
        progress: show a progress bar while decoding.

    Returns:
        :class:`LabelledImages`.

    Raises:
        DatasetError: bad folder or layout (named).
        ImageReadError: a corrupt image (named).
    """
    items, class_names, layout_used = discover_labelled_images(root, layout)
    labels = np.array([it.label for it in items])
    if max_per_class:
        rng = np.random.default_rng(subset_seed)
        keep = np.sort(np.concatenate([
            rng.permutation(np.flatnonzero(labels == c))[:max_per_class] for c in range(len(class_names))
        ]))
        items, labels = [items[i] for i in keep], labels[keep]
    files = [it.path for it in items]
    x = load_stack(files, image_size, progress=progress)
    return LabelledImages(files, labels, list(class_names), x, layout_used,
                          f"{root} ({layout_used} layout, {len(files)} images, {len(class_names)} classes)")
