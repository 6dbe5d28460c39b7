"""The weld report (``report.html`` of a weld run and of its cross-validation): run facts, candidates,
fold table, paper 000's Table 4, confusion matrix, ROC curves, channel correlation and selected spectra,
seam segmentation examples, cross-attention overlays (Fig. 14), training curves."""

from __future__ import annotations

import numpy as np

from defectscope.evaluation.plots import plot_confusion_matrix, plot_roc_curves
from defectscope.evaluation.report import Report
from defectscope.evaluation.run_report import crossval_table, report_sections, report_training_curves, selection_section
from defectscope.evaluation.weld_plots import (
    TABLE4_COLUMNS,
    percent_strings,
    plot_attention_overlays,
    plot_correlation,
    plot_seam_examples,
    plot_spectra_examples,
    table4_rows,
)


def write_weld_report(run, ds, title: str, run_kv: dict, metrics: dict, y: np.ndarray, idx: np.ndarray, raw: dict,
                      info: dict, cv: dict | None = None) -> None:
    """Write ``run.report_path``.

    Args:
        run: the run folder (``path``, ``plots``, ``report_path``).
        ds: the :class:`~defectscope.data.weld.format.WeldDataset` the samples come from (classes, channel
            labels, samples, ``synthetic``).
        title: the page title; run_kv: the "Run" facts.
        metrics: the task's metrics (classification figures, ``per_class``, ``confusion_matrix``, ``seam_dice``).
        y: ``[N]`` true class indices of the scored samples; idx: ``[N]`` their positions in ``ds.samples``.
        raw: the task's raw predictions (``probs [N, K]``; single split: ``corr``, ``selected``, ``masks``,
            ``crops``, ``attn``, ``grid``).
        info: the pipeline's info (candidates, ``decisions``). cv: the cross-validation's folds / mean / std
            (adds the fold table; the figures are then the pooled out-of-fold ones).
    """
    rep = Report(title, synthetic=ds.synthetic)
    what = "pooled out-of-fold predictions" if cv else "the held-out split"
    probs = raw["probs"]
    rep.kv("Run", run_kv)
    selection_section(rep, info)
    if cv:
        rep.table("Cross-validation: held-out figures per fold", crossval_table(
            {**cv, "pooled": metrics}, ["n", "accuracy", "weighted_f1", "macro_f1", "macro_auroc", "seam_dice"]))
    rep.kv("Test metrics" if not cv else "Pooled out-of-fold metrics",
           {k: metrics[k] for k in ("n", "accuracy", "weighted_precision", "weighted_recall", "weighted_f1",
                                    "macro_f1", "macro_auroc", "seam_dice")})
    rep.table("Per class (paper 000 Table 4 layout)", percent_strings(table4_rows(metrics)), TABLE4_COLUMNS)
    plot_confusion_matrix(metrics["confusion_matrix"], ds.classes, run.plots / "confusion_matrix.png")
    rep.image("plots/confusion_matrix.png", f"Confusion matrix on {what} (rows: true class)")
    plot_roc_curves(y, probs, ds.classes, run.plots / "roc_curves.png")
    rep.image("plots/roc_curves.png", f"One-vs-rest ROC curves on {what}")
    if cv:
        report_sections(rep, run, {"decisions": info.get("decisions")})
        rep.write(run.report_path)
        return
    labels = ds.channel_labels
    selected = raw["selected"]
    plot_correlation(raw["corr"], labels, selected, run.plots / "channel_correlation.png")
    rep.image("plots/channel_correlation.png", "Pearson correlation between the channels (eq. 1) and the selected channels (red)")
    plot_spectra_examples(ds, selected, run.plots / "spectra_by_class.png")
    rep.image("plots/spectra_by_class.png", "Selected channels, class means of weld 1 (raw values)")
    masks, crops = raw["masks"], raw["crops"]
    present = [c for c in range(len(ds.classes)) if (y == c).any()]
    if masks is not None:
        pick = [int(np.flatnonzero(y == c)[0]) for c in present][:4]
        plot_seam_examples([ds.samples[idx[j]] for j in pick], [masks[j] for j in pick], crops[pick],
                           run.plots / "seam_segmentation.png")
        dice = metrics.get("seam_dice")
        rep.image("plots/seam_segmentation.png", "Seam U-Net on held-out samples"
                  + (f" (mean Dice {dice:.3f})" if dice is not None else "") + " and the weld crops")
    attn = raw["attn"]
    if attn and raw["grid"] is not None:
        pick = [int(np.flatnonzero(y == c)[0]) for c in present][:5]
        done = plot_attention_overlays(crops[pick], {k: v[pick] for k, v in attn.items()}, raw["grid"],
                                       [ds.samples[idx[j]].id for j in pick], [ds.classes[y[j]] for j in pick],
                                       [ds.classes[int(probs[j].argmax())] for j in pick], [labels[i] for i in selected],
                                       run.plots / "attention_overlays.png")
        if done:
            rep.image("plots/attention_overlays.png", "Cross-attention weights over the weld crops (Fig. 14): per signal "
                      "channel token, how strongly each image region attends to it")
    report_training_curves(rep, run, "Training loss and validation scores per epoch")
    report_sections(rep, run, {"decisions": info.get("decisions")})
    rep.write(run.report_path)
