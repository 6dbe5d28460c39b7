"""Metrics and figures of unsupervised inspection: image/pixel AUROC, clustering scores, overlays.

- :func:`image_metrics`: image AUROC and AP of anomaly scores, F1/precision/recall/accuracy at a decision.
- :func:`pixel_auroc`: AUROC of anomaly-map pixels against ground-truth masks.
- :func:`aupro`: area under the per-region-overlap curve up to a false-positive rate of 0.3
  (Bergmann et al., MVTec AD, IJCV 2021; anomalib's ``AUPRO``), normalised to [0, 1].
- :func:`f1_max`: the best F1 of the image scores over every threshold.
- :func:`anomaly_metrics`: all of them for one scored image set (what runs, folds and ``evaluate`` report).
- :func:`cluster_accuracy`: best one-to-one matching of clusters to classes (Hungarian
  algorithm, ``scipy.optimize.linear_sum_assignment``) -> share of items matched.
- :func:`clustering_metrics`: cluster accuracy, NMI and ARI (scikit-learn).
- :func:`tsne_kmeans`: t-SNE to 2-D, then K-means (paper 001, section 4.4.2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectscope.evaluation.plots import plt, save_figure


def image_metrics(y_true: np.ndarray, scores: np.ndarray, decision: np.ndarray) -> dict:
    """Image-level figures; defective is the positive class.

    Args:
        y_true: ``[N]`` 0 = good, 1 = defective.
        scores: ``[N]`` anomaly scores (higher = more anomalous).
        decision: ``[N]`` bool, the method's own normal/defective decision.

    Returns:
        ``image_auroc``, ``image_ap``, ``f1``, ``precision``, ``recall``, ``accuracy``, ``n``,
        ``n_defective`` (AUROC/AP are ``None`` when only one class is present).
    """
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    d = np.asarray(decision).astype(int)
    both = 0 < y.sum() < len(y)
    return {
        "n": int(len(y)),
        "n_defective": int(y.sum()),
        "image_auroc": float(roc_auc_score(y, s)) if both else None,
        "image_ap": float(average_precision_score(y, s)) if both else None,
        "f1": float(f1_score(y, d, zero_division=0)),
        "precision": float(precision_score(y, d, zero_division=0)),
        "recall": float(recall_score(y, d, zero_division=0)),
        "accuracy": float(accuracy_score(y, d)),
    }


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float | None:
    """AUROC of every pixel's anomaly value against the masks (all images pooled).

    Args:
        maps: ``[N, H, W]`` anomaly maps; masks: ``[N, H, W]`` bool, same shape.

    Returns:
        The AUROC, or ``None`` if the masks hold only one class.

    Raises:
        ValueError: shapes differ.
    """
    from sklearn.metrics import roc_auc_score

    maps, masks = np.asarray(maps), np.asarray(masks)
    if maps.shape != masks.shape:
        raise ValueError(f"pixel_auroc: maps {maps.shape} and masks {masks.shape} differ")
    m = masks.reshape(-1).astype(bool)
    if m.all() or not m.any():
        return None
    return float(roc_auc_score(m, maps.reshape(-1).astype(np.float32)))


def f1_max(y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """Largest F1 of "defective" over every threshold of the image scores (anomalib's ``F1Max``).

    Args:
        y_true: ``[N]`` 0 = good, 1 = defective; scores: ``[N]`` (higher = more anomalous).

    Returns:
        The F1, or ``None`` without defective images.
    """
    from sklearn.metrics import precision_recall_curve

    y = np.asarray(y_true).astype(int)
    if not y.any():
        return None
    p, r, _ = precision_recall_curve(y, np.asarray(scores, dtype=np.float64))
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    return float(f1.max())


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float | None:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (1 = perfect).

    Definition (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 129, 2021, sec. 5.2;
    anomalib's ``AUPRO``): the ground-truth defects are split into connected regions (8-connectivity,
    ``scipy.ndimage.label``). For a threshold ``t`` the per-region overlap is the share of a region's
    pixels with map value ``>= t``; PRO(t) is its mean over all regions of all images, FPR(t) the
    share of defect-free pixels (every image) with value ``>= t``. The curve (FPR, PRO) over every
    threshold, from (0, 0), is integrated by the trapezoid rule up to ``FPR = fpr_limit`` (the last
    segment interpolated linearly) and divided by ``fpr_limit``.

    Computed exactly in one pass: pixels sorted by decreasing value; each region pixel adds
    ``1 / (|region| * R)`` to PRO, each background pixel ``1 / N_bg`` to FPR; ties form one step.

    Args:
        maps: ``[N, H, W]`` anomaly maps; masks: ``[N, H, W]`` bool (same shape).
        fpr_limit: integration limit in (0, 1].

    Returns:
        The normalised area, or ``None`` when there is no defect region or no defect-free pixel.

    Raises:
        ValueError: shapes differ or ``fpr_limit`` outside (0, 1].
    """
    from scipy import ndimage

    maps, masks = np.asarray(maps, dtype=np.float32), np.asarray(masks).astype(bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"aupro: maps {maps.shape} and masks {masks.shape} must be equal [N, H, W]")
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit}")
    weight = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3), dtype=int))
        if n:
            sizes = np.bincount(lab.ravel())
            w = np.zeros_like(lab, dtype=np.float64)
            w[lab > 0] = 1.0 / sizes[lab[lab > 0]]
            weight[i] = w
            n_regions += n
    n_bg = int((~masks).sum())
    if n_regions == 0 or n_bg == 0:
        return None
    v = maps.ravel()
    order = np.argsort(-v, kind="stable")
    v = v[order]
    pro = np.cumsum(weight.ravel()[order]) / n_regions
    fpr = np.cumsum(~masks.ravel()[order]) / n_bg
    last = np.r_[np.flatnonzero(np.diff(v) != 0), len(v) - 1]  # end of each run of equal values
    fpr = np.r_[0.0, fpr[last]]
    pro = np.r_[0.0, pro[last]]
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if k < len(fpr):  # interpolate the segment crossing the limit
        f0, f1, p0, p1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        p_lim = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0) if f1 > f0 else p1
        fpr, pro = np.r_[fpr[:k], fpr_limit], np.r_[pro[:k], p_lim]
    return float(np.trapezoid(pro, fpr) / fpr_limit)


def pixel_stride(size: tuple[int, int]) -> int:
    """Pixel subsampling step of the pixel metrics (pixel AUROC, AUPRO) for maps of ``size = (H, W)``: 2 up to
    640 rows, more above (bounded memory and time); a run's test metrics and ``evaluate`` use the same."""
    return 2 * max(1, int(size[0]) // 640)


def anomaly_metrics(y_true: np.ndarray, scores: np.ndarray, decision: np.ndarray, maps: np.ndarray | None = None,
                    masks: np.ndarray | None = None) -> dict:
    """The figures of one scored image set, as the field reports them.

    Args:
        y_true: ``[N]`` 0/1; scores: ``[N]`` image anomaly scores; decision: ``[N]`` bool at the model's threshold;
        maps, masks: ``[N, H, W]`` anomaly maps and bool masks (same shape; pixel figures left out when ``None``).

    Returns:
        :func:`image_metrics` plus ``f1_max``, ``pixel_auroc``, ``aupro`` (FPR limit 0.3).
    """
    out = {**image_metrics(y_true, scores, decision), "f1_max": f1_max(y_true, scores)}
    if maps is not None and masks is not None:
        out["pixel_auroc"] = pixel_auroc(maps, masks)
        out["aupro"] = aupro(maps, masks, 0.3)
    return out


def cluster_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of items correctly labelled under the best one-to-one map of clusters to classes.

    Builds the contingency table ``C[cluster, class]`` and solves the assignment
    maximising the matched count with ``scipy.optimize.linear_sum_assignment``
    (Hungarian algorithm); clusters left unmatched (more clusters than classes)
    count as wrong.

    Args:
        y_true: ``[N]`` int class labels; y_pred: ``[N]`` int cluster ids.

    Raises:
        ValueError: lengths differ or N = 0.
    """
    from scipy.optimize import linear_sum_assignment

    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"cluster_accuracy: need two equal non-empty label arrays, got {t.shape} and {p.shape}")
    classes, ti = np.unique(t, return_inverse=True)
    clusters, pi = np.unique(p, return_inverse=True)
    table = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(table, (pi, ti), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / t.size)


def clustering_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """``cluster_accuracy`` (Hungarian), ``nmi`` and ``ari`` (scikit-learn) and ``n``."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"n": int(len(y_true)), "cluster_accuracy": cluster_accuracy(y_true, y_pred),
            "nmi": float(normalized_mutual_info_score(y_true, y_pred)),
            "ari": float(adjusted_rand_score(y_true, y_pred))}


def tsne_kmeans(features: np.ndarray, k: int, seed: int = 0, perplexity: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """Standardise, t-SNE to 2-D, K-means with ``k`` clusters (paper 001, section 4.4.2).

    Args:
        features: ``[N, F]``; k: number of clusters; seed: t-SNE and K-means seed;
        perplexity: t-SNE perplexity (reduced to ``(N - 1) / 3`` for small N).

    Returns:
        ``(embedding [N, 2], cluster ids [N])``.

    Raises:
        ValueError: fewer than ``k`` or 4 items.
    """
    from sklearn.cluster import KMeans
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    if len(x) < max(k, 4):
        raise ValueError(f"tsne_kmeans: need at least max(k, 4) = {max(k, 4)} items, got {len(x)}")
    from threadpoolctl import threadpool_limits

    x = StandardScaler().fit_transform(x)
    perp = min(perplexity, (len(x) - 1) / 3)
    with threadpool_limits(1):  # OpenMP spinning on a shared, overloaded CPU costs far more than it gains
        emb = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(x)
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(emb)
    return emb, labels


# ---------------------------------------------------------------- figures

def plot_score_histograms(rows: list[tuple[str, np.ndarray, np.ndarray, float | None]], path: str | Path) -> Path:
    """One panel per method: histograms of the scores of good and defective images, decision line.

    Args:
        rows: ``(method name, scores [N], y_true [N], threshold or None)``.
    """
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.6), squeeze=False)
    for ax, (name, s, y, thr) in zip(axes[0], rows):
        s, y = np.asarray(s), np.asarray(y).astype(bool)
        bins = np.linspace(s.min(), s.max(), 31) if s.max() > s.min() else 10
        ax.hist(s[~y], bins=bins, alpha=0.6, label=f"good ({(~y).sum()})", color="tab:green")
        ax.hist(s[y], bins=bins, alpha=0.6, label=f"defective ({y.sum()})", color="tab:red")
        if thr is not None:
            ax.axvline(thr, color="k", ls="--", lw=1, label="decision")
        ax.set_xlabel("anomaly score")
        ax.set_ylabel("images")
        ax.set_title(name)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_overlays(images: np.ndarray, masks: np.ndarray, maps: list[tuple[str, np.ndarray]], titles: list[str],
                  path: str | Path) -> Path:
    """Rows of panels per image: the image with the true mask outline, then each method's map over it.

    Args:
        images: ``[N, H, W, 3]`` uint8; masks: ``[N, H, W]`` bool;
        maps: ``(method name, [N, H, W])`` per method (each normalised per method for display);
        titles: one caption per image.
    """
    n = len(images)
    cols = 1 + len(maps)
    fig, axes = plt.subplots(cols, n, figsize=(1.25 * n + 0.5, 3.1 * cols), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j])
        if masks[j].any():
            axes[0, j].contour(masks[j], levels=[0.5], colors="red", linewidths=0.8)
        axes[0, j].set_title(titles[j], fontsize=7)
        for r, (name, m) in enumerate(maps, start=1):
            lo, hi = np.percentile(m, 1), np.percentile(m, 99.9)
            axes[r, j].imshow(images[j])
            axes[r, j].imshow(np.clip((m[j] - lo) / max(hi - lo, 1e-12), 0, 1), cmap="jet", alpha=0.5)
            if masks[j].any():
                axes[r, j].contour(masks[j], levels=[0.5], colors="white", linewidths=0.8)
            if j == 0:
                axes[r, j].set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("true mask outline: red (image row) / white (map rows)", fontsize=9)
    return save_figure(fig, path)


def plot_tsne(embedding: np.ndarray, clusters: np.ndarray, labels: np.ndarray, label_names: list[str],
              path: str | Path, title: str = "t-SNE of gradient features") -> Path:
    """Two scatter panels of the 2-D embedding: coloured by K-means cluster and by true label."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for c in np.unique(clusters):
        sel = clusters == c
        axes[0].scatter(embedding[sel, 0], embedding[sel, 1], s=10, label=f"cluster {c}")
    axes[0].set_title("coloured by K-means cluster")
    for c, name in enumerate(label_names):
        sel = labels == c
        if sel.any():
            axes[1].scatter(embedding[sel, 0], embedding[sel, 1], s=10, label=name)
    axes[1].set_title("coloured by true label")
    for ax in axes:
        ax.legend(fontsize=7, markerscale=1.5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    return save_figure(fig, path)
