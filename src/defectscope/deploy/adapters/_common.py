"""Small helpers the task adapters share: split lists, image inputs, overlays as base64 PNG, AUROC.

Nothing here depends on ``engine/<task>.py``: adapters read only the checkpoint payload,
the run's split lists and :mod:`defectscope.models`.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from defectscope.data.images import resize_uint8
from defectscope.deploy.adapters.base import DeployError

#: a distinct outline colour per class index (RGB), repeated beyond 8 classes
BOX_COLOURS = [(255, 48, 48), (0, 160, 255), (255, 170, 0), (0, 200, 80), (200, 60, 255), (255, 90, 200),
               (0, 210, 210), (160, 120, 40)]


def image_to_input(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> ``float32 [3, h, w]`` in [0, 1] at ``size = (h, w)``, resized bilinearly
    (PIL) exactly as the training's ``load_stack``/``resize_uint8`` did."""
    return resize_uint8(image, tuple(size)).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)


def read_split(run_dir: Path, split: str, labels: tuple[str, ...] | None = None) -> list[tuple[Path, str]]:
    """``(file, label)`` per line of ``RUN/split/<split>.txt`` (``path,label`` lines), files resolved.

    Args:
        run_dir: the run folder. split: list name (``test``, ``train``, ``fit``, ...).
        labels: allowed labels (``None``: any).

    Raises:
        DeployError: list missing or empty, a label not allowed, or a listed file not found (file and line named).
    """
    from defectscope.deploy.adapters.classification import resolve_listed

    lst = Path(run_dir) / "split" / f"{split}.txt"
    if not lst.is_file():
        raise DeployError(f"{lst}: not found; the run has no '{split}' split list")
    out = []
    for n, line in enumerate(lst.read_text().splitlines(), 1):
        if not line.strip():
            continue
        path, _, label = line.rpartition(",")
        if labels is not None and label not in labels:
            raise DeployError(f"{lst}:{n}: label '{label}' is not one of {list(labels)}")
        out.append((resolve_listed(Path(path), Path(run_dir), lst, n), label))
    if not out:
        raise DeployError(f"{lst}: empty split list")
    return out


def spread(items: list, limit: int | None) -> list:
    """At most ``limit`` items, taken evenly over the list (keeps the mix of a sorted list)."""
    if not limit or limit >= len(items):
        return list(items)
    keep = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in keep]


def png_base64(rgb: np.ndarray) -> str:
    """Base64 text of a PNG of ``uint8 [H, W, 3]``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float map ``[h, w]`` resized bilinearly to ``size = (H, W)`` (``torch.nn.functional.interpolate``,
    ``align_corners=False``, as the engines upsample masks and maps); float32."""
    import torch
    import torch.nn.functional as F

    values = np.asarray(values, dtype=np.float32)
    if values.shape == tuple(size):
        return values
    t = torch.from_numpy(np.ascontiguousarray(values))[None, None]
    return F.interpolate(t, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)[0, 0].numpy()


def heat_colours(values: np.ndarray) -> np.ndarray:
    """``[H, W]`` values in [0, 1] -> ``uint8 [H, W, 3]`` through matplotlib's ``jet`` colour map (blue = low, red = high).

    The table is sampled once (256 entries) so the service does not import pyplot.
    """
    from matplotlib import colormaps

    lut = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    idx = (np.clip(np.nan_to_num(values), 0, 1) * 255).round().astype(np.intp)
    return lut[idx]


def heat_overlay(image: np.ndarray, values: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with a heat map blended over it: ``(1 - alpha) * image + alpha * jet(values)``.

    Args:
        image: ``uint8 [H, W, 3]``. values: ``[H, W]`` in [0, 1] (same size as the image).
    """
    blend = (1 - alpha) * image.astype(np.float32) + alpha * heat_colours(values).astype(np.float32)
    return blend.round().clip(0, 255).astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (255, 40, 40),
                 alpha: float = 0.5) -> np.ndarray:
    """The image with the mask pixels tinted ``colour`` (``alpha`` blend) and the mask outline drawn solid.

    Args:
        image: ``uint8 [H, W, 3]``. mask: ``[H, W]`` bool / 0-1 of the same size.
    """
    from scipy.ndimage import binary_erosion

    m = np.asarray(mask).astype(bool)
    out = image.astype(np.float32).copy()
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(colour, np.float32)
    edge = m & ~binary_erosion(m, border_value=0)
    out[edge] = colour
    return out.round().clip(0, 255).astype(np.uint8)


def draw_boxes(image: np.ndarray, boxes: np.ndarray, labels: list[int], names: list[str], scores: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, 3]`` with pixel ``xyxy`` boxes outlined (one colour per class) and ``"name score"`` written."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB")
    d = ImageDraw.Draw(im)
    width = max(1, round(min(im.size) / 100))
    for b, k, s in zip(np.asarray(boxes).reshape(-1, 4), labels, scores):
        colour = BOX_COLOURS[int(k) % len(BOX_COLOURS)]
        x0, y0, x1, y1 = (float(v) for v in b)
        d.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = f"{names[int(k)]} {float(s):.2f}"
        tx, ty = x0 + width + 1, (y0 - 11 if y0 >= 11 else y0 + width + 1)
        bbox = d.textbbox((tx, ty), text)
        d.rectangle(bbox, fill=(0, 0, 0))
        d.text((tx, ty), text, fill=colour)
    return np.asarray(im)


def binary_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC of scores against 0/1 labels (``None`` when only one kind of label is present)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    if labels.min(initial=0) == labels.max(initial=0):
        return None
    return float(roc_auc_score(labels, np.asarray(scores, np.float64)))


def binary_ap(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Average precision of scores against 0/1 labels (``None`` without a positive and a negative)."""
    from sklearn.metrics import average_precision_score

    labels = np.asarray(labels).astype(int)
    if labels.min(initial=0) == labels.max(initial=0):
        return None
    return float(average_precision_score(labels, np.asarray(scores, np.float64)))
