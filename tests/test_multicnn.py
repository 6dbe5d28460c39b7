"""Multi-CNN feature fusion (paper 003): concatenation order, freezing, feature cache, a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from defectscope.config import ConfigError, load_raw, validate
from defectscope.data.images import load_stack
from defectscope.engine.classification import predict_probs
from defectscope.recipes.multicnn import AugmentConfig, MultiCNNRecipe
from defectscope.engine.pipeline import train
from defectscope.engine.run import RunFolder
from defectscope.models import create_model
from defectscope.models.multicnn import (
    FeatureCache,
    FeatureFusionClassifier,
    data_fingerprint,
    freeze_first,
    late_fusion,
    model_fingerprint,
)
from defectscope.models.multicnn.lightning_model import online_augment, rotate
from defectscope.models.training import exponential_decay, to_float

REPO = Path(__file__).resolve().parents[1]
MEMBERS = [{"name": "a", "backbone": "efficientnet_lite0", "image_size": 64},
           {"name": "b", "backbone": "resnet18", "image_size": 48}]


@pytest.fixture(scope="module")
def neu_images(neu_small) -> tuple[list[Path], torch.Tensor]:
    files = sorted(neu_small.glob("*.jpg"))[:6]
    return files, torch.from_numpy(load_stack(files, 64))


def test_concatenation_shapes_and_order(neu_images):
    _, x = neu_images
    torch.manual_seed(0)
    model = FeatureFusionClassifier(MEMBERS, num_classes=6).eval()
    assert model.dims == [1280, 512]
    assert model.feature_slices() == [("a", 0, 1280), ("b", 1280, 1792)]
    xf = to_float(x)
    with torch.no_grad():
        feats = model.forward_features(xf)
        a = model.extractors[0](xf).mean(dim=(2, 3))  # member a at its own size (64 = input)
        b = model.extractors[1](torch.nn.functional.interpolate(xf, size=(48, 48), mode="bilinear",
                                                                  align_corners=False, antialias=True)).mean(dim=(2, 3))
        logits = model(xf)
    assert feats.shape == (6, 1792) and logits.shape == (6, 6)
    torch.testing.assert_close(feats[:, :1280], a)
    torch.testing.assert_close(feats[:, 1280:], b)
    torch.testing.assert_close(logits, model.head(feats))
    assert not any(p.requires_grad for p in model.extractors.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    with pytest.raises(ValueError, match="unique"):
        FeatureFusionClassifier([MEMBERS[0], MEMBERS[0]], num_classes=2)


@pytest.mark.parametrize("unit,n", [("stages", 3), ("layers", 20)])
def test_frozen_parameters_unchanged_after_step(neu_images, unit, n):
    _, x = neu_images
    torch.manual_seed(0)
    model = create_model("classifier", backbone="efficientnet_lite0", num_classes=6, pretrained=True, dropout=0.5)
    info = freeze_first(model.backbone.body, n, unit)
    assert info.frozen_params > 0 and info.trainable_params > 0
    assert info.frozen_params + info.trainable_params == sum(p.numel() for p in model.backbone.body.parameters())
    assert info.frozen_params == sum(p.numel() for p in model.backbone.body.parameters() if not p.requires_grad)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = {f"backbone.body.{k}" for k, p in model.backbone.body.named_parameters() if not p.requires_grad}
    frozen_bn = [f"backbone.body.{m}.running_mean" for m in info.frozen_modules
                 if f"backbone.body.{m}.running_mean" in before]
    assert frozen_bn, "a frozen stage holds batch-norm layers"
    model.train()
    opt = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(to_float(x)), torch.arange(6))
    loss.backward()
    opt.step()
    after = model.state_dict()
    for k in frozen | set(frozen_bn):
        assert torch.equal(before[k], after[k]), f"{k} changed although frozen"
    changed = [k for k, p in model.named_parameters() if p.requires_grad and not torch.equal(before[k], p.detach())]
    assert "head.weight" in changed and any(k.startswith("backbone.body.blocks.6") for k in changed)
    # unfrozen batch-norm statistics do update in train mode
    assert not torch.equal(before["backbone.body.bn2.running_mean"], after["backbone.body.bn2.running_mean"])


def test_freeze_errors():
    model = create_model("classifier", backbone="resnet18", num_classes=2)
    with pytest.raises(ValueError, match="unit"):
        freeze_first(model.backbone.body, 1, "blocks")
    with pytest.raises(ValueError, match="group_matcher"):
        freeze_first(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1, "stages")
    info = freeze_first(model.backbone.body, 99, "stages")
    assert info.trainable_params == 0 and info.n == info.available == 5


def test_feature_cache_invalidated_by_model_and_data(neu_images, tmp_path):
    files, x = neu_images
    torch.manual_seed(0)
    model = FeatureFusionClassifier(MEMBERS[:1], num_classes=6).eval()
    ext = model.extractors[0]
    cache = FeatureCache(tmp_path / "cache")
    calls = []

    def compute(imgs=x):
        calls.append(1)
        with torch.no_grad():
            return model.member_features(0, to_float(imgs))

    f1, hit = cache.get_or_compute(ext, files, 64, compute)
    assert not hit and f1.shape == (6, 1280)
    f2, hit = cache.get_or_compute(ext, files, 64, compute)
    assert hit and torch.equal(f1, f2) and len(calls) == 1
    # other image size -> miss
    _, hit = cache.get_or_compute(ext, files, 56, compute)
    assert not hit
    # model changed (one weight nudged) -> new fingerprint, miss
    fp = model_fingerprint(ext)
    with torch.no_grad():
        next(ext.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(ext) != fp
    _, hit = cache.get_or_compute(ext, files, 64, compute)
    assert not hit
    # data changed: a file removed, the order changed, a file's content changed -> miss
    _, hit = cache.get_or_compute(ext, files[:5], 64, lambda: compute(x[:5]))
    assert not hit
    assert data_fingerprint(files[::-1]) != data_fingerprint(files)
    copies = []
    for f in files:
        shutil.copy(f, tmp_path / f.name)
        copies.append(tmp_path / f.name)
    fp_before = data_fingerprint(copies)
    _, hit = cache.get_or_compute(ext, copies, 64, compute)
    assert not hit
    _, hit = cache.get_or_compute(ext, copies, 64, compute)
    assert hit
    copies[2].write_bytes(files[3].read_bytes())  # same name, other content
    assert data_fingerprint(copies) != fp_before
    _, hit = cache.get_or_compute(ext, copies, 64, compute)
    assert not hit
    assert cache.hits == 2 and cache.misses == 6


def test_online_augment_and_decay(neu_images):
    _, x = neu_images
    xf = to_float(x)
    g = torch.Generator().manual_seed(0)
    out = online_augment(xf.clone(), AugmentConfig(), g)
    assert out.shape == xf.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, xf)
    same = online_augment(xf.clone(), AugmentConfig(flips=False, rotation=0, brightness=0, contrast=0, saturation=0), g)
    torch.testing.assert_close(same, xf)
    # rotation by 180 degrees equals flipping both axes; by 90 degrees, a transpose + flip
    torch.testing.assert_close(rotate(xf[:2], torch.full((2,), math.pi)), xf[:2].flip(-1).flip(-2), atol=1e-4, rtol=0)
    r90 = rotate(xf[:1], torch.full((1,), math.pi / 2))
    assert min(float(torch.dist(r90, xf[:1].transpose(-1, -2).flip(d))) for d in (-1, -2)) < 1e-2
    opt = torch.optim.RMSprop([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = exponential_decay(opt, 11, 1e-3, 1e-4)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4) and lrs[5] == pytest.approx(10 ** -3.5)


def test_late_fusion_averages():
    a = np.array([[0.9, 0.1], [0.2, 0.8]])
    b = np.array([[0.3, 0.7], [0.4, 0.6]])
    np.testing.assert_allclose(late_fusion([a, b]), [[0.6, 0.4], [0.3, 0.7]])
    with pytest.raises(ValueError):
        late_fusion([a, b[:1]])


def test_recipes_validate():
    for name in ("neu_multicnn.yaml", "neu_multicnn_paper.yaml"):
        cfg = validate(load_raw(REPO / "configs" / name), MultiCNNRecipe, name)
        assert cfg.task == "multicnn" and len(cfg.members) >= 3
    raw = load_raw(REPO / "configs" / "neu_multicnn.yaml")
    raw["members"].append(dict(raw["members"][0]))
    with pytest.raises(ConfigError, match="unique"):
        validate(raw, MultiCNNRecipe, "dup")


def test_tiny_end_to_end(neu_small, tmp_path):
    raw = {"task": "multicnn", "seed": 0,
           "data": {"root": str(neu_small), "image_size": 48, "max_per_class": 6},
           "members": [{"name": "lite0", "backbone": "efficientnet_lite0", "pretrained": True, "freeze": 4},
                       {"name": "r18", "backbone": "resnet18", "pretrained": False, "image_size": 32,
                        "freeze": 10, "freeze_unit": "layers"}],
           "train": {"epochs": 1, "batch_size": 8, "val_fraction": 0.25, "logger": ["csv"], "progress": False,
                     "precision": "32", "channels_last": False},
           "fusion": {"epochs": 5, "batch_size": 8, "cache_dir": str(tmp_path / "cache")}}
    cfg = validate(raw, MultiCNNRecipe, "tiny")
    res = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["members_order"] == ["lite0", "r18"]
    # figures measured on the held-out part live under "test" (pooled and averaged over folds in CV)
    assert set(metrics["test"]["members"]) == {"lite0", "r18", "late_fusion"}
    assert [r["model"] for r in metrics["test"]["comparison"]] == ["lite0", "r18", "feature_fusion", "late_fusion"]
    assert metrics["feature_order"] == [{"member": "lite0", "start": 0, "end": 1280},
                                        {"member": "r18", "start": 1280, "end": 1792}]
    n_test = len((run / "split" / "test.txt").read_text().splitlines())
    assert metrics["test"]["n"] == n_test == metrics["split"]["test"] and set(metrics["test"]["per_class"]) == set(metrics["test"]["class_names"])
    assert metrics["members"]["lite0"]["freeze"]["frozen_params"] > 0
    assert metrics["feature_cache"]["misses"] == 6 and metrics["feature_cache"]["hits"] == 0
    for key in ("lite0", "r18", "feature_fusion", "late_fusion"):
        assert (run / "plots" / f"{key}_confusion_matrix.png").is_file()
    html = (run / "report.html").read_text()
    assert "Comparison" in html and "feature_fusion" in html
    # each member folder is a classification run
    assert yaml.safe_load((run / "members" / "r18" / "config.yaml").read_text())["task"] == "classification"
    # the saved fused model reproduces the reported test probabilities end to end
    model, payload = RunFolder(run).load_model()
    assert payload["task"] == "multicnn" and payload["feature_order"][1] == ("r18", 1280, 1792)
    test_files = [Path(line.split(",")[0]) for line in (run / "split" / "test.txt").read_text().splitlines()]
    probs = predict_probs(model, load_stack(test_files, 48))
    pred_acc = float((probs.argmax(1) == np.array([metrics["test"]["class_names"].index(line.rsplit(",", 1)[1])
                                                    for line in (run / "split" / "test.txt").read_text().splitlines()])).mean())
    assert pred_acc == pytest.approx(res["test"]["accuracy"])
    # late fusion row = average of the member probabilities
    assert 0 <= metrics["test"]["members"]["late_fusion"]["accuracy"] <= 1
