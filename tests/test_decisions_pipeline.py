"""Operating points and temperature scaling inside a classification run (OK class = good)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.engine.classification import predict_probs, scale_probs
from defectscope.engine.run import RunFolder
from defectscope.evaluation.decisions import choose_threshold
from defectscope.data.images import load_stack


@pytest.fixture(scope="module")
def ksdd_cls(tmp_path_factory, ksdd_root):
    """KolektorSDD image labels as a class-per-folder set: 24 good, 16 defective (symlinks)."""
    out = tmp_path_factory.mktemp("ksdd_cls")
    rows = list(csv.DictReader((ksdd_root / "manifest.csv").open()))
    for name, want, n in (("good", "0", 24), ("defective", "1", 16)):
        (out / name).mkdir()
        for r in [r for r in rows if r["defective"] == want][:n]:
            (out / name / f"{r['id']}.jpg").symlink_to(ksdd_root / "images" / f"{r['id']}.jpg")
    return out


def test_operating_points_and_calibration_come_from_validation(tmp_path, ksdd_cls):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({
        "task": "classification",
        "data": {"root": str(ksdd_cls), "image_size": 64, "test_fraction": 0.25},
        "model": {"name": "classifier", "backbone": "efficientnet_lite0", "pretrained": True},
        "train": {"epochs": 2, "batch_size": 8, "precision": "32", "logger": ["csv"], "val_fraction": 0.35,
                  "progress": False},
        "eval": {"escape_rate_targets": [0.2, 0.05]},
    }))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(r), "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())["test"]
    cal = m["calibration"]
    assert cal["temperature"] > 0 and cal["measured_on"] == "test"
    assert {"ece_before", "ece_after", "nll_before", "nll_after"} <= set(cal)
    points = m["operating_points"]
    assert [p["target_escape_rate"] for p in points] == [0.2, 0.05]
    for p in points:
        assert {"threshold", "escape_rate_upper_95", "false_call_rate", "false_call_rate_ci_95", "test_escape_rate",
                "test_false_call_rate", "n_defective_used"} <= set(p)
    # the threshold is the one chosen on the validation part's defect scores (never the test part)
    model, payload = RunFolder(out).load_model()
    val = [line.split(",") for line in (out / "split" / "val.txt").read_text().splitlines()]
    x = load_stack([v[0] for v in val], 64)
    probs = scale_probs(predict_probs(model, x), payload["temperature"])
    scores = 1 - probs[:, payload["class_names"].index("good")]
    defective = np.array([v[1] == "defective" for v in val])
    assert points[0]["n_defective_used"] == int(defective.sum())
    assert points[0]["threshold"] == pytest.approx(choose_threshold(scores, defective, 0.2), abs=1e-5)
    assert payload["decision"]["ok_class"] == "good"
    assert payload["decision"]["threshold"] == pytest.approx(points[0]["threshold"])
    # predict applies the stored temperature and threshold
    test = [line.split(",")[0] for line in (out / "split" / "test.txt").read_text().splitlines()]
    res = CliRunner().invoke(app, ["predict", str(out), *test, "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == len(test)
    for row in rows:
        score = float(row["defect_score"])
        assert row["decision"] == ("reject" if score >= payload["decision"]["threshold"] else "accept")
        assert score == pytest.approx(1 - float(row["prob_good"]), abs=2e-6)
    assert "Decisions" in (out / "report.html").read_text()


def test_temperature_scaling_of_probabilities_matches_logits():
    z = torch.randn(20, 4).numpy() * 3
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    want = torch.softmax(torch.from_numpy(z) / 2.5, 1).numpy()
    assert np.allclose(scale_probs(p, 2.5), want, atol=1e-5)
