"""Segmentation (U-Net) deployed end to end: a tiny run trained through the CLI on real KolektorSDD images
(test-time flips and the blur_max image score, so both run inside the exported graph), exported, ONNX
Runtime vs PyTorch on the run's real held-out images, served over HTTP, and the page in Chromium."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from task_helpers import REPO, page_screenshot, png_array, post_image, train_cli

from defectscope.data.images import load_image
from defectscope.data.rle import rle_decode
from defectscope.deploy.predictor import load_predictor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, ksdd_root):
    out = tmp_path_factory.mktemp("seg") / "run"
    return train_cli(REPO / "configs" / "ksdd_unet_resnet18.yaml", out, [
        f"data.root={ksdd_root}", "data.max_images=4", "data.height=64", "data.width=32", "data.good_per_epoch=2",
        "model.decoder_channels=[16,16,8,8,8]", "model.tta=true", "model.image_score=blur_max", "train.epochs=1",
        "train.batch_size=2", "train.logger=[csv]", "train.progress=false"])


@pytest.fixture(scope="module")
def seg_onnx(seg_run):
    from defectscope.deploy.export import export_onnx

    out = seg_run / "deploy" / "model.onnx"
    export_onnx(seg_run, out)
    return out


@pytest.fixture(scope="module")
def predictors(seg_run, seg_onnx):
    return load_predictor(seg_run, threads=1), load_predictor(seg_onnx, threads=1)


def test_export_metadata(seg_onnx):
    model = onnx.load(str(seg_onnx))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props if p.key != "defectscope.format"}
    assert meta["defectscope.task"] == "segmentation" and meta["defectscope.model_name"] == "unet"
    assert meta["defectscope.outputs"] == ["mask_probabilities", "image_score"]
    assert meta["defectscope.input_size"] == [64, 32] and meta["defectscope.tta"] is True
    assert meta["defectscope.image_score"] == "blur_max" and meta["defectscope.thresholds"]["pixel"] == 0.5
    assert [o.name for o in model.graph.output] == ["mask_probabilities", "image_score"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_onnx_matches_pytorch_on_real_held_out_images(predictors, seg_run, seg_onnx):
    """Masks of the two runtimes: Dice >= 0.999; image scores within 1e-4; the in-graph image score is the
    payload's rule (evaluation.segmentation.image_scores) of the in-graph (flip-averaged) probabilities."""
    from defectscope.evaluation.segmentation import image_scores

    tp, op = predictors
    ev = tp.adapter.eval_set(seg_run, tp.info)
    assert ev.targets.shape == (4, 1, 64, 32)  # true masks found through manifest.csv
    a, b = tp.run(ev.inputs), op.run(ev.inputs)
    assert a["mask_probabilities"].shape == (4, 1, 64, 32) and a["image_score"].shape == (4,)
    diff, dice = tp.adapter.compare(tp.info, a, b)
    assert dice >= 0.999 and diff <= 1e-4, (dice, diff)
    from defectscope.deploy.benchmark import openvino_runner

    ov_diff, ov_dice = tp.adapter.compare(tp.info, a, openvino_runner(seg_onnx, threads=1)(ev.inputs))
    assert ov_dice >= 0.999 and ov_diff <= 1e-4, (ov_dice, ov_diff)  # OpenVINO reads the same file
    np.testing.assert_allclose(a["image_score"], image_scores(a["mask_probabilities"], "blur_max"), atol=1e-5)
    # the graph averages the four flips: the plain forward pass differs from it
    with torch.inference_mode():
        plain = torch.sigmoid(tp.module.model(torch.from_numpy(ev.inputs["image"]))).numpy()
    assert np.abs(plain - a["mask_probabilities"]).max() > 1e-4
    name, dice_pct = tp.adapter.score(tp.info, a, ev.targets)
    assert name == "Dice %" and 0 <= dice_pct <= 100


def test_answers_carry_the_mask_as_rle_at_the_image_size(predictors, seg_run):
    tp, op = predictors
    files = tp.adapter.eval_set(seg_run, tp.info).files
    ra, rb = tp.predict(files), op.predict(files)
    for f, x, y in zip(files, ra, rb):
        h, w = load_image(f).shape[:2]
        assert x["class"] == y["class"] and x["class"] == ("defective" if x["score"] >= 0.5 else "good")
        assert abs(x["score"] - y["score"]) <= 1e-4
        ma, mb = (rle_decode(r["masks"][0]["rle"], (h, w)).astype(bool) for r in (x, y))
        assert ma.sum() == x["masks"][0]["pixels"] and x["masks"][0]["size"] == [h, w]
        assert 2 * (ma & mb).sum() / max(1, ma.sum() + mb.sum()) >= 0.999 or not (ma.any() or mb.any())
        assert png_array(x["overlay_png"]).shape == (h, w, 3)


def test_served_over_http(predictors, seg_run):
    _, op = predictors
    f = op.adapter.eval_set(seg_run, op.info).files[2]  # a defective image
    body = post_image(op, f)
    h, w = load_image(f).shape[:2]
    assert body["class"] in ("good", "defective") and body["image_score_rule"] == "blur_max"
    assert rle_decode(body["masks"][0]["rle"], (h, w)).sum() == body["defect_pixels"]
    assert png_array(body["overlay_png"]).shape == (h, w, 3)


def test_page_shows_the_mask_overlay(predictors, seg_run, tmp_path):
    _, op = predictors
    f = op.adapter.eval_set(seg_run, op.info).files[2]
    texts = page_screenshot(op, f, tmp_path / "segmentation.png", ("overlay", "mask-info", "threshold"))
    assert texts["predicted-class"] in ("good", "defective")
    assert texts["overlay"] == "mask overlay" and "defect pixels" in texts["mask-info"]
    assert "blur_max" in texts["threshold"]


def test_inspect_saves_the_masks_as_png_and_resumes(predictors, seg_onnx, ksdd_root, tmp_path):
    """``inspect --save-maps`` on 4 inputs (two real KolektorSDD images of the same file name in two
    folders, a good one, an unreadable file): first one folder, then both with resume. Each scored row
    names its own PNG, which equals the answer's RLE mask at the image size; the error row has none."""
    from pathlib import Path

    import pyarrow.parquet as pq
    from PIL import Image

    from defectscope.data.masks import read_manifest
    from defectscope.deploy.inspect import inspect_archive, map_file_name

    items = read_manifest(ksdd_root, splits=None)
    bad = [it.image for it in items if it.defective][:2]
    good = next(it.image for it in items if not it.defective)
    root = tmp_path / "archive"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "part.jpg").symlink_to(bad[0])
    (root / "b" / "part.jpg").symlink_to(bad[1])
    (root / "a" / "good.jpg").symlink_to(good)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out, maps = tmp_path / "r.parquet", tmp_path / "maps"
    first = inspect_archive(seg_onnx, [root / "a"], out, save_maps=maps, batch_size=2)
    assert first.rows == 2 and first.errors == 0
    res = inspect_archive(seg_onnx, [root / "a", root / "b"], out, save_maps=maps, resume=True, batch_size=2)
    assert (res.rows, res.new, res.resumed, res.errors) == (4, 2, 2, 1)
    rows = {Path(r["path"]).relative_to(root).as_posix(): r for r in pq.read_table(out).to_pylist()}
    assert rows["b/broken.png"]["error"] and rows["b/broken.png"]["map_path"] is None
    scored = ["a/part.jpg", "b/part.jpg", "a/good.jpg"]
    files = [Path(rows[k]["map_path"]) for k in scored]
    assert len(set(files)) == 3 and sorted(maps.iterdir()) == sorted(files)  # no collision, no temporary left
    assert [f.name for f in files] == [map_file_name(str(root / k)) for k in scored]
    _, onnx_p = predictors
    for k, f in zip(scored, files):
        ans = onnx_p.predict([root / k])[0]
        h, w = ans["masks"][0]["size"]
        with Image.open(f) as im:
            assert im.format == "PNG"
            m = np.asarray(im)
        assert m.shape == (h, w) and set(np.unique(m).tolist()) <= {0, 255}
        assert ((m == 255) == rle_decode(ans["masks"][0]["rle"], (h, w)).astype(bool)).all()
        assert int((m == 255).sum()) == rows[k]["defect_pixels"]
