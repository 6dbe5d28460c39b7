"""The "Decisions" section of a run's report: ROC with the chosen operating points, their table, reliability.

Usage (in a task's report step)::

    points = operating_points(val_scores, val_defective, targets, test_scores, test_defective)
    add_decisions_section(rep, run_dir, val_defective, val_scores, points, test_defective, test_scores,
                          calibration=cal, probs_before=test_probs, probs_after=test_probs_t, y_true=test_y)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectscope.evaluation.report import Report

TABLE_COLUMNS = ["target escape rate", "threshold", "val escape rate", "escape rate upper 95 %", "bound reaches target",
                 "false-call rate", "false-call rate 95 % CI", "test escape rate", "test false-call rate",
                 "defective samples used", "defective samples needed"]


def plot_roc_with_operating_points(val_defective: np.ndarray, val_scores: np.ndarray, points: list[dict],
                                   path: str | Path, test_defective: np.ndarray | None = None,
                                   test_scores: np.ndarray | None = None) -> Path:
    """ROC (false-call rate vs 1 - escape rate) of validation and test with the operating points marked.

    Circles: each point's validation false-call rate and ``1 - escape rate`` at its threshold; crosses:
    the same threshold re-measured on test. Written atomically as PNG.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    from defectscope.evaluation.decisions import escape_rate, false_call_rate
    from defectscope.evaluation.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(5.8, 5.2))
    parts = [("validation", val_defective, val_scores, "o")]
    if test_scores is not None:
        parts.append(("test", test_defective, test_scores, "x"))
    for name, y, s, marker in parts:
        y = np.asarray(y).astype(bool)
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, s)
        line, = ax.plot(fpr, tpr, lw=1.2, label=f"{name} (AUROC {roc_auc_score(y, s):.3f})")
        for p in points:
            esc, n_def = escape_rate(s, y, p["threshold"])
            fc, n_good = false_call_rate(s, y, p["threshold"])
            ax.plot(fc / max(n_good, 1), 1 - esc / n_def, marker, color=line.get_color(), ms=8, mew=2, mfc="none")
            if name == "validation":
                ax.annotate(f"{100 * p['target_escape_rate']:g} %", (fc / max(n_good, 1), 1 - esc / n_def),
                            textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false-call rate (good parts rejected)")
    ax.set_ylabel("1 - escape rate (defective parts rejected)")
    ax.set_title("ROC with operating points (o: validation, x: test)")
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def operating_point_rows(points: list[dict]) -> list[dict]:
    """Table rows (:data:`TABLE_COLUMNS`) for :meth:`Report.table` from :func:`operating_points` output."""
    rows = []
    for p in points:
        ci = p.get("false_call_rate_ci_95")
        rows.append({
            "target escape rate": p["target_escape_rate"], "threshold": p["threshold"],
            "val escape rate": p.get("escape_rate"),
            "escape rate upper 95 %": p["escape_rate_upper_95"],
            "bound reaches target": "yes" if p["bound_reaches_target"] else "no",
            "false-call rate": p["false_call_rate"],
            "false-call rate 95 % CI": f"{ci[0]:.4f} - {ci[1]:.4f}" if ci else None,
            "test escape rate": p["test_escape_rate"], "test false-call rate": p["test_false_call_rate"],
            "defective samples used": p["n_defective_used"], "defective samples needed": p["n_defective_needed"],
        })
    return rows


def add_decisions_section(report: Report, report_dir: str | Path, val_defective: np.ndarray, val_scores: np.ndarray,
                          points: list[dict], test_defective: np.ndarray | None = None,
                          test_scores: np.ndarray | None = None, calibration: dict | None = None,
                          probs_before: np.ndarray | None = None, probs_after: np.ndarray | None = None,
                          y_true: np.ndarray | None = None, plots_subdir: str = "plots",
                          chosen_on: str = "validation") -> Report:
    """Append the "Decisions" section to ``report`` and write its figures under ``report_dir/plots_subdir``.

    Args:
        report: the run's :class:`Report`.
        report_dir: folder of ``report.html`` (figures are linked relative to it).
        val_defective, val_scores: ``[N]`` ground truth and defect scores the thresholds were chosen on.
        points: output of :func:`defectscope.evaluation.decisions.operating_points`.
        test_defective, test_scores: ``[M]`` test part (optional).
        calibration: output of :func:`defectscope.evaluation.calibration.calibrate` (optional).
        probs_before, probs_after, y_true: ``[M, K]`` probabilities before/after temperature scaling
            and ``[M]`` labels of the part ECE was measured on, for the reliability diagram (optional).
        plots_subdir: figure folder relative to ``report_dir``.
        chosen_on: wording for where thresholds were chosen ("validation" or "out-of-fold predictions").

    Returns:
        ``report`` (for chaining).
    """
    report_dir = Path(report_dir)
    (report_dir / plots_subdir).mkdir(parents=True, exist_ok=True)
    report.heading("Decisions")
    report.text(f"A part is rejected when its defect score is at or above the threshold. Thresholds are chosen on "
                f"the {chosen_on} scores for each target escape rate (defective parts accepted), never on the test "
                f"part; the escape-rate bound is the exact one-sided 95 % Clopper-Pearson upper bound, the "
                f"false-call rate (good parts rejected) has its two-sided 95 % interval; the test columns re-measure "
                f"the same thresholds on the held-out test part.")
    rel = Path(plots_subdir) / "decisions_roc.png"
    plot_roc_with_operating_points(val_defective, val_scores, points, report_dir / rel, test_defective, test_scores)
    report.image(rel, "ROC with the chosen operating points (o: where chosen, x: re-measured on test)")
    from defectscope.evaluation.decisions import escape_rate

    enriched = []
    for p in points:
        esc, n = escape_rate(val_scores, val_defective, p["threshold"])
        enriched.append({**p, "escape_rate": esc / n})
    report.table("Operating points", operating_point_rows(enriched), TABLE_COLUMNS)
    for p in points:
        if not p["bound_reaches_target"]:
            report.text(f"Target {100 * p['target_escape_rate']:g} %: with {p['n_defective_used']} defective samples "
                        f"the 95 % upper bound of the escape rate is {100 * p['escape_rate_upper_95']:.2f} %, above "
                        f"the target; even with zero escapes at least {p['n_defective_needed']} defective samples "
                        f"are needed to show an escape rate at or below the target.")
    if calibration is not None:
        report.kv("Calibration (temperature scaling fitted on validation)", {
            "temperature": calibration.get("temperature"),
            f"ECE before ({calibration.get('n_bins', 15)} bins, {calibration.get('measured_on', '')})":
                calibration.get("ece_before"),
            "ECE after": calibration.get("ece_after"),
            "NLL before": calibration.get("nll_before"), "NLL after": calibration.get("nll_after"),
        })
    if probs_before is not None and y_true is not None:
        from defectscope.evaluation.calibration import plot_reliability_diagram

        rel = Path(plots_subdir) / "reliability.png"
        plot_reliability_diagram(probs_before, probs_after, y_true, report_dir / rel,
                                 temperature=(calibration or {}).get("temperature"))
        report.image(rel, "Reliability diagram before and after temperature scaling")
    return report
