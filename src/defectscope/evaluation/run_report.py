"""Report sections every run's ``report.html`` shares: the cross-validation fold table, the
candidates of a cross-validated run (:func:`selection_section`), the "Decisions" section
(operating points, calibration) and the training curves.

Used by the pipeline (:mod:`defectscope.engine.pipeline`), the task reports and ``defectscope
evaluate``; nothing here trains or loads a model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def crossval_table(crossval: dict, keys: list[str]) -> list[dict]:
    """Report rows: one per fold, then ``mean +- std`` and ``pooled``, for the metric ``keys``."""
    rows = []
    for k, m in enumerate(crossval["folds"]):
        rows.append({"fold": str(k + 1), **{key: m.get(key) for key in keys}})
    rows.append({"fold": "mean +- std", **{key: (f"{crossval['mean'][key]:.4f} +- {crossval['std'][key]:.4f}"
                                                 if key in crossval["mean"] else None) for key in keys}})
    if "pooled" in crossval:
        rows.append({"fold": "pooled (out-of-fold)", **{key: crossval["pooled"].get(key) for key in keys}})
    return rows


def report_sections(rep, run, info: dict, keys: list[str] | None = None) -> None:
    """Add the pipeline's report sections: the cross-validation fold table and the "Decisions" section.

    Every task's ``write_report`` calls it before writing (``info`` as the pipeline passed it;
    ``keys``: the metrics shown per fold).
    """
    cv = info.get("crossval")
    if cv and keys:
        rep.table("Cross-validation: held-out figures per fold", crossval_table(cv, keys))
    dec = info.get("decisions")
    if not dec:
        return
    from defectscope.evaluation.decision_report import add_decisions_section

    if "points" in dec:
        add_decisions_section(rep, run.path, dec["val"][0], dec["val"][1], dec["points"],
                              test_defective=dec["test"][0], test_scores=dec["test"][1],
                              calibration=dec.get("calibration"), probs_before=dec.get("probs_before"),
                              probs_after=dec.get("probs_after"), y_true=dec.get("y_true"),
                              chosen_on=dec.get("chosen_on", "validation"))
    elif dec.get("calibration"):
        add_decisions_section(rep, run.path, np.zeros(0, bool), np.zeros(0), [], calibration=dec["calibration"],
                              probs_before=dec.get("probs_before"), probs_after=dec.get("probs_after"),
                              y_true=dec.get("y_true"))


def _figures(row: dict, result: dict) -> dict:
    """``row`` plus the pooled and mean +- std figures of a candidate's (or the nested) cross-validation."""
    for k in ("accuracy", "weighted_f1", "macro_auroc"):
        if k in result["pooled"]:
            row[f"pooled {k}"] = result["pooled"][k]
            if k in result["mean"]:
                row[f"{k} mean +- std"] = f"{result['mean'][k]:.4f} +- {result['std'][k]:.4f}"
    return row


def selection_rows(selection: dict) -> list[dict]:
    """Report rows: one per candidate with its pooled and mean +- std figures, the chosen one marked."""
    rows = [_figures({"candidate": name + (" (chosen)" if name == selection["chosen"] else ""),
                      "what": c["description"]}, c) for name, c in selection["candidates"].items()]
    nested = selection.get("nested")
    if nested:
        rows.append(_figures({"candidate": "nested selection (unbiased)",
                              "what": "chosen inside each outer fold: " + ", ".join(nested["chosen_per_fold"])}, nested))
    return rows


def split_selection_rows(selection: dict) -> list[dict]:
    """Report rows of a single-split selection: every candidate's validation figures side by side; the test
    figures of the chosen one only (the others' are in their own run folders; no choice reads them)."""
    rows = []
    for name, c in selection["candidates"].items():
        row = {"candidate": name + (" (chosen)" if name == selection["chosen"] else ""), "what": c["description"]}
        for k in ("accuracy", "weighted_f1", "macro_auroc"):
            if k in c["val"]:
                row[f"val {k}"] = c["val"][k]
        for k in ("accuracy", "weighted_f1", "macro_auroc"):
            row[f"test {k}"] = selection.get("test", {}).get(k) if name == selection["chosen"] else "not used"
        rows.append(row)
    return rows


def selection_section(rep, info: dict) -> None:
    """Add the "Candidates" section (every candidate's out-of-fold or validation figures, the choice and
    why, the delivered model and the optimism note) to a report, when the pipeline passed
    ``info["selection"]`` (``selection["on"] == "validation"``: a single split)."""
    sel = info.get("selection")
    if not sel:
        return
    if len(sel["candidates"]) > 1 and sel.get("on") == "validation":
        rep.table("Candidates on the same validation part (the test part is read by no choice)",
                  split_selection_rows(sel))
    elif len(sel["candidates"]) > 1:
        rep.table("Candidates on the same folds (pooled out-of-fold and mean +- std over folds)", selection_rows(sel))
    if len(sel["candidates"]) > 1:
        rep.text(f"Chosen: {sel['chosen']}: {sel['why']}. {sel['note']}")
    rep.text(f"The deployable model (model.ckpt) is {sel['model']['what']}. "
             + " ".join(f"{n}." for n in sel["model"].get("notes", [])))


def csv_log_path(run_dir: Path) -> Path:
    """The per-epoch metrics file that :func:`build_trainer`'s CSV logger writes into a run folder."""
    return Path(run_dir) / "logs" / "csv" / "metrics.csv"


def report_training_curves(rep, run, caption: str) -> bool:
    """Draw the run's training curves to ``plots/training_curves.png`` and add them to the report.

    Args:
        rep: the :class:`defectscope.evaluation.report.Report` being written.
        run: the run folder (``.path``, ``.plots``).
        caption: the figure caption.

    Returns:
        ``True`` if the CSV log existed and the figure was added, else ``False`` (nothing drawn).
    """
    from defectscope.evaluation.plots import plot_training_curves

    if plot_training_curves(csv_log_path(run.path), run.plots / "training_curves.png") is None:
        return False
    rep.image("plots/training_curves.png", caption)
    return True


