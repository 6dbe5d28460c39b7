"""Detection deployed end to end, for both box models: tiny runs trained through the CLI on real NEU-DET
images with their VOC boxes (``fcos_lite``: NMS in NumPy after the runtime; ``slot_detector``: slots, no
NMS), exported, boxes of ONNX Runtime vs the engine's own PyTorch ``model.detect`` on real held-out
images (same boxes at IoU >= 0.99, scores within 1e-4), served over HTTP, and the page in Chromium."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from task_helpers import page_screenshot, png_array, post_image, train_cli

from defectscope.deploy.adapters.detection import box_iou, match_detections, nms
from defectscope.deploy.predictor import load_predictor

pytestmark = pytest.mark.slow

# fcos_lite at 160 px: its top pyramid level is 2 x 2 (at <= 128 px it is 1 x 1 and torchvision's
# GroupNorm refuses batch 1 in PyTorch)
MODELS = {
    "fcos_lite": ({"name": "fcos_lite", "fpn_channels": 32, "head_convs": 1}, 160),
    "slot_detector": ({"loss": "hungarian", "head": "attention", "hidden_dim": 32, "num_heads": 4,
                       "freeze_backbone": True}, 64),
}


@pytest.fixture(scope="module", params=list(MODELS))
def det(request, tmp_path_factory, neu_root):
    """``(run, onnx file, PyTorch predictor, ONNX predictor)`` of one box model."""
    from defectscope.deploy.export import export_onnx

    model, size = MODELS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump({"task": "detection", "data": {"root": str(neu_root)},
                                      "model": {"backbone": "efficientnet_lite0", "pretrained": True, **model},
                                      "train": {"early_stopping_patience": 0}}))
    run = train_cli(recipe, tmp / "run", [f"data.image_size={size}", "data.max_per_class=3", "train.epochs=1",
                                          "train.batch_size=8", "train.val_fraction=0.2", "train.precision=32",
                                          "train.logger=[csv]", "train.channels_last=false",
                                          "model.score_threshold=0.05"])  # low: a 1-epoch model's boxes are shown
    onnx_file = tmp / "model.onnx"
    export_onnx(run, onnx_file)
    return run, onnx_file, load_predictor(run, threads=1), load_predictor(onnx_file, threads=1)


def test_numpy_nms_is_torchvision_batched_nms():
    from torchvision.ops import batched_nms

    rng = np.random.default_rng(0)
    xy = rng.random((300, 2)) * 50
    boxes = np.concatenate([xy, xy + 5 + rng.random((300, 2)) * 30], 1)
    scores, labels = rng.random(300), rng.integers(0, 3, 300)
    for thr in (0.3, 0.6):
        ref = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), thr).numpy()
        assert nms(boxes, scores, labels, thr).tolist() == ref.tolist()
    assert box_iou(boxes[:1], boxes[:1])[0, 0] == pytest.approx(1.0)


def test_onnx_boxes_match_the_engines_pytorch_detect(det):
    """ONNX Runtime + NumPy selection against ``model.detect`` (torchvision's own FCOS post-processing /
    ``SlotDetector.postprocess``) on the run's real held-out images: every detection down to score 0.05
    (FCOS's candidate threshold) paired at IoU >= 0.99, same class, scores within 1e-4. ``model.detect``
    also returns FCOS's background-label detections (label -1 after its shift); the adapter drops them."""
    from defectscope.engine.run import RunFolder

    run, onnx_file, tp, op = det
    ev = op.adapter.eval_set(run, op.info)
    assert len(ev.files) >= 2
    got = op.run(ev.inputs)
    model, _ = RunFolder(run).load_model()
    with torch.no_grad():
        ref = model.detect(torch.from_numpy(ev.inputs["image"]))
    n_boxes = 0
    for i, r in enumerate(ref):
        fg = r["labels"] >= 0
        r = {k: v.numpy()[fg.numpy()] for k, v in r.items()}
        d = op.adapter.detections(op.info, got["boxes"][i], got["class_scores"][i])
        same, diff = match_detections(r, d, 0.05)
        assert same and diff <= 1e-4, (i, diff)
        n_boxes += int((r["scores"] >= 0.05 + 1e-3).sum())
    assert n_boxes > 0  # the comparison covered real detections
    diff, share = op.adapter.compare(op.info, tp.run(ev.inputs), got)
    assert share == 1.0 and diff <= 1e-4
    from defectscope.deploy.benchmark import openvino_runner

    diff, share = op.adapter.compare(op.info, got, openvino_runner(onnx_file, threads=1)(ev.inputs))
    assert share == 1.0 and diff <= 1e-4  # OpenVINO on the same file: the same boxes
    assert op.info.extra["nms"] == ("numpy after the runtime" if op.info.model_name == "fcos_lite" else "none (slots)")


def test_served_over_http_with_boxes_in_image_pixels(det, neu_root):
    run, _, tp, op = det
    f = neu_root / "images" / "scratches_1.jpg"
    body = post_image(op, f)
    ref = tp.predict([f])[0]
    assert len(body["boxes"]) == len(ref["boxes"]) > 0

    def as_set(boxes):
        return {"boxes": np.array([b["box_normalised"] for b in boxes]), "scores": np.array([b["score"] for b in boxes]),
                "labels": np.array([b["class_index"] for b in boxes])}

    same, diff = match_detections(as_set(body["boxes"]), as_set(ref["boxes"]), -1.0, margin=0.0)
    assert same and diff <= 1e-4
    for b in body["boxes"]:
        assert b["score"] >= body["score_threshold"] and b["class"] == op.info.class_names[b["class_index"]]
        x0, y0, x1, y1 = b["box"]
        assert 0 <= x0 <= x1 <= 200 and 0 <= y0 <= y1 <= 200  # NEU images are 200 x 200 px
        np.testing.assert_allclose(b["box"], np.array(b["box_normalised"]) * 200, atol=0.01)
    assert png_array(body["overlay_png"]).shape == (200, 200, 3)


def test_page_shows_boxes_with_labels(det, neu_root, tmp_path):
    run, _, tp, op = det
    f = neu_root / "images" / "patches_1.jpg"
    texts = page_screenshot(op, f, tmp_path / f"detection_{op.info.model_name}.png", ("overlay", "boxes"))
    n = len(op.predict([f])[0]["boxes"])
    assert texts["overlay"] == "boxes" and texts["boxes"].startswith(f"{n} box(es) with score >=")
