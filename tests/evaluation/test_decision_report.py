"""The Decisions section of the report."""

from __future__ import annotations

import numpy as np
from scipy.special import softmax

from defectscope.evaluation.calibration import apply_temperature, calibrate
from defectscope.evaluation.decision_report import add_decisions_section
from defectscope.evaluation.decisions import operating_points
from defectscope.evaluation.report import Report


def test_decisions_section_writes_roc_table_note_and_reliability(tmp_path):
    rng = np.random.default_rng(0)
    vy = np.r_[np.zeros(150, bool), np.ones(30, bool)]
    vs = np.r_[rng.beta(2, 6, 150), rng.beta(6, 2, 30)]
    ty = np.r_[np.zeros(100, bool), np.ones(20, bool)]
    ts = np.r_[rng.beta(2, 6, 100), rng.beta(6, 2, 20)]
    points = operating_points(vs, vy, (0.05, 0.01), ts, ty)
    z = rng.normal(0, 2, (300, 3)) * 3
    y = rng.integers(0, 3, 300)
    cal = calibrate(z[:150], y[:150], z[150:], y[150:])
    rep = Report("KSDD test")
    add_decisions_section(rep, tmp_path, vy, vs, points, ty, ts, calibration=cal, probs_before=softmax(z[150:], 1),
                          probs_after=apply_temperature(z[150:], cal["temperature"]), y_true=y[150:])
    html = rep.render()
    assert "<h2>Decisions</h2>" in html and "Operating points" in html
    assert html.count("<tr><td>") == 2  # one row per target
    # 30 defects cannot prove 5 % or 1 %: the note names 59 and 299 defective samples
    assert "at least 59 defective samples" in html and "at least 299 defective samples" in html
    assert 'src="plots/decisions_roc.png"' in html and 'src="plots/reliability.png"' in html
    for name in ("decisions_roc.png", "reliability.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    assert f"{cal['temperature']:.4f}" in html
