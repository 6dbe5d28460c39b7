"""The Python API (defectscope.train / load / predict / evaluate / export) on a small real NEU subset."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml

import defectscope
from defectscope.config import ConfigError
from defectscope.data.images import load_image
from defectscope.deploy.results import Prediction
from defectscope.engine.run import RunError

TINY = {"data__image_size": 64, "model__low_res": 32, "model__embed_dim": 32, "model__num_heads": 4,
        "model__linear_probe_reference": False, "train__epochs": 1, "train__batch_size": 8, "train__val_fraction": 0.25,
        "train__precision": "32", "train__logger": ["csv"], "train__progress": False}


@pytest.fixture(scope="module")
def run(tmp_path_factory, neu_small):
    recipe = tmp_path_factory.mktemp("cfg") / "r.yaml"
    recipe.write_text(yaml.safe_dump({"task": "classification", "data": {"root": str(neu_small)},
                                      "model": {"name": "multiscale", "backbone": "efficientnet_lite0", "pretrained": True}}))
    return defectscope.train(recipe, out=tmp_path_factory.mktemp("runs") / "r", **TINY)


def test_train_returns_the_run_with_its_metrics_and_the_overrides_applied(run):
    assert isinstance(run, defectscope.Run) and run.task == "classification"
    assert run.metrics == json.loads((run.path / "metrics.json").read_text())
    assert run.config["train"]["epochs"] == 1 and run.config["data"]["image_size"] == 64  # train__epochs -> train.epochs
    assert run.metrics["split"]["test"] == 10 and 0.0 <= run.metrics["test"]["accuracy"] <= 1.0
    again = defectscope.open_run(run.path)
    assert again.metrics == run.metrics


def test_load_predict_gives_typed_results_equal_to_the_json_answers(run, neu_small):
    files = sorted(neu_small.glob("*_1.jpg"))
    model = defectscope.load(run.path, threads=1)
    res = model.predict(files + [load_image(files[0])])  # paths and arrays
    assert len(res) == 7 and all(isinstance(r, Prediction) for r in res)
    names = model.info.class_names
    for r in res:
        assert r.label in names and r.class_index == names.index(r.label)
        assert set(r.scores) == set(names) and abs(sum(r.scores.values()) - 1) < 1e-5
        assert r.score == pytest.approx(max(r.scores.values())) and r.label == max(r.scores, key=r.scores.get)
        assert r["class"] == r.label and r.mask is None and r.boxes == [] and r.image_size == (200, 200)
    assert res[0].scores == pytest.approx(res[-1].scores, abs=1e-6)  # a file and its decoded array: the same
    answers = model.answers(files)
    assert [a["class"] for a in answers] == [r.label for r in res[:6]]


def test_predict_and_evaluate_write_what_the_cli_writes(run, neu_small, neu_small_folders, tmp_path):
    out = tmp_path / "p.csv"
    summary = defectscope.predict(run.path, [neu_small], out)
    rows = list(csv.DictReader(out.open()))
    assert summary["predicted"] == 48 and len(rows) == 48 and summary["out"] == str(out)
    model = defectscope.load(run.path)
    first = model.predict([rows[0]["file"]])[0]
    assert rows[0]["class"] == first.label
    assert float(rows[0][f"prob_{first.label}"]) == pytest.approx(first.score, abs=1e-6)
    metrics = run.evaluate(neu_small_folders, tmp_path / "ev")
    assert metrics["n"] == 12 and (tmp_path / "ev" / "report.html").is_file()
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["test"]["accuracy"] == metrics["accuracy"]
    info = run.export(tmp_path / "m.onnx")
    onnx_metrics = defectscope.evaluate(tmp_path / "m.onnx", neu_small_folders, tmp_path / "ev_onnx")
    assert info.task == "classification" and onnx_metrics["accuracy"] == metrics["accuracy"]


def test_api_errors_are_one_clear_exception(run, neu_small, tmp_path):
    with pytest.raises(ConfigError, match="task= is for data folders"):
        defectscope.train(run.path / "config.yaml", tmp_path / "x", task="classification")
    with pytest.raises(ConfigError, match="train.epochs"):
        defectscope.train(run.path / "config.yaml", tmp_path / "x", train__epochs=0)
    with pytest.raises(RunError, match="exists"):
        defectscope.train(run.path / "config.yaml", run.path)
    with pytest.raises(RunError, match="not found"):
        defectscope.load(tmp_path / "missing_run")
    with pytest.raises(ConfigError, match="--save-images is not supported by task 'classification'"):
        defectscope.predict(run.path, [neu_small], tmp_path / "p.csv", save_images=True)


def test_importing_the_package_stays_light():
    code = "import sys, defectscope; defectscope.__version__; print('torch' in sys.modules, callable(defectscope.train))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_overrides_join_levels_with_a_double_underscore():
    from defectscope.api import overrides_from

    assert overrides_from({"train__epochs": 2, "data__simulate__n_samples": 35}) == [
        ("train.epochs", 2), ("data.simulate.n_samples", 35)]
