"""Figures of the detection report: true and predicted boxes drawn on images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectscope.evaluation.plots import plt, save_figure

TRUE_COLOUR = "#00c040"
PRED_COLOUR = "#ff3030"


def draw_boxes_pil(image: np.ndarray, boxes: np.ndarray, labels: list[str], scores: np.ndarray | None = None,
                   colour: tuple[int, int, int] = (255, 48, 48)):
    """A PIL image of ``image`` (``[H, W, 3]`` uint8) with pixel xyxy ``boxes`` and their labels (and scores) drawn."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(image).convert("RGB")
    d = ImageDraw.Draw(im)
    for j, (b, name) in enumerate(zip(np.asarray(boxes).reshape(-1, 4), labels)):
        x0, y0, x1, y1 = (float(v) for v in b)
        d.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        text = name if scores is None else f"{name} {float(scores[j]):.2f}"
        d.text((x0 + 2, y0 + 1), text, fill=colour)
    return im


def plot_box_cases(images: list[np.ndarray], preds: list[dict], targets: list[dict], class_names: list[str],
                   titles: list[str], path: str | Path, score_threshold: float, ncols: int = 4,
                   suptitle: str = "") -> Path:
    """Grid of images with true boxes (green) and predicted boxes (red, ``score >= score_threshold``).

    Args:
        images: ``[H, W, 3]`` uint8 each. preds / targets: pixel xyxy ``boxes``, ``labels`` (and ``scores``).
        class_names: names of the label indices. titles: one caption per image.
        path: PNG to write (atomically).
    """
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.5 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, p, t, title in zip(axes.ravel(), images, preds, targets, titles):
        ax.imshow(img)
        for b, lab in zip(np.asarray(t["boxes"]).reshape(-1, 4), np.asarray(t["labels"]).reshape(-1)):
            ax.add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec=TRUE_COLOUR, lw=2))
            ax.text(b[0] + 2, b[3] - 3, class_names[int(lab)], color=TRUE_COLOUR, fontsize=7)
        scores = np.asarray(p["scores"]).reshape(-1)
        for b, lab, s in zip(np.asarray(p["boxes"]).reshape(-1, 4), np.asarray(p["labels"]).reshape(-1), scores):
            if s < score_threshold:
                continue
            ax.add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec=PRED_COLOUR, lw=1.5, ls="--"))
            ax.text(b[0] + 2, b[1] + 9, f"{class_names[int(lab)]} {s:.2f}", color=PRED_COLOUR, fontsize=7)
        ax.set_title(title, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    return save_figure(fig, path)
