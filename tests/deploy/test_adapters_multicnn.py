"""The fused multi-CNN classifier deployed end to end: a tiny run trained through the CLI on real NEU images
(two members reading different sizes, so the antialiased member resize is in the graph), exported, ONNX
Runtime vs PyTorch vs the fused model's own forward on the run's real held-out images, served over HTTP,
and the page in Chromium."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from task_helpers import page_screenshot, post_image, train_cli

from defectscope.deploy.predictor import load_predictor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mc(tmp_path_factory, neu_small):
    from defectscope.deploy.export import export_onnx

    tmp = tmp_path_factory.mktemp("multicnn")
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "multicnn", "seed": 0, "data": {"root": str(neu_small), "image_size": 48, "max_per_class": 6},
        "members": [{"name": "lite0", "backbone": "efficientnet_lite0", "pretrained": True, "freeze": 4},
                    {"name": "r18", "backbone": "resnet18", "pretrained": False, "image_size": 32, "freeze": 10,
                     "freeze_unit": "layers"}],
        "train": {"epochs": 1, "batch_size": 8, "val_fraction": 0.25, "logger": ["csv"], "progress": False,
                  "precision": "32", "channels_last": False},
        "fusion": {"epochs": 2, "batch_size": 8, "cache_dir": str(tmp / "cache")}}))
    run = train_cli(recipe, tmp / "run", [])
    onnx_file = tmp / "model.onnx"
    export_onnx(run, onnx_file)
    return run, load_predictor(run, threads=1), load_predictor(onnx_file, threads=1), onnx_file


def test_onnx_matches_pytorch_and_the_fused_model(mc):
    from defectscope.deploy.adapters.multicnn import resize_matrix
    from defectscope.engine.run import RunFolder

    run, tp, op, onnx_file = mc
    assert op.info.task == "multicnn" and op.info.model_name == "multicnn_fusion"
    assert [m["image_size"] for m in op.info.extra["members"]] == [48, 32]
    ev = op.adapter.eval_set(run, op.info)
    a, b = tp.run(ev.inputs), op.run(ev.inputs)
    diff, same = op.adapter.compare(op.info, a, b)
    assert diff <= 1e-4 and same == 1.0
    from defectscope.deploy.benchmark import openvino_runner

    ov_diff, ov_same = op.adapter.compare(op.info, b, openvino_runner(onnx_file, threads=1)(ev.inputs))
    assert ov_diff <= 1e-4 and ov_same == 1.0  # OpenVINO on the same file
    model, payload = RunFolder(run).load_model()
    assert payload["task"] == "multicnn"
    with torch.no_grad():
        ref = torch.softmax(model(torch.from_numpy(ev.inputs["image"])), 1).numpy()
    assert np.abs(ref - b["probabilities"]).max() <= 1e-4
    # the resize matrices are PyTorch's antialiased bilinear kernel
    x = torch.rand(2, 3, 48, 48)
    r = resize_matrix(48, 32)
    ref_resize = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(r @ x @ r.T, ref_resize, atol=1e-5)
    name, acc = op.adapter.score(op.info, b, ev.targets)
    assert name == "accuracy %" and 0 <= acc <= 100


def test_served_over_http_and_page(mc, neu_small, tmp_path):
    run, tp, op, onnx_file = mc
    f = neu_small / "scratches_7.jpg"
    body = post_image(op, f)
    assert body["class"] == tp.predict([f])[0]["class"] and set(body["probabilities"]) == set(op.info.class_names)
    assert body["overlay_png"] is None
    texts = page_screenshot(op, f, tmp_path / "multicnn.png", ())
    assert texts["predicted-class"] == body["class"]
