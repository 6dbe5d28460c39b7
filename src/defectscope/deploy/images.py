"""Decoding uploaded image bytes for the predictor and the service, with distinct errors.

The service must tell "this is not an image" (415) from "this is an image file
but broken" (422) from "too large" (413); :func:`decode_image_bytes` raises a
different :class:`~defectscope.data.images.ImageReadError` subclass for each.
Conversion rules follow :func:`defectscope.data.images.load_image`: grey images
are repeated to three channels, everything else is converted to RGB.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from defectscope.data.images import (
    MAX_PIXELS,
    ImageReadError,
    ImageTooLargeError,
    _too_large,
    check_pixels,
    frame_note,
    load_image,
    resolve_pixel_limit,
)

__all__ = ["MAX_PIXELS", "CorruptImageError", "ImageTooLargeError", "NotAnImageError", "as_rgb_uint8", "decode_image_bytes"]


class NotAnImageError(ImageReadError):
    """The bytes are not in any image format PIL knows."""


class CorruptImageError(ImageReadError):
    """The bytes start like an image but cannot be decoded (truncated or damaged)."""


def decode_image_bytes(data: bytes, name: str = "<upload>", max_pixels: int | None = None,
                       notes: list[str] | None = None) -> np.ndarray:
    """Decode image bytes to ``uint8`` RGB ``[H, W, 3]``.

    Args:
        data: the encoded file (JPEG, PNG, BMP, TIFF, WebP, ...).
        name: file name used in error messages.
        max_pixels: largest ``H * W`` accepted; ``None``: :func:`~defectscope.data.images.pixel_limit`
            (40 Mpx unless ``DEFECTSCOPE_MAX_MEGAPIXELS`` / ``--max-megapixels`` says otherwise).
        notes: a list that receives notes for the answer: an animated GIF / multi-page TIFF gives
            ``"NAME: GIF file has N frames (pages); frame 1 of N used"`` (thread-safe, unlike warnings).

    Raises:
        NotAnImageError: empty or unrecognised bytes.
        ImageTooLargeError: more than ``max_pixels`` pixels.
        CorruptImageError: recognised format but decoding failed.
    """
    if not data:
        raise NotAnImageError(f"{name}: empty file; expected a JPEG, PNG, BMP, TIFF or WebP image")
    max_pixels = resolve_pixel_limit(max_pixels)
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # not an OSError: PIL's own limit (above ours) hit in open()
        raise _too_large(name, exc, max_pixels) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise NotAnImageError(f"{name}: not an image ({exc.__class__.__name__}); expected a JPEG, PNG, BMP, TIFF or WebP image") from exc
    with im:
        check_pixels(im, name, max_pixels)
        note = frame_note(im, name)
        if note and notes is not None:
            notes.append(note)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    arr = np.asarray(im, dtype=np.float64)
                    lo, hi = float(arr.min()), float(arr.max())
                    grey = ((arr - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)).round().clip(0, 255).astype(np.uint8)
                    return np.repeat(grey[..., None], 3, axis=2)
                if im.mode == "L":
                    return np.repeat(np.asarray(im, dtype=np.uint8)[..., None], 3, axis=2)
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise CorruptImageError(f"{name}: {im.format} image cannot be decoded ({exc.__class__.__name__}: {exc})") from exc


def as_rgb_uint8(item: str | Path | bytes | np.ndarray) -> np.ndarray:
    """Any accepted predictor input as ``uint8 [H, W, 3]``.

    Args:
        item: an image file path, encoded bytes, or an array ``[H, W]`` / ``[H, W, 3]``
            (``uint8``, or float in [0, 1]).

    Raises:
        ImageReadError: unreadable file or bytes.
        ValueError: array of another shape or dtype.
    """
    if isinstance(item, (str, Path)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_image(item)
    if isinstance(item, (bytes, bytearray)):
        return decode_image_bytes(bytes(item))
    arr = np.asarray(item)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image array has shape {arr.shape}; expected [H, W] or [H, W, 3]")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    raise ValueError(f"image array has dtype {arr.dtype}; expected uint8 or float in [0, 1]")
