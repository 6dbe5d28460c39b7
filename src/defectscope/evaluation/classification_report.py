"""The classification report (``report.html`` of a classification run and of ``defectscope evaluate``)."""

from __future__ import annotations

import numpy as np

from defectscope.evaluation.plots import plot_confusion_matrix, plot_roc_curves
from defectscope.evaluation.report import Report
from defectscope.evaluation.run_report import report_sections, report_training_curves, selection_section


def write_classification_report(run, title: str, metrics: dict, y_true: np.ndarray, probs: np.ndarray,
                                class_names: list[str], info: dict, prefix: str = "", baseline_note: str | None = None) -> None:
    """Report with the metrics table, per-class table, confusion matrix, ROC and training curves.

    ``info["crossval"]`` / ``info["decisions"]`` (from the pipeline) add the fold table (mean +-
    std, pooled) and the "Decisions" section (operating points, reliability diagram).
    """
    rep = Report(title)
    info = dict(info)
    cv = info.pop("crossval", None)
    dec = info.pop("decisions", None)
    selection = info.pop("selection", None)
    rep.kv("Run", info)
    selection_section(rep, {"selection": selection})
    report_sections(rep, run, {"crossval": cv}, ["n", "accuracy", "weighted_f1", "macro_f1", "macro_auroc"])
    what = "pooled out-of-fold predictions" if cv else "the held-out split"
    rep.kv("Test metrics" if not cv else "Pooled out-of-fold metrics",
           {k: metrics[k] for k in ("n", "accuracy", "weighted_precision", "weighted_recall",
                                    "weighted_f1", "macro_f1", "macro_auroc")})
    ref = metrics.get("reference", {}).get("linear_probe")
    if ref:
        keys = ("accuracy", "weighted_f1", "macro_f1", "macro_auroc")
        rows = [{"model": "this run's model", **{k: metrics[k] for k in keys}},
                {"model": "linear probe (logistic regression on frozen pooled features)", **{k: ref[k] for k in keys}}]
        if cv:
            for name, pre in (("this run's model", ""), ("linear probe", "reference.linear_probe.")):
                rows.append({"model": f"{name}: mean +- std over folds",
                             **{k: (f"{cv['mean'][pre + k]:.4f} +- {cv['std'][pre + k]:.4f}" if pre + k in cv["mean"] else None)
                                for k in keys}})
        rep.table("Did fine-tuning earn its cost? The model against a linear-probe reference on the same "
                  + ("folds" if cv else "test part"), rows)
    rep.table("Per class", [{"class": n, **v} for n, v in metrics["per_class"].items()],
              ["class", "precision", "recall", "f1", "auroc", "support"])
    plot_confusion_matrix(metrics["confusion_matrix"], class_names, run.plots / f"{prefix}confusion_matrix.png")
    rep.image(f"plots/{prefix}confusion_matrix.png", f"Confusion matrix on {what} (rows: true class)")
    plot_roc_curves(y_true, probs, class_names, run.plots / f"{prefix}roc_curves.png")
    rep.image(f"plots/{prefix}roc_curves.png", f"One-vs-rest ROC curves on {what}")
    if not cv:
        report_training_curves(rep, run, "Training loss and validation scores per epoch")
    if baseline_note:
        rep.text(baseline_note)
    report_sections(rep, run, {"decisions": dec})
    rep.write(run.report_path)
