"""`defectscope train FOLDER`: a folder the project has never seen gets a recipe sized to it."""

from __future__ import annotations

import json
import os
import shutil
import sys

import yaml
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.data.mvtec import mvtec_from_kolektor


def _folder(tmp_path, neu_root, per_class, classes=("crazing", "inclusion", "patches", "scratches")):
    out = tmp_path / "parts"
    for c in classes:
        (out / c).mkdir(parents=True)
        for i in range(1, per_class + 1):
            shutil.copy(neu_root / "images" / f"{c}_{i}.jpg", out / c / f"{c}_{i}.jpg")
    return out


def test_a_small_class_folder_gets_candidates_on_the_same_folds_and_a_refit_model(tmp_path, neu_root):
    """`train FOLDER`: candidates (fine-tuning, linear probe, strong-augmentation fine-tuning) on the same
    folds, the best pooled out-of-fold accuracy chosen, refit on all images into RUN/model.ckpt, which
    predict and export load."""
    from defectscope.engine.run import RunFolder

    data = _folder(tmp_path, neu_root, 5)
    shutil.copy(data / "crazing" / "crazing_1.jpg", data / "patches" / "copy_of_crazing_1.jpg")  # leaks across classes
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(data), "--out", str(out), "--folds", "2", "-o", "data.image_size=64",
                                   "-o", "train.epochs=2", "-o", "train.precision=32", "-o", "train.progress=false",
                                   "-o", "train.logger=[csv]"])
    assert res.exit_code == 0, res.output
    assert "classification (folder layout)" in res.output and "cross-validation" in res.output
    assert "warning" in res.output and "copy_of_crazing_1.jpg" in res.output.replace("\n", "")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["task"] == "classification" and cfg["data"]["root"] == str(data)
    assert cfg["eval"]["folds"] >= 2 and cfg["data"]["image_size"] == 64  # sized, then overridden
    assert cfg["eval"]["candidates"] == ["model", "linear_probe", "finetune_small", "linear_probe_lite2"]
    assert "max_minutes" not in (out / "config.yaml").read_text() or cfg["train"]["max_minutes"] is None
    cv = json.loads((out / "crossval.json").read_text())
    assert cv["n"] == 21 and cv["k"] == 2 and len(cv["folds"]) == 2
    cands = cv["candidates"]
    assert list(cands) == ["model", "linear_probe", "finetune_small", "linear_probe_lite2"]
    acc = {n: c["pooled"]["accuracy"] for n, c in cands.items()}
    for c in cands.values():
        assert c["pooled"]["n"] == 21 and "accuracy" in c["mean"] and "accuracy" in c["std"]
    best = max(acc.values())
    assert acc[cv["chosen"]] == best and cv["pooled"]["accuracy"] == best  # the floor: never below a reference
    if acc["linear_probe"] == best:
        assert cv["chosen"] == "linear_probe"  # ties go to the cheaper
    assert "optimistic" in cv["selection_note"] and "nested" not in cv
    # the chosen candidate's folds are the run's folds; the others are kept beside them
    assert (out / "folds" / "1" / "model.ckpt").is_file()
    for n in set(cands) - {cv["chosen"]}:
        assert (out / "candidates" / n / "folds" / "2" / "metrics.json").is_file()
    # always a model: the chosen candidate refit on all 21 images
    assert cv["model"]["candidate"] == cv["chosen"] and cv["model"]["samples"] == {"train": 21}
    model, payload = RunFolder(out).load_model()
    assert payload["class_names"] == ["crazing", "inclusion", "patches", "scratches"] and "temperature" in payload
    assert payload["model_name"] == ("linear_probe" if cv["chosen"].startswith("linear_probe") else "classifier")
    report = (out / "report.html").read_text()
    assert "Candidates on the same folds" in report and "refit on all 21" in report
    res = CliRunner().invoke(app, ["predict", str(out), str(data), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 22
    res = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    check = json.loads((out / "data_check.json").read_text())
    assert check["duplicates"]
    # the recipe written to the run trains again as it is (here with only the probe, to stay fast)
    res = CliRunner().invoke(app, ["train", str(out / "config.yaml"), "--out", str(tmp_path / "again"), "--folds", "2",
                                   "-o", "eval.candidates=[linear_probe]"])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "again" / "crossval.json").read_text())
    assert again["pooled"]["accuracy"] == acc["linear_probe"]  # same folds, same features, same probe


def test_a_single_split_folder_compares_candidates_on_validation_and_delivers_the_winner(tmp_path, neu_root):
    """`train FOLDER` on a folder large enough for one split (2 classes x 50 images: a 20 % test part holds
    10 per class): the sized recipe lists the candidates and a validation part of >= 5 per class; every
    candidate is fitted on the same training part and compared on that validation part; here the
    fine-tuning gets no learning budget (lr 1e-6, one epoch) so the linear probe beats it and must be the
    delivered RUN/model.ckpt (the Lite0 or the Lite2 probe); no choice reads the test part; predict and
    export load the run."""
    from defectscope.engine.run import RunFolder

    data = _folder(tmp_path, neu_root, 50, classes=("crazing", "scratches"))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(data), "--out", str(out), "-o", "data.image_size=64",
                                   "-o", "train.epochs=1", "-o", "train.lr=1e-6", "-o", "train.precision=32",
                                   "-o", "train.progress=false", "-o", "train.logger=[csv]"])
    assert res.exit_code == 0, res.output
    assert "compared on the validation part" in res.output and "chosen: linear_probe" in res.output.replace("\n", "")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["eval"]["folds"] == 1 and cfg["eval"]["candidates"] == ["model", "linear_probe", "finetune_small", "linear_probe_lite2"]
    assert cfg["model"]["name"] == "classifier"  # the recipe as given (re-running it repeats the selection)
    m = json.loads((out / "metrics.json").read_text())
    # 100 images: 20 tested; 10 % of the other 80 would hold 4 per class, so the share is raised to 12.5 %
    assert cfg["train"]["val_fraction"] == 0.125 and m["split"] == {"seed": 0, "test_fraction": 0.2, "train": 70,
                                                                    "val": 10, "test": 20}
    cands = m["candidates"]
    assert list(cands) == ["model", "linear_probe", "finetune_small", "linear_probe_lite2"]
    val = {n: c["val"]["accuracy"] for n, c in cands.items()}
    assert all(c["val"]["n"] == 10 for c in cands.values())
    probe = m["chosen"]  # one of the two probes (ties: the Lite0 one, cheaper)
    assert probe in ("linear_probe", "linear_probe_lite2") and val[probe] == max(val.values()), val
    assert val[probe] > max(val["model"], val["finetune_small"]), val
    assert m["selection_metric"] == "accuracy" and "test part was read by no choice" in m["selected_on"]
    assert m["model"] == "linear_probe" and m["test"]["n"] == 20 and m["val"]["accuracy"] == val[probe]
    assert cands[probe]["run"] == "." and cands["model"]["run"] == "candidates/model"
    # the probe was fitted on the training part only: the model run's own linear-probe reference (also
    # fitted on the training part) scores the same validation part identically
    model_run = json.loads((out / "candidates" / "model" / "metrics.json").read_text())
    assert model_run["val"]["reference"]["linear_probe"]["accuracy"] == val["linear_probe"]
    assert not (out / "candidates" / probe).exists() and (out / "candidates" / "finetune_small" / "model.ckpt").is_file()
    _, payload = RunFolder(out).load_model()
    assert payload["model_name"] == "linear_probe" and payload["class_names"] == ["crazing", "scratches"]
    assert "temperature" in payload  # calibrated on the validation part it never saw
    report = (out / "report.html").read_text()
    assert "Candidates on the same validation part" in report and "not used" in report
    assert f"Chosen: {probe}: highest validation (10 samples) accuracy" in report
    res = CliRunner().invoke(app, ["predict", str(out), str(data), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 101
    res = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output


def test_weld_signals_proxy_trains_with_no_recipe_and_the_statistics_reference_is_the_floor(tmp_path):
    """An imported weld folder whose only class signal is the spread of one channel: `train FOLDER` (no
    recipe) evaluates the fusion model, the signal-statistics and the image-probe references on folds
    grouped by batch, delivers the best (never below the statistics reference), refits it, and
    predict / export load the run; the written recipe re-runs, here with --nested."""
    from weld_fixtures import write_messy_recordings

    rec = write_messy_recordings(tmp_path / "rec", n_runs=16, seed=1, defect="spread", n_groups=8)
    data = tmp_path / "welds"
    assert CliRunner().invoke(app, ["signals", "import", str(rec.spec_path), "--out", str(data)]).exit_code == 0
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(data), "--out", str(out), "-o", "train.precision=32",
                                   "-o", "train.epochs=3", "-o", "train.progress=false", "-o", "data.seq_len=64",
                                   "-o", "data.crop_height=32", "-o", "data.crop_width=64", "-o", "model.embed_dim=32",
                                   "-o", "model.spectral_dim=16", "-o", "train.logger=[csv]"])
    assert res.exit_code == 0, res.output
    assert "grouped by the data's 'batch' field (8 groups)" in res.output
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["task"] == "weld" and "class_balance" not in cfg["train"] and cfg["train"].get("max_minutes") is None
    cv = json.loads((out / "crossval.json").read_text())
    assert cv["k"] == 5 and cv["group_by"] == "batch" and list(cv["candidates"]) == ["model", "signal_stats", "image_probe"]
    acc = {n: c["pooled"]["accuracy"] for n, c in cv["candidates"].items()}
    assert acc["signal_stats"] >= 0.75, acc  # the statistics see the spread of the voltage
    assert cv["pooled"]["accuracy"] == max(acc.values()) >= acc["signal_stats"]
    assert cv["model"]["samples"] == {"train": 16}
    res = CliRunner().invoke(app, ["predict", str(out), str(data), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 17
    res = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "w.onnx")])
    assert res.exit_code == 0, res.output
    # the written recipe re-runs unchanged; --nested repeats the selection inside each outer fold
    res = CliRunner().invoke(app, ["train", str(out / "config.yaml"), "--out", str(tmp_path / "nested"), "--nested",
                                   "-o", "eval.candidates=[signal_stats,image_probe]"])
    assert res.exit_code == 0, res.output
    nested = json.loads((tmp_path / "nested" / "crossval.json").read_text())["nested"]
    assert len(nested["chosen_per_fold"]) == 5 and set(nested["chosen_per_fold"]) <= {"signal_stats", "image_probe"}
    assert nested["pooled"]["n"] == 16 and 0 <= nested["pooled"]["accuracy"] <= 1


def test_weld_single_split_compares_the_three_candidates_on_validation(tmp_path):
    """A weld folder forced to one split (`--folds 1`, a validation part of >= 5 runs per class): the fusion
    model, the signal-statistics and the image-probe references are compared on the same validation part,
    the best is delivered (the statistics, which see the spread of the voltage, are its floor), only its
    test figure is measured, and predict loads the run."""
    from weld_fixtures import write_messy_recordings

    from defectscope.engine.run import RunFolder

    rec = write_messy_recordings(tmp_path / "rec", n_runs=40, seed=2, defect="spread", n_groups=20)
    data = tmp_path / "welds"
    assert CliRunner().invoke(app, ["signals", "import", str(rec.spec_path), "--out", str(data)]).exit_code == 0
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(data), "--out", str(out), "--folds", "1", "-o", "train.val_fraction=0.4",
                                   "-o", "train.precision=32", "-o", "train.epochs=2", "-o", "train.progress=false",
                                   "-o", "data.seq_len=64", "-o", "data.crop_height=32", "-o", "data.crop_width=64",
                                   "-o", "model.embed_dim=32", "-o", "model.spectral_dim=16", "-o", "train.logger=[csv]"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"]["test"] == 8 and m["split"]["val"] >= 10 and m["split"]["train"] + m["split"]["val"] == 32
    cands = m["candidates"]
    assert list(cands) == ["model", "signal_stats", "image_probe"]
    val = {n: c["val"]["accuracy"] for n, c in cands.items()}
    assert val["signal_stats"] >= 0.75, val
    assert m["val"]["accuracy"] == max(val.values()) and val[m["chosen"]] == max(val.values())
    assert m["test"]["n"] == 8 and cands[m["chosen"]]["run"] == "."
    # the test part is grouped like the folds: no welding session is both trained on and tested
    group = {s["id"]: s["group"] for s in json.loads((data / "manifest.json").read_text())["samples"]}
    parts = {k: {group[line.split(",")[0]] for line in (out / "split" / f"{k}.txt").read_text().split()} for k in ("train", "val", "test")}
    assert parts["test"] and not parts["test"] & (parts["train"] | parts["val"]), parts
    _, payload = RunFolder(out).load_model()
    assert payload["model_name"] == {"model": "weld_fusion", "signal_stats": "weld_signal_stats",
                                     "image_probe": "weld_image_probe"}[m["chosen"]]
    res = CliRunner().invoke(app, ["predict", str(out), str(data), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 41


def test_signal_statistics_match_numpy():
    import numpy as np
    import torch

    from defectscope.models.signal_stats import signal_statistics

    x = np.random.default_rng(0).normal(size=(3, 2, 4, 57)).astype(np.float32)
    f = signal_statistics(torch.from_numpy(x)).numpy().reshape(3, 2, 4, 4)
    np.testing.assert_allclose(f[..., 0], x.mean(-1), atol=1e-5)
    np.testing.assert_allclose(f[..., 1], x.std(-1), atol=1e-5)
    np.testing.assert_allclose(f[..., 2], np.percentile(x, 10, axis=-1), atol=1e-5)
    np.testing.assert_allclose(f[..., 3], np.percentile(x, 90, axis=-1), atol=1e-5)


def test_candidate_ties_go_to_the_cheaper():
    from types import SimpleNamespace

    from defectscope.engine.pipeline import choose_candidate

    c = [SimpleNamespace(name="model", cost=1.0), SimpleNamespace(name="probe", cost=0.1),
         SimpleNamespace(name="small", cost=1.0)]
    win, why = choose_candidate(c, {"model": {"accuracy": 0.8}, "probe": {"accuracy": 0.8}, "small": {"accuracy": 0.7}}, "accuracy")
    assert win.name == "probe" and "tied with model" in why
    win, _ = choose_candidate(c, {"model": {"accuracy": 0.9}, "probe": {"accuracy": 0.8}, "small": {"accuracy": 0.9}}, "accuracy")
    assert win.name == "model"  # same cost: the one listed first


def test_linear_probe_as_the_model(tmp_path, neu_small):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"task": "classification", "data": {"root": str(neu_small), "image_size": 64},
                                 "model": {"name": "linear_probe", "backbone": "efficientnet_lite0", "pretrained": True}}))
    out = tmp_path / "probe"
    res = CliRunner().invoke(app, ["train", str(r), "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "linear_probe" and m["test"]["accuracy"] > 1 / 6
    res = CliRunner().invoke(app, ["predict", str(out), str(neu_small), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 49


#: paths opened or listed while ``_AUDIT["on"]`` (sys.addaudithook cannot be removed: it stays, switched off)
_AUDIT: dict = {"on": False, "paths": []}


def _audit(event: str, args: tuple) -> None:
    if _AUDIT["on"] and event in ("open", "os.listdir", "os.scandir", "glob.glob") and args:
        if isinstance(args[0], (str, bytes, os.PathLike)):
            _AUDIT["paths"].append(os.path.abspath(os.fsdecode(args[0])))


def test_an_mvtec_layout_folder_trains_the_anomaly_task_with_pixel_metrics(tmp_path, ksdd_root):
    data = mvtec_from_kolektor(ksdd_root, tmp_path / "mvtec", n_train_good=12, n_test_good=6, n_defect=6, link=False)
    out = tmp_path / "run"
    if not _AUDIT.get("hooked"):
        sys.addaudithook(_audit)
        _AUDIT["hooked"] = True
    _AUDIT.update(on=True, paths=[])
    try:
        res = CliRunner().invoke(app, ["train", str(data), "--out", str(out), "-o", "data.image_size=[96,32]"])
    finally:
        _AUDIT["on"] = False
    assert res.exit_code == 0, res.output
    # every file the command opened or listed by name: the user's folder (its links included), the run folder, and
    # the installed packages and weights; nothing of our datasets folder (NEU for a clustering study, KolektorSDD)
    datasets = str(ksdd_root.resolve().parent)
    opened = _AUDIT["paths"]
    assert sum(p.startswith(str(data)) for p in opened) >= 24  # the 24 images at least: the audit sees the reads
    assert not [p for p in opened if p.startswith(datasets) or "/shared/datasets" in p], opened
    assert "anomaly (mvtec layout)" in res.output
    # only the user's folder: no clustering study (no NEU path), and the summary's counts are the split's
    assert "neu" not in res.output.lower() and "clustering" not in res.output
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["clustering"]["enabled"] is False and cfg["clustering"]["root"] is None
    assert cfg["data"]["root"] == str(data) and cfg["model"]["name"] == "patchcore"
    assert "10 good training images fill its memory bank, 2 more" in " ".join(res.output.split())
    assert len((out / "split" / "fit.txt").read_text().splitlines()) == 10
    assert len((out / "split" / "calibration.txt").read_text().splitlines()) == 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["clustering"] is None
    assert m["test"]["n"] == 12 and m["test"]["n_defective"] == 6
    assert 0 <= m["test"]["image_auroc"] <= 1 and 0 <= m["test"]["pixel_auroc"] <= 1


def test_an_ambiguous_folder_is_refused_with_what_was_found(tmp_path):
    (tmp_path / "d" / "annotations").mkdir(parents=True)
    (tmp_path / "d" / "notes.txt").write_text("nothing here")
    res = CliRunner().invoke(app, ["train", str(tmp_path / "d"), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "error" in res.output and not (tmp_path / "run").exists()
