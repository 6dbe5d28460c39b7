"""Figures of the segmentation task: mask overlays and image-level ROC/PR curves (PNG, atomic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectscope.evaluation.plots import plt, save_figure


def plot_mask_overlays(images: np.ndarray, true: np.ndarray, probs: np.ndarray, titles: list[str], path: str | Path,
                       threshold: float = 0.5, suptitle: str = "") -> Path:
    """Image with the true mask (green outline) and predicted mask (red fill) side by side with the probability map.

    Args:
        images: ``uint8 [N, 3, H, W]``.
        true: ``[N, H, W]`` 0/1 true masks (one class).
        probs: ``[N, H, W]`` probabilities in [0, 1].
        titles: one caption per image.
    """
    n = len(images)
    fig, axes = plt.subplots(2, max(n, 1), figsize=(1.6 * max(n, 1) + 0.5, 7.5), squeeze=False)
    for i in range(n):
        img = images[i].transpose(1, 2, 0)
        ax = axes[0, i]
        ax.imshow(img, cmap="gray")
        pred = probs[i] >= threshold
        overlay = np.zeros((*pred.shape, 4))
        overlay[pred] = (1.0, 0.1, 0.1, 0.45)
        ax.imshow(overlay)
        if true[i].any():
            ax.contour(true[i], levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(titles[i], fontsize=7)
        ax.axis("off")
        axes[1, i].imshow(probs[i], vmin=0, vmax=1, cmap="magma")
        axes[1, i].axis("off")
    for j in range(n, axes.shape[1]):
        axes[0, j].axis("off")
        axes[1, j].axis("off")
    fig.suptitle(suptitle or "top: image, predicted mask (red) and true mask (green outline); bottom: probability", fontsize=9)
    return save_figure(fig, path)


def plot_image_level_curves(defective: np.ndarray, scores: np.ndarray, path: str | Path) -> Path | None:
    """ROC and precision-recall curves of the "defect present" score; ``None`` with one kind of image only."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    defective = np.asarray(defective).astype(bool)
    if defective.all() or not defective.any():
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
    fpr, tpr, _ = roc_curve(defective, scores)
    a.plot(fpr, tpr, label=f"AUROC {roc_auc_score(defective, scores):.3f}")
    a.plot([0, 1], [0, 1], "k--", lw=0.8)
    a.set_xlabel("false positive rate")
    a.set_ylabel("true positive rate")
    a.legend(loc="lower right")
    prec, rec, _ = precision_recall_curve(defective, scores)
    b.step(rec, prec, where="post", label=f"AP {average_precision_score(defective, scores):.3f}")
    b.set_xlabel("recall")
    b.set_ylabel("precision")
    b.set_ylim(0, 1.02)
    b.legend(loc="lower left")
    fig.suptitle("Image level: defect present (score = max mask probability)")
    return save_figure(fig, path)
