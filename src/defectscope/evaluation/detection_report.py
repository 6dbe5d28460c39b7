"""The detection report (``report.html`` of a detection run and of ``defectscope evaluate``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectscope.data.boxes import ImageBoxes
from defectscope.data.images import load_image
from defectscope.evaluation.detection import per_image_quality
from defectscope.evaluation.detection_plots import plot_box_cases
from defectscope.evaluation.report import Report
from defectscope.evaluation.run_report import crossval_table, report_training_curves


def write_detection_report(run, title: str, metrics: dict, info: dict, records: list[ImageBoxes],
                           preds: list[dict], targets: list[dict], class_names: list[str], score_threshold: float,
                           prefix: str = "", cases: int = 8) -> None:
    """Report: metrics, per-class AP, best and worst held-out images with true (green) and predicted (red) boxes.

    ``info["crossval"]`` (from the pipeline) adds the fold table (mean +- std, pooled); the
    metrics are then those of the pooled out-of-fold predictions.
    """
    rep = Report(title)
    info = dict(info)
    cv = info.pop("crossval", None)
    rep.kv("Run", info)
    keys = ("n", "n_boxes", "map_50", "map", "map_75", "mar_100", "accuracy",
            "box_mse", "box_mae", "mean_matched_iou", "box_pairs", "box_unmatched")
    if cv:
        rep.table("Cross-validation: held-out figures per fold", crossval_table(
            {**cv, "pooled": metrics}, ["n", "map_50", "map", "accuracy", "box_mae"]))
    rep.kv("Pooled out-of-fold metrics" if cv else "Test metrics", {k: metrics[k] for k in keys})
    rep.table("Per class AP (COCO, pycocotools)",
              [{"class": n, "AP@0.5": metrics["per_class_ap50"][n], "AP@[.5:.95]": metrics["per_class_ap"][n]}
               for n in class_names], ["class", "AP@0.5", "AP@[.5:.95]"])
    rep.text("box_mse / box_mae: normalised xyxy coordinates; each true box is paired one-to-one with a detection "
             f"of score >= {score_threshold} by maximum total IoU (unpaired true boxes: box_unmatched).")
    quality = np.array([per_image_quality(p, t, score_threshold) for p, t in zip(preds, targets)])
    order = np.argsort(-quality, kind="stable")
    k = min(cases, len(order))
    what = "out-of-fold" if cv else "held-out"
    for name, idx in (("best", order[:k]), ("worst", order[::-1][:k])):
        imgs = [load_image(records[i].image) for i in idx]
        titles = [f"{Path(records[i].image).name}  q={quality[i]:.2f}" for i in idx]
        plot_box_cases(imgs, [preds[i] for i in idx], [targets[i] for i in idx], class_names, titles,
                       run.plots / f"{prefix}{name}_cases.png", score_threshold,
                       suptitle=f"{name} {k} {what} images (green: true, red dashed: predicted, score >= {score_threshold})")
        rep.image(f"plots/{prefix}{name}_cases.png",
                  f"The {k} {name} {what} images by q = mean IoU of same-class one-to-one pairs "
                  f"(misses and extra detections count 0)")
    if not cv:
        report_training_curves(rep, run, "Training losses and validation mAP per epoch")
    rep.write(run.report_path)
