"""The anomaly report (``report.html`` of an anomaly run, of its cross-validation and of ``defectscope evaluate``).

Nothing here trains or loads a model: the caller passes the scored images (scores, decisions, maps at a
pixel stride) and the images and masks they were scored on.
"""

from __future__ import annotations

import numpy as np

from defectscope.evaluation.anomaly import plot_overlays, plot_score_histograms
from defectscope.evaluation.report import Report
from defectscope.evaluation.run_report import crossval_table, report_sections, report_training_curves

#: cross-validation table columns
CV_KEYS = ["n", "n_defective", "image_auroc", "image_ap", "f1_max", "f1", "pixel_auroc", "aupro"]
#: the results table columns
METRIC_KEYS = ["method", "image_auroc", "image_ap", "f1_max", "f1", "precision", "recall", "accuracy", "pixel_auroc",
               "aupro", "n", "n_defective"]


def write_anomaly_report(run, title: str, info: dict, metrics: dict, labels: np.ndarray, x: np.ndarray,
                         masks: np.ndarray, ids: list[str], idx: np.ndarray, raw: dict, threshold: float | None,
                         model_label: str, clustering: dict | None = None, crossval: dict | None = None,
                         decisions: dict | None = None, curves: bool = False) -> None:
    """The report: results table (and fold table), score histogram, overlays against true masks, t-SNE, curves.

    Args:
        run: the folder written to (a :class:`~defectscope.engine.run.RunFolder`: ``plots``, ``report_path``, ``path``).
        info: the "Run" facts (key -> value).
        metrics: the model's figures (:func:`defectscope.evaluation.anomaly.anomaly_metrics`).
        labels: ``[M]`` 0 = good, 1 = defective; x: uint8 images ``[M, 3, H, W]``; masks: bool ``[M, H, W]``;
            ids: ``M`` image names; idx: ``[N]`` positions of the scored images in them, in the order of ``raw``.
        raw: ``score [N]``, ``decision [N]``, ``maps [N, H / stride, W / stride]`` and ``stride`` (pixels).
        threshold: the decision drawn in the histogram (``None``: one per fold).
        crossval: ``{"folds", "mean", "std", "pooled"}`` of a cross-validation with scalar figures (adds the fold table).
        decisions: the pipeline's decisions section (operating points), if any.
        curves: add the training-loss curves (models that train a network).
    """
    rep = Report(title)
    rep.kv("Run", info)
    if crossval:
        rep.table("Cross-validation: held-out figures per fold", crossval_table(crossval, CV_KEYS))
    rep.table(("Pooled out-of-fold" if crossval else "Test") + " metrics (defective = positive class)",
              [{"method": model_label, **metrics}], METRIC_KEYS)
    y = labels[idx]
    plot_score_histograms([(model_label, raw["score"], y, threshold)], run.plots / "score_histograms.png")
    rep.image("plots/score_histograms.png", "Score histograms of good and defective test images; dashed: the decision")
    bad, good = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    pick = list(bad[np.argsort(-raw["score"][bad])][:4]) + list(bad[np.argsort(raw["score"][bad])][:2]) + list(good[:2])
    if pick:
        pos = idx[pick]
        st = raw["stride"]
        imgs = x[pos][:, :, ::st, ::st].transpose(0, 2, 3, 1)
        titles = [f"{ids[i]} {'defect' if labels[i] else 'good'}" for i in pos]
        plot_overlays(imgs, masks[pos][:, ::st, ::st], [(model_label, raw["maps"][pick])], titles,
                      run.plots / "overlays.png")
        rep.image("plots/overlays.png", "Anomaly maps over the image; true mask outline in red/white "
                  "(4 highest- and 2 lowest-scored defective images, 2 good ones)")
    if clustering is not None:
        rep.kv("Defect-type clustering (t-SNE + K-means, Hungarian-matched)",
               {k: v for k, v in clustering.items() if not isinstance(v, (dict, list))})
        rep.image("plots/tsne_clusters.png", "t-SNE of the gradient features, coloured by cluster and by true label")
    if curves and not crossval:
        report_training_curves(rep, run, "Training loss toward y = 0 (normal images only)")
    report_sections(rep, run, {"decisions": decisions})
    rep.write(run.report_path)
