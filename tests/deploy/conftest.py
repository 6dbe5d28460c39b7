"""Fixtures for the deploy tests: a small real-weights classification run, its ONNX export, real NEU files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]


@pytest.fixture(scope="session")
def neu_files(neu_small) -> list[Path]:
    """12 real NEU images (2 per class) from the shared subset, as resolved paths."""
    return [(neu_small / f"{c}_{i}.jpg").resolve() for c in NEU_CLASSES for i in (1, 2)]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, neu_small) -> Path:
    """A run folder in the training contract (config.yaml, model.ckpt, split lists) holding a small
    ``multiscale`` model: the real ImageNet EfficientNet-Lite0 backbone at 64/48 px with a
    random-initialised attention head (seed 0). Export and runtimes do not need a trained head."""
    from defectscope.engine.run import RunFolder
    from defectscope.models import create_model

    run = RunFolder(tmp_path_factory.mktemp("deploy_run")).create()
    run.write_config({"task": "classification", "seed": 0})
    kwargs = {"backbone": "efficientnet_lite0", "num_classes": 6, "image_size": 64, "low_res": 48,
              "embed_dim": 32, "num_heads": 4, "num_layers": 1, "dropout": 0.1}
    torch.manual_seed(0)
    model = create_model("multiscale", pretrained=True, **kwargs)
    run.save_model("classification", "multiscale", kwargs, model.state_dict(), class_names=NEU_CLASSES, image_size=64)
    files = sorted(neu_small.glob("*.jpg"))
    lines = {"test": [f for f in files if int(f.stem.rsplit("_", 1)[1]) <= 2],
             "train": [f for f in files if int(f.stem.rsplit("_", 1)[1]) > 2]}
    run.split_dir.mkdir(exist_ok=True)
    for split, fs in lines.items():
        (run.split_dir / f"{split}.txt").write_text("".join(f"{f.resolve()},{f.stem.rsplit('_', 1)[0]}\n" for f in fs))
    return run.path


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run, tmp_path_factory) -> Path:
    """``defectscope export`` of :func:`tiny_run`."""
    from defectscope.deploy.export import export_onnx

    out = tmp_path_factory.mktemp("deploy_onnx") / "model.onnx"
    export_onnx(tiny_run, out)
    return out


@pytest.fixture(scope="session")
def onnx_predictor(tiny_onnx):
    from defectscope.deploy.predictor import load_predictor

    return load_predictor(tiny_onnx, threads=1)


@pytest.fixture(scope="session")
def torch_predictor(tiny_run):
    from defectscope.deploy.predictor import load_predictor

    return load_predictor(tiny_run, threads=1)

