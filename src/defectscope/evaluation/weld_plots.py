"""Figures and tables of the weld task's reports (paper 000): channel correlation, cross-attention overlays
(Fig. 14), seam masks and crops (Fig. 7/8), class-mean signals (Fig. 8), the Table-4 per-class layout."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from defectscope.data.weld.format import WeldDataset
from defectscope.evaluation.plots import save_figure


def plot_correlation(corr: np.ndarray, labels: list[str], selected: list[int], path: Path) -> Path:
    """Pearson heat map (eq. 1) of the channels with the selected channels marked (red)."""
    import matplotlib.pyplot as plt

    c = len(labels)
    fig, ax = plt.subplots(figsize=(8.5, 7.5))
    im = ax.imshow(corr, cmap="coolwarm", vmin=-1, vmax=1)
    short = [lab[:-3] if lab.endswith(" nm") else lab for lab in labels]
    ax.set_xticks(range(c), short, rotation=90, fontsize=6)
    ax.set_yticks(range(c), short, fontsize=6)
    for i in selected:
        ax.get_xticklabels()[i].set_color("red")
        ax.get_yticklabels()[i].set_color("red")
        ax.axhline(i, color="k", lw=0.4, alpha=0.5)
        ax.axvline(i, color="k", lw=0.4, alpha=0.5)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("Pearson correlation of the channels (train split); selected: " + ", ".join(labels[i] for i in selected), fontsize=9)
    ax.set_xlabel("wavelength (nm)" if all(lab.endswith(" nm") for lab in labels) else "channel")
    return save_figure(fig, path)


def plot_attention_overlays(crops: np.ndarray, attn: dict, grid: tuple[int, int], ids: list[str], true: list[str],
                            pred: list[str], channel_names: list[str], path: Path) -> Path | None:
    """Fig. 14: cross-attention over each weld crop.

    ``v2s`` ``[n, W, h, N, M]``: one panel per spectral token (channel), the weight image tokens give it;
    ``s2v`` ``[n, W, h, M, N]``: the attention of the spectral tokens over the image, averaged.
    """
    import matplotlib.pyplot as plt

    key = "v2s" if "v2s" in attn else "s2v" if "s2v" in attn else None
    if key is None:
        return None
    a = attn[key].mean(2)  # heads
    if key == "s2v":
        maps = a.mean(2)[..., None]  # [n, W, N, 1]
        names = ["spectra -> image"]
    else:
        maps = a  # [n, W, N, M]
        m = maps.shape[-1]
        if m > 8:  # vanilla embedding: 560 time tokens; show their mean
            maps = maps.mean(-1, keepdims=True)
            names = ["mean over time tokens"]
        else:
            names = channel_names[:m]
    n, w = maps.shape[:2]
    cols = 1 + maps.shape[-1]
    fig, axes = plt.subplots(n * w, cols, figsize=(2.6 * cols, 0.9 * n * w + 0.6), squeeze=False)
    gh, gw = grid
    for i in range(n):
        for k in range(w):
            r = i * w + k
            img = crops[i, k].transpose(1, 2, 0)
            axes[r, 0].imshow(img)
            axes[r, 0].set_title(f"{ids[i]} weld {k + 1}: {true[i]} -> {pred[i]}", fontsize=6)
            for j in range(maps.shape[-1]):
                heat = maps[i, k, :, j].reshape(gh, gw)
                up = F.interpolate(torch.from_numpy(heat)[None, None].float(), size=img.shape[:2], mode="bilinear",
                                   align_corners=False)[0, 0].numpy()
                axes[r, j + 1].imshow(img)
                axes[r, j + 1].imshow(up, cmap="jet", alpha=0.5)
                if r == 0:
                    axes[r, j + 1].set_title(names[j], fontsize=7)
            for ax in axes[r]:
                ax.axis("off")
    fig.suptitle("Cross-attention over the weld crops (first weld flipped vertically)", fontsize=8)
    return save_figure(fig, path)


def plot_seam_examples(samples: list, masks: list[np.ndarray], crops: np.ndarray, path: Path) -> Path:
    """Raw image, predicted seam mask (true mask contour) and the crops for a few samples (Fig. 7/8).

    Args:
        samples: the :class:`~defectscope.data.weld.format.WeldSample` objects shown.
        masks: their predicted masks (uint8 ``[H, W]`` each); crops: their crops uint8 ``[n, W, 3, h, w]``.
    """
    import matplotlib.pyplot as plt

    n = len(samples)
    fig, axes = plt.subplots(n, 2 + crops.shape[1], figsize=(3 * (2 + crops.shape[1]), 2.6 * n), squeeze=False)
    for r, s in enumerate(samples):
        axes[r, 0].imshow(s.image)
        axes[r, 0].set_title(f"{s.id} ({s.label})", fontsize=7)
        axes[r, 1].imshow(masks[r], cmap="gray")
        if s.mask is not None:
            axes[r, 1].contour(s.mask, levels=[0.5], colors="r", linewidths=0.5)
        axes[r, 1].set_title("predicted seam (red: true)", fontsize=7)
        for k in range(crops.shape[1]):
            axes[r, 2 + k].imshow(crops[r, k].transpose(1, 2, 0))
            axes[r, 2 + k].set_title(f"crop {k + 1}" + (" (flipped)" if k == 0 else ""), fontsize=7)
        for ax in axes[r]:
            ax.axis("off")
    return save_figure(fig, path)


#: PNG bytes of :func:`plot_spectra_examples` per live data set (``id``, dropped when the data set is
#: collected) and selected channels: the figure depends on nothing else, and a cross-validated run draws
#: it for every fold of every candidate
_SPECTRA_PNG: dict[int, dict[tuple[int, ...], bytes]] = {}


def plot_spectra_examples(ds: WeldDataset, selected: list[int], path: Path) -> Path:
    """Mean selected-channel series per class (weld 1), the signal side of Fig. 8 (raw values, in the channel's unit).

    The figure depends only on ``ds`` and ``selected``: it is drawn once per data set and channel
    selection in a process and the same PNG bytes written again (a cross-validated run's fold runs).
    """
    from defectscope.utils.io import write_bytes

    key = tuple(int(c) for c in selected)
    if id(ds) not in _SPECTRA_PNG:
        try:
            weakref.finalize(ds, _SPECTRA_PNG.pop, id(ds), None)
            _SPECTRA_PNG[id(ds)] = {}
        except TypeError:  # not weakly referable: nothing is cached
            pass
    cached = _SPECTRA_PNG.get(id(ds), {})
    if key not in cached:
        _draw_spectra_examples(ds, selected, path)
        cached[key] = Path(path).read_bytes()
        return Path(path)
    write_bytes(path, cached[key])
    return Path(path)


def _draw_spectra_examples(ds: WeldDataset, selected: list[int], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(selected), figsize=(3.2 * len(selected), 3), squeeze=False)
    labels = ds.labels
    names = ds.channel_labels
    x = np.stack([s.spectra[0] for s in ds.samples])
    for j, c in enumerate(selected):
        ax = axes[0, j]
        for k, name in enumerate(ds.classes):
            if (labels == k).any():
                ax.plot(x[labels == k, c].mean(0), lw=0.8, label=name)
        ax.set_title(names[c], fontsize=8)
        ax.set_xlabel("time step")
    axes[0, 0].set_ylabel("class mean (raw)" if ds.wavelengths_nm is None else "counts (class mean)")
    axes[0, -1].legend(fontsize=6)
    return save_figure(fig, path)


def table4_rows(metrics: dict) -> list[dict]:
    """Per-class rows in paper 000's Table-4 layout (precision, recall, F1, AUROC in %)."""
    rows = []
    for name, v in metrics["per_class"].items():
        rows.append({"class": name, "precision (%)": round(100 * v["precision"], 1), "recall (%)": round(100 * v["recall"], 1),
                     "F1 (%)": round(100 * v["f1"], 1), "AUROC (%)": None if v["auroc"] is None else round(100 * v["auroc"], 1),
                     "support": v["support"]})
    return rows


def percent_strings(rows: list[dict]) -> list[dict]:
    """Floats as ``"97.8"`` strings for the HTML table (the report's default is 4 decimals)."""
    return [{k: f"{v:.1f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]


#: columns of :func:`table4_rows`
TABLE4_COLUMNS = ["class", "precision (%)", "recall (%)", "F1 (%)", "AUROC (%)", "support"]


def seam_dice(pred: list[np.ndarray], true: list[np.ndarray | None]) -> float | None:
    """Mean Dice of predicted seam masks against true masks (pairs without a true mask are skipped).

    Each pair is scored by :func:`defectscope.evaluation.segmentation.dice_per_image` (1.0 when both
    masks are empty); masks may differ in size from pair to pair. ``None`` when no pair has a true mask.
    """
    from defectscope.evaluation.segmentation import dice_per_image

    scores = [float(dice_per_image(np.asarray(p)[None, None], np.asarray(t)[None, None])[0, 0])
              for p, t in zip(pred, true) if t is not None]
    return float(np.mean(scores)) if scores else None
