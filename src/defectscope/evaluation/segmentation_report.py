"""The segmentation report (``report.html`` of a segmentation run and of ``defectscope evaluate``)."""

from __future__ import annotations

import numpy as np

from defectscope.evaluation.report import Report
from defectscope.evaluation.run_report import crossval_table, report_sections, report_training_curves
from defectscope.evaluation.segmentation_plots import plot_image_level_curves, plot_mask_overlays


def write_segmentation_report(run, title: str, metrics: dict, x: np.ndarray, y: np.ndarray, probs: np.ndarray,
                              ids: list[str], scores: np.ndarray, dice: np.ndarray, info: dict, threshold: float,
                              prefix: str = "", crossval: dict | None = None, decisions: dict | None = None) -> None:
    """Report: run facts, metrics, image-level ROC/PR, overlays on defective and good images, training curves.

    Args:
        metrics: from :func:`segmentation_metrics` (the lists may be absent).
        x, y, probs: ``uint8 [N, 3, H, W]`` images, ``[N, 1, H, W]`` true masks and probabilities.
        ids: ``N`` image names for the overlay titles; scores, dice: ``[N]`` image scores and Dice.
        prefix: file-name prefix of the figures (``oof_`` for cross-validation).
        crossval: the pipeline's ``{"folds", "mean", "std"}``: adds the fold table; the metrics
            are then the pooled out-of-fold ones and no training curves are drawn.
    """
    rep = Report(title)
    rep.kv("Run", info)
    keys = ["n", "n_defective", "image_ap", "image_auroc", "dice", "dice_defective", "pixel_auroc"]
    if crossval:
        rep.table("Cross-validation: held-out figures per fold", crossval_table({**crossval, "pooled": metrics}, keys))
    what = "out-of-fold" if crossval else "held-out"
    rep.kv("Pooled out-of-fold metrics" if crossval else "Held-out metrics",
           {k: metrics[k] for k in ("n", "n_defective", "dice", "iou", "dice_defective", "iou_defective",
                                    "pixel_auroc", "image_ap", "image_auroc", "threshold", "image_score")})
    defective = y.reshape(len(y), -1).any(axis=1)
    scores, dice = np.asarray(scores, dtype=float), np.asarray(dice, dtype=float)
    if plot_image_level_curves(defective, scores, run.plots / f"{prefix}image_level_curves.png"):
        rep.image(f"plots/{prefix}image_level_curves.png", f"Image level ({what}): ROC and precision-recall of 'defect present'")
    pos = np.flatnonzero(defective)[:10]
    neg_all = np.flatnonzero(~defective)
    hardest = neg_all[np.argsort(-scores[neg_all])][:3]
    rest = np.setdiff1d(neg_all, hardest)
    neg = np.concatenate([hardest, np.random.default_rng(0).permutation(rest)[:3]]).astype(int)
    for name, idx, caption in (("defective", pos, f"Defective {what} images"),
                               ("good", neg, f"Good {what} images (3 with the highest scores, 3 at random)")):
        if len(idx):
            titles = [f"{ids[i]} s={scores[i]:.2f} d={dice[i]:.2f}" for i in idx]
            plot_mask_overlays(x[idx], y[idx, 0], probs[idx, 0], titles, run.plots / f"{prefix}overlays_{name}.png", threshold)
            rep.image(f"plots/{prefix}overlays_{name}.png",
                      f"{caption}: predicted mask red, true mask green outline; s = image score, d = Dice")
    if not prefix and not crossval:
        report_training_curves(rep, run, "Training loss per epoch")
    report_sections(rep, run, {"decisions": decisions})
    rep.write(run.report_path)
