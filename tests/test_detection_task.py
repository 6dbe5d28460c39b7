"""The detection task end to end on a small real NEU-DET subset: train, evaluate (VOC and COCO), predict."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.data.boxes import read_boxes, write_coco

runner = CliRunner()

# 3 images per class (18): 4 test, 3 val, 11 train at 64 px; 2 epochs
TINY = ["-o", "data.image_size=64", "-o", "data.max_per_class=3", "-o", "train.epochs=2", "-o", "train.batch_size=8",
        "-o", "train.val_fraction=0.2", "-o", "train.precision=32", "-o", "train.logger=[csv]", "-o", "train.channels_last=false"]


def recipe(tmp_path, neu_root, **model) -> str:
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump({"task": "detection", "data": {"root": str(neu_root)},
                                 "model": {"backbone": "efficientnet_lite0", "pretrained": True, **model},
                                 "train": {"early_stopping_patience": 0}}))
    return str(f)


@pytest.fixture(scope="module")
def hungarian_run(tmp_path_factory, neu_root):
    tmp = tmp_path_factory.mktemp("det")
    out = tmp / "run"
    res = runner.invoke(app, ["train", recipe(tmp, neu_root, loss="hungarian", head="attention", hidden_dim=32,
                                              num_heads=4, freeze_backbone=True), "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    return out


def test_train_writes_metrics_report_and_box_drawings(hungarian_run):
    for name in ("config.yaml", "model.ckpt", "metrics.json", "report.html", "plots/best_cases.png",
                 "plots/worst_cases.png", "split/train.txt", "split/val.txt", "split/test.txt"):
        assert (hungarian_run / name).is_file(), name
    m = json.loads((hungarian_run / "metrics.json").read_text())
    assert m["task"] == "detection" and m["loss"] == "hungarian" and m["freeze_backbone"] is True
    assert m["split"]["test"] == 6 and m["split"]["train"] + m["split"]["val"] == 12
    assert m["num_slots"] >= 1
    t = m["test"]
    for k in ("map_50", "map", "per_class_ap50", "box_mse", "box_mae", "accuracy"):
        assert k in t, k
    assert set(t["per_class_ap50"]) == {"crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"}
    assert 0 <= t["map"] <= t["map_50"] <= 1
    assert t["box_mse"] is not None and 0 <= t["box_mse"] <= 1
    html = (hungarian_run / "report.html").read_text()
    assert "best_cases.png" in html and "worst_cases.png" in html and "AP@0.5" in html


def test_predict_writes_coco_boxes_and_drawn_images(hungarian_run, neu_root, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    imgs = [neu_root / "images" / "crazing_1.jpg", neu_root / "images" / "scratches_228.jpg", bad]
    out = tmp_path / "boxes.json"
    res = runner.invoke(app, ["predict", str(hungarian_run), *map(str, imgs), "--out", str(out), "--save-images",
                              ])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    assert [im["file_name"].split("/")[-1] for im in d["images"]] == ["crazing_1.jpg", "scratches_228.jpg"]
    assert d["images"][0]["width"] == 200 and len(d["categories"]) == 6
    assert d["info"]["skipped"][0]["file"].endswith("broken.jpg")
    for a in d["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= 200.001 and y + h <= 200.001
        assert a["score"] >= d["info"]["score_threshold"]
    assert sorted(p.name for p in (tmp_path / "boxes_images").iterdir()) == ["crazing_1.png", "scratches_228.png"]
    # the file reads back with our own COCO reader
    records, names = read_boxes(out)
    assert len(records) == 2 and names[0] == "crazing"


def test_evaluate_on_voc_folder_and_on_coco_json(hungarian_run, neu_root, tmp_path):
    voc = tmp_path / "voc"
    (voc / "images").mkdir(parents=True)
    (voc / "annotations").mkdir()
    for s in ("crazing_300", "patches_155", "scratches_7"):
        shutil.copy(neu_root / "images" / f"{s}.jpg", voc / "images")
        shutil.copy(neu_root / "annotations" / f"{s}.xml", voc / "annotations")
    res = runner.invoke(app, ["evaluate", str(hungarian_run), "--data", str(voc), "--out", str(tmp_path / "ev_voc")])
    assert res.exit_code == 0, res.output
    m_voc = json.loads((tmp_path / "ev_voc" / "metrics.json").read_text())["test"]
    records, names = read_boxes(voc)
    write_coco(voc / "ann.json", records, names, relative_to=voc)
    res = runner.invoke(app, ["evaluate", str(hungarian_run), "--data", str(voc / "ann.json"), "--out", str(tmp_path / "ev_coco")])
    assert res.exit_code == 0, res.output
    m_coco = json.loads((tmp_path / "ev_coco" / "metrics.json").read_text())["test"]
    n_boxes = sum(len(r.labels) for r in records)
    assert m_voc["n"] == m_coco["n"] == 3 and m_voc["n_boxes"] == m_coco["n_boxes"] == n_boxes > 3
    for k in ("map_50", "map", "box_mse", "accuracy"):
        assert m_voc[k] == pytest.approx(m_coco[k]), k


def test_bad_annotation_stops_training_with_a_named_error(tmp_path, neu_root):
    voc = tmp_path / "voc"
    (voc / "images").mkdir(parents=True)
    (voc / "annotations").mkdir()
    for s in ("crazing_1", "crazing_2"):
        shutil.copy(neu_root / "images" / f"{s}.jpg", voc / "images")
        shutil.copy(neu_root / "annotations" / f"{s}.xml", voc / "annotations")
    f = voc / "annotations" / "crazing_2.xml"
    f.write_text(f.read_text().replace("<xmax>", "<xmax>9").replace("</xmax>", "9</xmax>"))
    res = runner.invoke(app, ["train", recipe(tmp_path, voc), "--out", str(tmp_path / "run"), *TINY])
    assert res.exit_code == 2
    assert "crazing_2.xml, object 0 <bndbox>" in res.output and "outside the image" in res.output


@pytest.mark.parametrize("model", [
    {"loss": "padded", "head": "pooled", "hidden_dim": 32},
    {"loss": "single", "head": "pooled", "hidden_dim": 32, "freeze_backbone": True},
    {"loss": "hungarian", "head": "attention", "hidden_dim": 32, "num_heads": 4, "extra_level": True},
    {"name": "fcos_lite", "fpn_channels": 32, "head_convs": 1},
])
def test_other_models_train_end_to_end(tmp_path, neu_root, model):
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", recipe(tmp_path, neu_root, **model), "--out", str(out), *TINY,
                              "-o", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["n"] == 6 and m["test"]["map_50"] is not None
    assert m["loss"] == model.get("loss", "fcos")
    if model.get("loss") == "single":  # one detection per image
        assert m["test"]["box_pairs"] == 6
    if model.get("name") == "fcos_lite":
        check_nms_sweep(out)


def check_nms_sweep(run):
    """The NMS threshold sweep of a trained FCOS run: lower IoU thresholds keep fewer boxes; threshold restored."""
    from defectscope.engine.detection import box_splits_from_run, choose_on_validation, nms_sweep, predict_normalised
    from defectscope.engine.run import RunFolder

    model, payload = RunFolder(run).load_model()  # the one loader
    assert payload["model_kwargs"]["nms_thresh"] == 0.6 and model.det.nms_thresh == 0.6
    splits = box_splits_from_run(run, payload["class_names"])
    for part in ("train", "val", "test"):  # exactly the run's own split lists
        listed = [line.rsplit(",", 1)[0] for line in (run / "split" / f"{part}.txt").read_text().splitlines()]
        assert [str(r.image) for r in splits.records[part]] == listed and len(splits.x[part]) == len(listed)
    rows = nms_sweep(model, splits, [0.1, 1.0], score_threshold=0.3)
    assert [r["nms_threshold"] for r in rows] == [0.1, 1.0] and model.det.nms_thresh == 0.6
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("val_map_50", "test_map_50", "test_map"))
    assert choose_on_validation(rows)["val_map_50"] == max(r["val_map_50"] for r in rows)
    counts = []
    for thr in (0.1, 1.0):
        model.det.nms_thresh, model.det.score_thresh, model.det.detections_per_img = thr, 0.0, 100_000
        counts.append(sum(len(d["scores"]) for d in predict_normalised(model, splits.x["test"])))
    assert counts[0] < counts[1]  # IoU 1.0 suppresses (almost) nothing, 0.1 suppresses most overlaps
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        nms_sweep(model, splits, [0.0])
    with pytest.raises(ValueError, match="no validation split"):
        choose_on_validation([{"nms_threshold": 0.5, "test_map_50": 0.3}])
