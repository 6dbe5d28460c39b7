"""Plots written as PNG files (matplotlib, Agg backend), atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from defectscope.utils.io import atomic_path  # noqa: E402


def save_figure(fig: "plt.Figure", path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG to ``path`` atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def plot_confusion_matrix(cm: list[list[int]] | np.ndarray, class_names: list[str], path: str | Path,
                          title: str = "Confusion matrix") -> Path:
    """Confusion matrix heat map (rows: true class, columns: predicted), counts in the cells."""
    cm = np.asarray(cm)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.1 * k + 2.5, 1.0 * k + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    vmax = cm.max() if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > vmax / 2 else "black")
    return save_figure(fig, path)


def plot_roc_curves(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], path: str | Path,
                    title: str = "ROC (one-vs-rest)") -> Path:
    """One-vs-rest ROC curve per class with its AUROC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y_true = np.asarray(y_true)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c, name in enumerate(class_names):
        pos = y_true == c
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, probs[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(pos, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def plot_training_curves(metrics_csv: str | Path, path: str | Path) -> Path | None:
    """Loss and validation curves per epoch from a Lightning ``CSVLogger`` file; ``None`` if absent."""
    import csv

    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        return None
    rows = list(csv.DictReader(metrics_csv.open()))
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        epoch = row.get("epoch")
        if epoch in (None, ""):
            continue
        for key, val in row.items():
            if key in ("epoch", "step") or val in (None, "") or key.endswith("_step"):
                continue
            if not (key.endswith("epoch") or key.startswith(("val", "train/"))):  # per-epoch values only
                continue
            series.setdefault(key, []).append((float(epoch), float(val)))
    if not series:
        return None
    losses = {k: v for k, v in series.items() if "loss" in k}
    others = {k: v for k, v in series.items() if "loss" not in k}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, group, ylabel in ((axes[0], losses, "loss"), (axes[1], others, "score")):
        for key, pts in sorted(group.items()):
            xs, ys = zip(*pts)
            ax.plot(np.array(xs) + 1, ys, marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if group:
            ax.legend(fontsize=8)
    fig.suptitle("Training curves")
    return save_figure(fig, path)
