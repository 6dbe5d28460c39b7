"""The multicnn report (``report.html`` of a multicnn run and of its cross-validation): the paper 003
comparison of every member, the feature fusion and the late fusion (Tables 2-4 layout), confusion
matrices, ROC curves, training curves."""

from __future__ import annotations

import numpy as np

from defectscope.evaluation.plots import plot_confusion_matrix, plot_roc_curves, plot_training_curves
from defectscope.evaluation.report import Report
from defectscope.evaluation.run_report import crossval_table, csv_log_path


def write_multicnn_report(run, members: list, data_name: str, class_names: list[str], y: np.ndarray, raw: dict,
                          metrics: dict, info: dict) -> None:
    """Write ``run.report_path``.

    Args:
        run: the run folder (``path``, ``plots``, ``report_path``); member runs are under ``run.path / "members"``.
        members: the recipe's members (``key``, ``backbone``, ``freeze_unit``), in order.
        data_name: the data folder's name (title).
        class_names: ``K`` class names; y: ``[N]`` true class indices of the scored images.
        raw: class probabilities ``[N, K]`` by model (each member key, ``feature_fusion``, ``late_fusion``).
        metrics: the task's metrics (``comparison``, ``members``, ``per_class``, ``best_single``, ...).
        info: the run's facts (split, seconds, feature cache and order, members; ``crossval`` of a cross-validation).
    """
    names, keys = list(class_names), [m.key for m in members]
    cv = info.get("crossval")
    rep = Report(f"defectscope multicnn: feature fusion of {', '.join(keys)} on {data_name}"
                 + (" (cross-validation)" if cv else ""))
    if cv:
        where = "the pooled out-of-fold predictions"
        rep.kv("Run", {k: v for k, v in info.items() if k != "crossval"})
        rep.table("Cross-validation: feature fusion on each fold's held-out part", crossval_table(
            {**cv, "pooled": metrics}, ["n", "accuracy", "weighted_f1", "macro_f1", "macro_auroc"]))
        rows = []
        for k in [*keys, "feature_fusion", "late_fusion"]:
            pre = "" if k == "feature_fusion" else f"members.{k}."
            pooled = metrics if k == "feature_fusion" else metrics["members"][k]
            rows.append({"model": k, **{f"{s} (mean +- std)": f"{cv['mean'][pre + s]:.4f} +- {cv['std'][pre + s]:.4f}"
                                         for s in ("accuracy", "weighted_f1") if pre + s in cv["mean"]},
                         "pooled weighted_f1": pooled["weighted_f1"]})
        rep.table("Every model over the folds", rows)
        comparison = metrics["comparison"]
    else:
        where = "the held-out split"
        split, cache = info["split"], info["feature_cache"]
        how = (f"fold {split['fold']} of {split['folds']} (cross-validation, seed {split.get('cv_seed')})"
               if "fold" in split else
               f"stratified {1 - split['test_fraction']:.0%}/{split['test_fraction']:.0%}, seed {split['seed']}")
        rep.kv("Run", {"data": info["data"], "split": how,
                       "train / val / test images": " / ".join(str(split.get(s, 0)) for s in ("train", "val", "test")),
                       "total seconds": info["train_seconds"], "members seconds": info["member_seconds"],
                       "feature extraction seconds": info["feature_seconds"],
                       "fusion head seconds": info["fusion_seconds"],
                       "feature cache": f"{cache['hits']} hits, {cache['misses']} misses"})
        secs = {k: info["members"][k].get("train_seconds") for k in keys}
        secs.update(feature_fusion=info["fusion_seconds"], late_fusion=0.0)
        comparison = [{**r, "train_seconds": secs[r["model"]]} for r in metrics["comparison"]]
    rep.table(f"Comparison on {where} (paper 003 Tables 2-3 layout)", comparison,
              ["model", "kind", "accuracy", "weighted_precision", "weighted_recall", "weighted_f1", "macro_auroc",
               *([] if cv else ["train_seconds"])])
    rows = [{"class": n, **v} for n, v in metrics["per_class"].items()]
    rows.append({"class": "weighted average", "precision": metrics["weighted_precision"],
                 "recall": metrics["weighted_recall"], "f1": metrics["weighted_f1"], "support": metrics["n"]})
    rep.table("Per class, feature fusion (paper 003 Table 4 layout)", rows, ["class", "precision", "recall", "f1", "support"])
    if not cv:
        rep.table("Fusion order of the concatenated features", info["feature_order"], ["member", "start", "end"])
        rep.table("Members", [{"member": m.key, "backbone": m.backbone, "weights": info["members"][m.key]["weights"],
                               "input px": info["members"][m.key]["image_size"],
                               "frozen": f"first {info['members'][m.key]['freeze']['n']} {m.freeze_unit}",
                               **{k: info["members"][m.key]["freeze"][k] for k in ("frozen_params", "trainable_params")},
                               "epochs run": info["members"][m.key].get("epochs_run")} for m in members])
    for key in [*keys, "feature_fusion", "late_fusion"]:
        mk = metrics if key == "feature_fusion" else metrics["members"][key]
        plot_confusion_matrix(mk["confusion_matrix"], names, run.plots / f"{key}_confusion_matrix.png",
                              title=f"{key} (weighted F1 {mk['weighted_f1']:.4f})")
        rep.image(f"plots/{key}_confusion_matrix.png", f"Confusion matrix on {where}, {key} (rows: true class)")
    plot_roc_curves(y, raw["feature_fusion"], names, run.plots / "feature_fusion_roc_curves.png")
    rep.image("plots/feature_fusion_roc_curves.png", f"One-vs-rest ROC curves on {where}, feature fusion")
    if not cv:
        for k in keys:
            if plot_training_curves(csv_log_path(run.path / "members" / k), run.plots / f"{k}_training_curves.png"):
                rep.image(f"plots/{k}_training_curves.png", f"Fine-tuning curves, {k}")
        rep.table("Fusion classifier training (cached features)", info["fusion_training"]["history"],
                  ["epoch", "train_loss", "val_loss", "val_weighted_f1", "best"])
    best = metrics["best_single"]
    verdict = "helps" if metrics["fusion_beats_best_single"] else "does NOT help"
    rep.text(f"Feature fusion {verdict} on {where}: fused weighted F1 {metrics['weighted_f1']:.4f} vs best single "
             f"({best}) {metrics['members'][best]['weighted_f1']:.4f}; "
             f"late fusion {metrics['members']['late_fusion']['weighted_f1']:.4f}.")
    rep.write(run.report_path)

