"""Parity matrix: one trained run per task, the same inputs through every way of executing it.

Ways (rows): ``defectscope predict`` (CLI, output file), the Python API (``defectscope.load(..).predict``),
``serve`` (FastAPI TestClient, one request per image) and ``inspect``'s scorer (the Ray map function
:class:`~defectscope.deploy.inspect.ImageScorer`, called in-process), each on PyTorch (the run folder)
and ONNX Runtime (``defectscope.export``). The reference is the API on PyTorch.

Tolerances (stated once, asserted for every task):

- classes / decisions: identical;
- probabilities and scores: ``|difference| <= SCORE_TOL`` (1e-4; files store 6 decimals);
- segmentation masks: identical except pixels whose reference probability lies within ``MASK_TOL``
  (1e-3) of the pixel threshold (batch size and runtime change the last float bits);
- detection boxes: the same boxes one to one (same class, IoU >= 0.99, or every coordinate within
  1e-4 of the image side), detections within 1e-3 of the score threshold may be missing on one side
  (:func:`~defectscope.deploy.adapters.detection.match_detections`).

- anomaly image scores and maps (unbounded distances, PaDiM's Mahalanobis distance is about 50 here; maps
  compared where both sides carry them: the Python API on both backends): ``|difference| <= SCORE_TOL`` x the
  score scale (the largest reference image score), the row's figure is that relative difference.

Every row prints its largest difference (``pytest -s``: ``PARITY <task> <way> ...``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import defectscope
from defectscope.cli import app
from defectscope.deploy.adapters._common import resize_map
from defectscope.deploy.adapters.detection import match_detections

pytestmark = pytest.mark.slow

SCORE_TOL = 1e-4
MASK_TOL = 1e-3
runner = CliRunner()

NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
COMMON = {"train__precision": "32", "train__logger": ["csv"], "train__progress": False}


def _classification(tmp: Path, roots: dict) -> tuple[Path, list]:
    run = defectscope.train({"task": "classification", "data": {"root": str(roots["neu_small"]), "image_size": 64},
                             "model": {"name": "multiscale", "low_res": 32, "embed_dim": 32, "num_heads": 4,
                                       "linear_probe_reference": False}},
                            tmp / "run", train__epochs=1, train__batch_size=8, train__val_fraction=0.25, **COMMON)
    return run.path, sorted(roots["neu_small"].glob("*_1.jpg"))[:4]


def _segmentation(tmp: Path, roots: dict) -> tuple[Path, list]:
    ksdd = roots["ksdd"]
    run = defectscope.train(str(Path(__file__).resolve().parents[2] / "configs" / "ksdd_unet_resnet18.yaml"), tmp / "run",
                            data__root=str(ksdd), data__max_images=4, data__height=64, data__width=32,
                            data__good_per_epoch=2, model__decoder_channels=[16, 16, 8, 8, 8], model__tta=True,
                            model__image_score="blur_max", model__threshold=0.3, train__epochs=1, train__batch_size=2,
                            **COMMON)
    test = [line.split(",")[0] for line in (run.path / "split" / "test.txt").read_text().splitlines()][:3]
    return run.path, [Path(f) for f in test]


def _detection(tmp: Path, roots: dict) -> tuple[Path, list]:
    run = defectscope.train({"task": "detection", "data": {"root": str(roots["neu"]), "image_size": 160, "max_per_class": 3},
                             "model": {"name": "fcos_lite", "fpn_channels": 32, "head_convs": 1, "backbone": "efficientnet_lite0",
                                       "pretrained": True, "score_threshold": 0.05},
                             "train": {"early_stopping_patience": 0}},
                            tmp / "run", train__epochs=1, train__batch_size=8, train__val_fraction=0.2,
                            train__channels_last=False, **COMMON)
    test = [line.rsplit(",", 1)[0] for line in (run.path / "split" / "test.txt").read_text().splitlines()][:3]
    return run.path, [Path(f) for f in test]


def _weld(tmp: Path, roots: dict) -> tuple[Path, list]:
    run = defectscope.train(str(Path(__file__).resolve().parents[2] / "configs" / "weld_fusion.yaml"), tmp / "run",
                            data__simulate__n_samples=35, data__simulate__image_size=64, train__epochs=1,
                            data__crop_height=32, data__crop_width=64, data__seq_len=64, data__seg_size=64,
                            model__embed_dim=32, model__spectral_dim=16, segmentation__enabled=False,
                            eval__folds=1, train__num_threads=1, train__logger=["csv"], train__progress=False)
    return run.path, [run.path / "data"]


def _multicnn(tmp: Path, roots: dict) -> tuple[Path, list]:
    run = defectscope.train({
        "task": "multicnn", "seed": 0, "data": {"root": str(roots["neu_small"]), "image_size": 48, "max_per_class": 6},
        "members": [{"name": "lite0", "backbone": "efficientnet_lite0", "pretrained": True, "freeze": 4},
                    {"name": "r18", "backbone": "resnet18", "pretrained": False, "image_size": 32, "freeze": 10,
                     "freeze_unit": "layers"}],
        "train": {"epochs": 1, "batch_size": 8, "val_fraction": 0.25, "logger": ["csv"], "progress": False,
                  "precision": "32", "channels_last": False},
        "fusion": {"epochs": 2, "batch_size": 8, "cache_dir": str(tmp / "cache")}}, tmp / "run")
    return run.path, sorted(roots["neu_small"].glob("*_2.jpg"))[:4]


def _anomaly(tmp: Path, roots: dict) -> tuple[Path, list]:
    """A tiny PaDiM run on real KolektorSDD images (6 good images fitted, 2 calibrate the threshold, 6 tested)."""
    run = defectscope.train(str(Path(__file__).resolve().parents[2] / "configs" / "ksdd_padim.yaml"), tmp / "run",
                            data__root=str(roots["ksdd"]), data__image_size=[128, 64], data__calibration_fraction=0.3,
                            data__max_fit=6, data__max_test=6, model__n_features=20, **COMMON)
    lines = (run.path / "split" / "test.txt").read_text().splitlines()
    test = [line.rsplit(",", 1)[0] for line in lines if line.endswith(",defective")][:2] + \
        [line.rsplit(",", 1)[0] for line in lines if line.endswith(",good")][:2]
    return run.path, [Path(f) for f in test]


#: task -> builder of ``(run folder, inputs for defectscope predict)``
TASKS = {"classification": _classification, "segmentation": _segmentation, "detection": _detection,
         "weld": _weld, "multicnn": _multicnn, "anomaly": _anomaly}


@pytest.fixture(scope="module", params=list(TASKS))
def case(request, tmp_path_factory, neu_root, neu_small, ksdd_root):
    """``(task, run, onnx file, inputs, images, spectra)`` of one task."""
    build = TASKS[request.param]
    tmp = tmp_path_factory.mktemp(f"parity_{request.param}")
    run, inputs = build(tmp, {"neu": neu_root, "neu_small": neu_small, "ksdd": ksdd_root})
    onnx_file = tmp / "model.onnx"
    info = defectscope.export(run, onnx_file)
    assert info.task == request.param
    spectra = None
    if request.param == "weld":
        p = defectscope.load(run)
        ds, raw = p.adapter._read(p.info, inputs[0], labelled=False)
        images, spectra = [s.image for s in ds.samples][:4], list(raw[:4])
    else:
        images = list(inputs)
    return request.param, run, onnx_file, inputs, images, spectra


def _same(task: str, ref, got, way: str, ref_outputs=None) -> float:
    """Assert that the results ``got`` equal the reference ``ref`` within the tolerances; the largest difference."""
    assert len(ref) == len(got), way
    worst = 0.0
    scale = max(1.0, max(abs(a.score) for a in ref)) if task == "anomaly" else 1.0
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a.label == b.label, f"{task} {way} image {i}: class {b.label} != {a.label}"
        assert a.decision == b.decision, f"{task} {way} image {i}: decision {b.decision} != {a.decision}"
        worst = max(worst, abs(a.score - b.score))
        for k, v in a.scores.items():
            worst = max(worst, abs(v - b.scores[k]))
        if a.anomaly_map is not None and b.anomaly_map is not None:  # anomaly: the maps at the model's size
            assert a.anomaly_map.shape == b.anomaly_map.shape, way
            worst = max(worst, float(np.abs(a.anomaly_map.astype(np.float64) - b.anomaly_map).max()))
        if a.mask is not None:
            assert b.mask is not None and a.mask.shape == b.mask.shape, way
            diff = a.mask != b.mask
            if diff.any():
                probs = np.stack([resize_map(p, a.mask.shape[1:]) for p in ref_outputs["mask_probabilities"][i]])
                thr = ref_outputs["threshold"]
                assert np.abs(probs[diff] - thr).max() <= MASK_TOL, f"{task} {way} image {i}: mask pixels differ"
        if task == "detection":
            h, w = a.image_size
            scale = np.array([w, h, w, h], np.float64)

            def dets(r):
                return {"boxes": np.array([x.xyxy for x in r.boxes], np.float64).reshape(-1, 4) / scale,
                        "scores": np.array([x.score for x in r.boxes]), "labels": np.array([x.class_index for x in r.boxes])}

            thr = ref_outputs["threshold"]
            ok, d = match_detections(dets(a), dets(b), thr)
            assert ok, f"{task} {way} image {i}: boxes differ"
            worst = max(worst, d)
    worst /= scale
    assert worst <= SCORE_TOL, f"{task} {way}: scores differ by {worst:.3g} (x {scale:.3g}) > {SCORE_TOL}"
    return worst


def _from_file(task: str, out: Path, ref: list, files: list) -> list:
    """The results a ``defectscope predict`` output file holds, as predictions comparable with ``ref``."""
    from defectscope.deploy.results import Box, Prediction

    if task == "anomaly":  # file, score, decision, threshold, map, error
        rows = list(csv.DictReader(out.open(newline="")))[: len(ref)]
        for r, f in zip(rows, files):
            assert r["file"] == str(f) and not r["error"], r
            assert Image.open(r["map"]).size == Image.open(f).size  # the map PNG at the image's own size
        return [Prediction(r["decision"], None, float(r["score"]), {}) for r in rows]
    if task in ("classification", "multicnn", "weld"):
        rows = list(csv.DictReader(out.open(newline="")))
        rows = rows[: len(ref)]
        return [Prediction(r["class"], None, max(float(v) for k, v in r.items() if k.startswith("prob_")),
                           {k[5:]: float(v) for k, v in r.items() if k.startswith("prob_")},
                           decision=r.get("decision") or None) for r in rows]
    if task == "segmentation":
        from defectscope.data.rle import read_rle_csv, records_to_masks

        recs = read_rle_csv(out, {Path(f).name: a.mask.shape[1:] for f, a in zip(files, ref)})
        return [Prediction(a.label, None, a.score, {}, a.decision,
                           mask=records_to_masks(recs, Path(f).name, a.mask.shape[1:], a.mask.shape[0]).astype(bool))
                for f, a in zip(files, ref)]
    coco = json.loads(out.read_text())
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    names = sorted(cats.values(), key=lambda n: [k for k, v in cats.items() if v == n][0])
    res = []
    for img, a in zip(coco["images"], ref):
        boxes = sorted(([Box(cats[x["category_id"]], names.index(cats[x["category_id"]]), x["score"],
                             (x["bbox"][0], x["bbox"][1], x["bbox"][0] + x["bbox"][2], x["bbox"][1] + x["bbox"][3]))
                         for x in coco["annotations"] if x["image_id"] == img["id"]]), key=lambda b: -b.score)
        res.append(Prediction(a.label, None, a.score, {}, boxes=boxes, image_size=(img["height"], img["width"])))
    return res


def _served(predictor, images: list, spectra) -> list:
    from fastapi.testclient import TestClient

    from defectscope.deploy.results import Prediction
    from defectscope.deploy.service import create_app

    out = []
    with TestClient(create_app(predictor)) as c:
        for i, im in enumerate(images):
            if isinstance(im, Path):
                files = {"file": (im.name, im.read_bytes(), "image/jpeg")}
            else:
                buf = io.BytesIO()
                Image.fromarray(im).save(buf, format="PNG")
                files = {"file": (f"{i}.png", buf.getvalue(), "image/png")}
            if spectra is not None:
                npy = io.BytesIO()
                np.save(npy, spectra[i])
                files["spectra"] = (f"{i}.npy", npy.getvalue(), "application/octet-stream")
            r = c.post("/v1/predict", files=files)
            assert r.status_code == 200, r.text
            body = r.json()
            size = Image.open(im).size[::-1] if isinstance(im, Path) else im.shape[:2]
            out.append(Prediction.from_answer(body, image_size=tuple(size)))
    return out


def _inspected(model: Path, files: list) -> list:
    """Rows of inspect's scorer (the function Ray maps over the archive) as predictions."""
    from defectscope.deploy.inspect import ImageScorer, answer_columns, probe_answer
    from defectscope.deploy.predictor import load_predictor
    from defectscope.deploy.results import Prediction

    cols = answer_columns(probe_answer(load_predictor(model, threads=1)))
    table = ImageScorer(str(model), 1, cols)({"path": np.array([str(f) for f in files])}).to_pylist()
    out = []
    for row, f in zip(table, files):
        assert row["error"] is None, row["error"]
        ans = {k: (json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v) for k, v in row.items()}
        if "class" not in ans and isinstance(ans.get("boxes"), list):  # a column whose probe value was None is not stored
            ans["class"] = ans["boxes"][0]["class"] if ans["boxes"] else None
        out.append(Prediction.from_answer(ans, image_size=Image.open(f).size[::-1]))
    return out


def test_every_way_of_executing_a_run_gives_the_same_answers(case, tmp_path):
    task, run, onnx_file, inputs, images, spectra = case
    torch_p, onnx_p = defectscope.load(run, threads=1), defectscope.load(onnx_file, threads=1)
    ref = torch_p.predict(images, spectra)
    outs = torch_p.outputs(images, spectra)
    ref_outputs = {"mask_probabilities": outs.get("mask_probabilities"),
                   "threshold": torch_p.info.thresholds.get("pixel", torch_p.info.thresholds.get("score"))}
    worst = {"api onnxruntime": _same(task, ref, onnx_p.predict(images, spectra), "api onnxruntime", ref_outputs)}
    for name, model in (("pytorch", run), ("onnxruntime", onnx_file)):
        out = tmp_path / f"{name}_{torch_p.adapter.default_predict_out}"
        res = runner.invoke(app, ["predict", str(model), *map(str, inputs), "--out", str(out)])
        assert res.exit_code == 0, res.output
        worst[f"cli {name}"] = _same(task, ref, _from_file(task, out, ref, images), f"cli {name}", ref_outputs)
        p = torch_p if name == "pytorch" else onnx_p
        worst[f"serve {name}"] = _same(task, ref, _served(p, images, spectra), f"serve {name}", ref_outputs)
        if spectra is None:  # inspect scores image-only models
            worst[f"inspect {name}"] = _same(task, ref, _inspected(model, images), f"inspect {name}", ref_outputs)
    scale = f" (relative to the score scale {max(abs(r.score) for r in ref):.4g})" if task == "anomaly" else ""
    print(f"PARITY {task} " + " ".join(f"{k}={v:.2e}" for k, v in worst.items()) + scale)


def test_evaluate_runs_through_the_predictor_on_both_backends(case, tmp_path):
    """``defectscope evaluate`` on a run folder and on its ONNX file: the same metrics (on the run's own data)."""
    task, run, onnx_file, inputs, _, _ = case
    data = {"classification": lambda: Path(defectscope.open_run(run).config["data"]["root"]),
            "multicnn": lambda: Path(defectscope.open_run(run).config["data"]["root"]),
            "segmentation": lambda: Path(defectscope.open_run(run).config["data"]["root"]),
            "anomaly": lambda: Path(defectscope.open_run(run).config["data"]["root"]),
            "detection": None, "weld": lambda: inputs[0]}[task]
    if data is None:
        pytest.skip("detection evaluate is covered by tests/test_detection_task.py (VOC subset)")
    folder = data()
    if task in ("segmentation", "anomaly"):  # a 6-image KolektorSDD-layout subset
        folder = _ksdd_subset(folder, tmp_path / "ksdd")
    a = defectscope.evaluate(run, folder, tmp_path / "ev_torch")
    b = defectscope.evaluate(onnx_file, folder, tmp_path / "ev_onnx")
    keys = {"segmentation": ["image_auroc"], "anomaly": ["image_auroc", "image_ap", "f1_max", "f1", "pixel_auroc", "aupro"]
            }.get(task, ["accuracy"])
    assert a["n"] == b["n"]
    for key in keys:
        assert abs((a[key] or 0) - (b[key] or 0)) < 1e-6, (key, a[key], b[key])
    assert (tmp_path / "ev_torch" / "report.html").is_file() and (tmp_path / "ev_onnx" / "metrics.json").is_file()


def _ksdd_subset(root: Path, out: Path) -> Path:
    """6 rows of KolektorSDD (3 defective) with their images and masks linked, in the KolektorSDD layout."""
    rows = list(csv.DictReader((root / "manifest.csv").open()))
    pick = [r for r in rows if r["defective"] in ("1", "True", "true")][:3] + \
        [r for r in rows if r["defective"] in ("0", "False", "false")][:3]
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    for r in pick:
        for sub in ("images", "masks"):
            for f in (root / sub).glob(f"{r['id']}.*"):
                (out / sub / f.name).symlink_to(f.resolve())
    with (out / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(pick)
    return out


def test_old_or_incomplete_run_folders_are_refused_with_one_line(tmp_path, neu_small):
    import torch

    from defectscope.engine.run import RunError

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text("task: classification\n")
    torch.save({"format": "defectscope-model/0", "task": "classification", "state_dict": {}}, old / "model.ckpt")
    cv = tmp_path / "cv"
    (cv / "folds" / "1").mkdir(parents=True)
    (cv / "config.yaml").write_text("task: classification\n")
    (cv / "crossval.json").write_text("{}")
    pair = tmp_path / "anomaly_pair"  # an anomaly run of the older Grad-MobileNet + PatchCore pair layout
    pair.mkdir()
    (pair / "config.yaml").write_text("task: anomaly\n")
    torch.save({"format": "defectscope-model/2", "task": "anomaly", "model_name": "grad_mobilenet", "model_kwargs": {},
                "state_dict": {}, "input_size": [384, 160], "ocsvm": {"nu": 0.1}, "peer": None}, pair / "model.ckpt")
    for run, says in ((old, "not a defectscope checkpoint"), (cv, "cross-validation run without a refit model"),
                      (pair, "not an anomaly-model checkpoint of this version")):
        with pytest.raises(RunError, match=says):
            defectscope.load(run)
        res = runner.invoke(app, ["predict", str(run), str(neu_small), "--out", str(tmp_path / "p.csv")])
        assert res.exit_code == 2 and says in res.output and res.output.strip().count("\n") <= 2, res.output
