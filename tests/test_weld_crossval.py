"""The weld task on the pipeline: messy recordings imported, cross-validated (grouped by batch), predicted;
the weld recipe's k-fold cross-validation with and without the seam U-Net; the ablation benchmark on a
folder without masks; default folds and groups; channel checks by name."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import defectscope
from defectscope.cli import app
from defectscope.data.weld import WeldDataError
from defectscope.engine.pipeline import Samples
from defectscope.engine.tasks import get_task
from defectscope.data.weld.prepare import fit_spectral_prep
from defectscope.engine.weld import WeldRecipe
from weld_fixtures import write_messy_recordings

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
SMALL = {"seq_len": 64, "crop_height": 32, "crop_width": 64, "seg_size": 64}
TINY_MODEL = {"embed_dim": 32, "spectral_dim": 16, "pretrained": True, "freeze_backbone": True}
TINY_TRAIN = {"epochs": 1, "batch_size": 4, "logger": ["csv"], "progress": False, "num_threads": 1}
TINY_O = ["-o", "train.epochs=1", "-o", "segmentation.epochs=1", "-o", "data.crop_height=32", "-o", "data.crop_width=64",
          "-o", "data.seg_size=64", "-o", "data.simulate.image_size=64", "-o", "train.logger=[csv]", "-o", "train.progress=false",
          "-o", "model.embed_dim=32", "-o", "model.spectral_dim=16", "-o", "data.seq_len=64"]


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """16 messy recordings (4 batches, 2 classes) imported with their spec through the CLI: (recordings, folder)."""
    root = tmp_path_factory.mktemp("messy")
    rec = write_messy_recordings(root / "rec", n_runs=16, seed=0)
    res = runner.invoke(app, ["signals", "import", str(rec.spec_path), "--out", str(root / "welds")])
    assert res.exit_code == 0, res.output
    return rec, root / "welds"


def _list(path: Path) -> set[str]:
    return {line.split(",")[0] for line in path.read_text().splitlines() if line}


def _check_folds(run: Path, k: int, ids: set[str]) -> list[dict]:
    """crossval.json / oof_predictions.csv / fold splits of a K-fold run; returns the OOF rows."""
    cv = json.loads((run / "crossval.json").read_text())
    assert cv["k"] == k and len(cv["folds"]) == k and cv["n"] == len(ids)
    assert {"accuracy", "weighted_f1"} <= set(cv["mean"]) and set(cv["mean"]) == set(cv["std"])
    assert cv["mean"]["weighted_f1"] == pytest.approx(np.mean([f["weighted_f1"] for f in cv["folds"]]))
    rows = list(csv.DictReader((run / "oof_predictions.csv").open()))
    assert sorted(r["file"] for r in rows) == sorted(ids)  # every sample exactly once
    assert cv["pooled"]["accuracy"] == pytest.approx(np.mean([r["true"] == r["pred"] for r in rows]))
    for f in range(1, k + 1):
        split = run / "folds" / str(f) / "split"
        test = _list(split / "test.txt")
        seen = _list(split / "train.txt") | (_list(split / "val.txt") if (split / "val.txt").is_file() else set())
        assert test and not (test & seen), "a fold trained or selected its checkpoint on its own test samples"
        assert test == {r["file"] for r in rows if r["fold"] == str(f)}
        assert (run / "folds" / str(f) / "model.ckpt").is_file()
    return rows


def test_messy_recordings_imported_cross_validated_by_batch_and_predicted(tmp_path, messy):
    rec, data = messy
    recipe = tmp_path / "weld.yaml"
    recipe.write_text(yaml.safe_dump({"task": "weld", "data": {"root": str(data), **SMALL}, "model": TINY_MODEL,
                                      "train": TINY_TRAIN, "eval": {"candidates": ["model"]}}))
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(recipe), "--out", str(run), "--folds", "4"])
    assert res.exit_code == 0, res.output
    assert "grouped by the data's 'batch' field (4 groups)" in res.output
    rows = _check_folds(run, 4, set(rec.run_ids))
    cv = json.loads((run / "crossval.json").read_text())
    assert cv["group_by"] == "batch" and cv["pooled"]["seam_dice"] is None  # no masks: fixed bands, no Dice
    batch_of = dict(zip(rec.run_ids, rec.groups))
    for b in set(rec.groups):  # a batch never spans two folds
        assert len({r["fold"] for r in rows if batch_of[r["file"]] == b}) == 1
    fold1 = json.loads((run / "folds" / "1" / "metrics.json").read_text())
    assert fold1["seam_unet"].startswith("off (16 of 16 samples have no seam mask)")
    assert fold1["selected_wavelengths_nm"] is None and len(fold1["selected_channel_names"]) == 4
    assert set(fold1["selected_channel_names"]) <= {"current", "voltage", "wire_feed", "gas_flow", "photodiode", "audio_rms",
                                                    "audio_50_400hz", "audio_400_1500hz", "audio_1500_3500hz"}
    assert "mean +- std" in (run / "report.html").read_text() and "SYNTHETIC" in (run / "report.html").read_text()

    # a fold's run folder predicts through the deploy predictor (the one execution path)
    per_fold = []
    for f in range(1, 5):
        defectscope.predict(run / "folds" / str(f), [data], tmp_path / f"p{f}.csv")
        out = list(csv.DictReader((tmp_path / f"p{f}.csv").open()))
        assert [r["id"] for r in out] == rec.run_ids
        p = np.array([[float(r["prob_ok"]), float(r["prob_porosity"])] for r in out])
        np.testing.assert_allclose(p.sum(1), 1, atol=1e-4)
        per_fold.append(p[:, 0])
    assert np.ptp(np.array(per_fold), axis=0).max() > 0  # four different models
    # the cross-validation run itself executes its refit model (RUN/model.ckpt) when it has one, else is refused
    preds = tmp_path / "preds.csv"
    assert cv["chosen"] == "model" and cv["model"]["samples"] == {"train": 16}
    res = runner.invoke(app, ["predict", str(run), str(data), "--out", str(preds)])
    assert res.exit_code == 0, res.output
    out = list(csv.DictReader(preds.open()))
    assert [r["id"] for r in out] == rec.run_ids
    assert {"defect_score", "decision"} <= set(out[0])  # the threshold chosen on the out-of-fold scores

    # channels are matched by name: a folder with its channels in another order predicts the same
    shuffled = tmp_path / "shuffled"
    shutil.copytree(data, shuffled)
    man = json.loads((shuffled / "manifest.json").read_text())
    order = list(range(len(man["channels"])))[::-1]
    man["channels"] = [man["channels"][i] for i in order]
    for s in man["samples"]:
        for w in s["welds"]:
            arr = np.load(shuffled / w["signals"])
            np.save(shuffled / w["signals"], arr[order])
    (shuffled / "manifest.json").write_text(json.dumps(man))
    defectscope.predict(run / "folds" / "1", [shuffled], tmp_path / "p_shuffled.csv")
    assert (tmp_path / "p_shuffled.csv").read_text().replace(str(shuffled), "X") == \
        (tmp_path / "p1.csv").read_text().replace(str(data), "X")
    # ... and a folder whose channel names differ is refused, naming the field and the channel
    name = man["channels"][0]["name"]
    man["channels"][0]["name"] = "arc_current"
    (shuffled / "manifest.json").write_text(json.dumps(man))
    res = runner.invoke(app, ["predict", str(run / "folds" / "1"), str(shuffled), "--out", str(tmp_path / "x.csv")])
    assert res.exit_code == 2 and "field 'channels'" in res.output and "arc_current" in res.output and name in res.output
    man["channels"][0]["name"] = name  # ... as is a channel in another unit
    man["channels"][0]["unit"] = "kA"
    (shuffled / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(WeldDataError, match="is in 'kA'"):
        defectscope.predict(run / "folds" / "1", [shuffled], tmp_path / "x.csv")


@pytest.mark.parametrize("seam", [True, False])
def test_weld_recipe_cross_validation_with_and_without_seam_unet(tmp_path, seam):
    run = tmp_path / "cv"
    args = ["train", str(ROOT / "configs" / "weld_fusion.yaml"), "--out", str(run), "--folds", "3",
            "-o", "data.simulate.n_samples=42", "-o", "eval.candidates=[model]", *TINY_O] + ([] if seam else ["-o", "segmentation.enabled=false"])
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    man = json.loads((run / "data" / "manifest.json").read_text())
    _check_folds(run, 3, {s["id"] for s in man["samples"]})
    cv = json.loads((run / "crossval.json").read_text())
    fold1 = json.loads((run / "folds" / "1" / "metrics.json").read_text())
    if seam:
        assert fold1["seam_unet"] == "trained on the training part's masks"
        assert 0.0 <= cv["pooled"]["seam_dice"] <= 1.0 and "seam_dice" in cv["mean"]
        assert (run / "folds" / "1" / "plots" / "seam_segmentation.png").is_file()
    else:
        assert fold1["seam_unet"] == "off (segmentation.enabled=false): fixed bands"
        assert cv["pooled"]["seam_dice"] is None and "seam_dice" not in cv["mean"]
    assert fold1["selected_wavelengths_nm"] is not None and len(fold1["selected_wavelengths_nm"]) == 4


def test_ablation_benchmark_runs_on_a_folder_without_masks(tmp_path, messy):
    _, data = messy
    spec = importlib.util.spec_from_file_location("weld_ablation", ROOT / "benchmarks" / "weld_ablation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "abl"
    tiny = [f"data.{k}={v}" for k, v in SMALL.items()] + [f"model.{k}={str(v).lower()}" for k, v in TINY_MODEL.items()] \
        + ["train.batch_size=4"]
    argv = ["--data", str(data), "--out", str(out), "--folds", "2", "--epochs", "1"] + [a for o in tiny for a in ("-o", o)]
    assert bench.main(argv) == 0
    text = (out / "ablation.md").read_text()
    for name in ("vision_only", "spectrum_dlinear", "fusion_v2s"):
        assert f"| {name} |" in text
        cv = json.loads((out / "variants" / name / "crossval.json").read_text())
        assert cv["k"] == 2 and cv["n"] == 16 and cv["group_by"] == "batch"
    assert "2-fold stratified CV grouped by 'batch'" in text and "no seam mask" in text


def _samples(n_per_class: list[int], groups: list[str] | None):
    labels = np.concatenate([[c] * n for c, n in enumerate(n_per_class)])
    ds = SimpleNamespace(has_groups=groups is not None, group_field="batch")
    columns = {"batch": groups} if groups is not None else {}
    return Samples([str(i) for i in range(len(labels))], labels, [f"c{c}" for c in range(len(n_per_class))], {"ds": ds}, columns)


def test_small_sets_are_cross_validated_by_default_and_grouped_by_the_data():
    task, recipe = get_task("weld"), WeldRecipe()
    assert task.default_folds(recipe, _samples([30, 30], None)) == 5
    assert task.default_folds(recipe, _samples([30, 3], None)) == 3  # the smallest class limits the folds
    assert task.default_folds(recipe, _samples([1, 40], None)) is None  # no 2-fold CV possible
    assert task.default_folds(recipe, _samples([150, 150], None)) is None  # >= 200 samples: a single split
    grouped = _samples([8, 8], [f"B{i % 4}" for i in range(16)])
    assert task.default_group_by(recipe, grouped) == "batch" and task.default_folds(recipe, grouped) == 4
    assert task.default_group_by(recipe, _samples([8, 8], None)) is None


def test_default_cross_validation_is_announced_and_eval_folds_1_keeps_one_split(tmp_path, messy):
    """Without --folds a 16-run folder is cross-validated (4 batches -> 4 folds); eval.folds: 1 is one split."""
    from defectscope.config import validate
    from defectscope.engine.pipeline import train

    _, data = messy
    raw = {"task": "weld", "data": {"root": str(data), **SMALL, "test_fraction": 0.25}, "model": {**TINY_MODEL, "name": "weld_dlinear"},
           "train": TINY_TRAIN}
    res = runner.invoke(app, ["train", str(_write(tmp_path / "r.yaml", raw)), "--out", str(tmp_path / "cv")])
    assert res.exit_code == 0, res.output
    assert "16 samples: 4-fold cross-validation by default" in res.output
    assert json.loads((tmp_path / "cv" / "crossval.json").read_text())["k"] == 4
    one = train(validate({**raw, "eval": {"folds": 1}}, WeldRecipe, "test"), tmp_path / "one")
    assert one["test"]["n"] == 4 and not (tmp_path / "one" / "crossval.json").exists()


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_channel_selection_without_wavelengths_is_balanced_over_the_groups():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 200))
    # channels 0-1 electrical (near copies of one source), 2-3 gas, 4-5 acoustic
    x = np.stack([base[g] + 0.05 * rng.normal(size=200) for g in (0, 0, 1, 1, 2, 2)])[None, None]
    prep = fit_spectral_prep(x, "select", 3, True, None, ["electrical"] * 2 + ["gas"] * 2 + ["acoustic"] * 2)
    assert sorted(i // 2 for i in prep.selected) == [0, 1, 2]  # one channel of each group
    prep = fit_spectral_prep(x, "select", 9, True, None, ["a"] * 6)
    assert prep.selected == list(range(6)) and prep.lo.shape == (6,)  # capped at the channel count


@pytest.mark.parametrize("key", ["augment", "channels_last", "class_balance"])
def test_train_settings_the_weld_task_does_not_use_are_rejected(key):
    from defectscope.config import ConfigError, validate

    value = "on" if key == "class_balance" else True
    with pytest.raises(ConfigError, match=rf"train.{key}: .*not a setting of task 'weld'"):
        validate({"task": "weld", "train": {key: value}}, WeldRecipe, "r.yaml")
    validate({"task": "weld", "train": {"loss": "ce", "augment": False}}, WeldRecipe, "r.yaml")
