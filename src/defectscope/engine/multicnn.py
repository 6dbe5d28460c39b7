"""The ``multicnn`` task: multi-CNN feature fusion classifier (paper 003).

Recipe (``task: multicnn``)::

    data:    {root: ../shared/datasets/neu-det, image_size: 200, test_fraction: 0.2, split_seed: 0}
    members:                       # fusion order = this order (documented in metrics.json feature_order)
      - {backbone: efficientnet_lite0, pretrained: true, freeze: 3, freeze_unit: stages}
      - {backbone: efficientnet_lite1, pretrained: true, freeze: 3}
    train:   {epochs: 3, batch_size: 16, lr: 1.0e-3, lr_end: 1.0e-4, loss: ce}     # each member
    fusion:  {epochs: 50, batch_size: 40, lr: 1.0e-3, lr_end: 1.0e-4, dropout: 0.5}

Protocol (paper 003, sections 2.4 and 3):

1. Each member (a registry backbone + global pooling + dropout 0.5 + linear) is
   fine-tuned with its first ``freeze`` stages/layers frozen, RMSprop with the
   learning rate decaying exponentially from ``lr`` to ``lr_end`` over the run,
   cross-entropy, and online augmentation (horizontal/vertical flips, rotation by
   an arbitrary angle, colour change). The checkpoint with the best validation
   weighted F1 is kept; each member is a complete ``classification`` run folder
   under ``RUN/members/<name>``.
2. Feature fusion: the fine-tuned extractors are frozen, their pooled features
   (cached on disk, see :mod:`defectscope.models.multicnn.feature_cache`) are
   concatenated in member order and only dropout + linear is trained (best
   validation epoch kept).
3. Late fusion: the members' softmax probabilities are averaged.

The held-out test split is used once at the end. ``metrics.json`` holds the
fused model under ``test`` and one entry per single model plus ``late_fusion``
under ``members``; ``comparison`` is the Tables 2-3 layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import math
import time
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from defectscope.config import BaseRecipe, ClassifierTrainConfig, StrictModel
from defectscope.engine.classification import (
    ClassificationData,
    ClassificationModelConfig,
    ClassificationRecipe,
    ClassificationTask,
    ImageClassifierModule,
    random_flips,
    to_float,
    write_classification_report,
)
from defectscope.data.images import discover_labelled_images, load_stack
from defectscope.data.splits import stratified_split, write_file_list
from defectscope.engine.run import RunFolder
from defectscope.engine.tasks import register_task
from defectscope.engine.trainer import build_trainer, csv_log_path, set_threads
from defectscope.evaluation.classification import classification_metrics
from defectscope.evaluation.plots import plot_confusion_matrix, plot_roc_curves, plot_training_curves
from defectscope.evaluation.report import Report
from defectscope.models import create_model
from defectscope.models.multicnn import (
    FeatureCache,
    FeatureFusionClassifier,
    data_fingerprint,
    freeze_first,
    late_fusion,
    resize_to,
)


class MemberConfig(StrictModel):
    """One single model of the ensemble.

    Attributes:
        name: unique name (default: the backbone name); the run folder ``members/<name>``.
        backbone: registry backbone name.
        pretrained: real ImageNet weights (only EfficientNet-Lite here).
        weights: a local state-dict file for the backbone.
        image_size: the member's input side; images are resized from ``data.image_size``
            inside the model (default: ``data.image_size``).
        freeze: number of stages/layers frozen from the input side (paper 003 section 2.4.2).
        freeze_unit: ``stages`` (timm coarse groups, stem = 1) or ``layers`` (leaf modules).
        dropout: before the member's linear layer (paper 003: 0.5).
        epochs, batch_size: override ``train.epochs`` / ``train.batch_size`` for this member.
    """

    name: str | None = None
    backbone: str
    pretrained: bool = True
    weights: str | None = None
    image_size: int | None = Field(None, ge=16)
    freeze: int = Field(0, ge=0)
    freeze_unit: Literal["stages", "layers"] = "stages"
    dropout: float = Field(0.5, ge=0, lt=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)

    @property
    def key(self) -> str:
        return self.name or self.backbone


class AugmentConfig(StrictModel):
    """Online augmentation of paper 003 section 2.2 (Fig. 1 d-g), per image.

    Attributes:
        flips: random horizontal and vertical flips.
        rotation: maximum rotation in degrees (uniform in [-rotation, rotation];
            180 = arbitrary angle); borders are filled by reflection.
        brightness, contrast, saturation: colour change, each a factor drawn
            uniformly in [1 - v, 1 + v] (saturation is a no-op on grey images).
    """

    flips: bool = True
    rotation: float = Field(180.0, ge=0, le=180)
    brightness: float = Field(0.2, ge=0, lt=1)
    contrast: float = Field(0.2, ge=0, lt=1)
    saturation: float = Field(0.2, ge=0, lt=1)


class MultiCNNTrainConfig(ClassifierTrainConfig):
    """Member fine-tuning settings: :class:`TrainConfig` plus RMSprop and augmentation.

    Attributes:
        lr: initial RMSprop learning rate (paper 003 Table 1: 1e-3).
        lr_end: final learning rate of the exponential decay (paper: 1e-4).
        rmsprop_alpha: RMSprop smoothing constant (Keras' rho, 0.9).
        augmentation: :class:`AugmentConfig`.
    """

    lr: float = Field(1e-3, gt=0)
    lr_end: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    loss: Literal["focal", "ce"] = "ce"
    rmsprop_alpha: float = Field(0.9, gt=0, lt=1)
    augmentation: AugmentConfig = AugmentConfig()


class FusionConfig(StrictModel):
    """Training of the feature-fusion classifier on cached features (paper 003 section 3.2).

    Attributes:
        epochs, batch_size: passes over the cached training features and batch size.
        lr, lr_end: RMSprop learning rate, decaying exponentially (paper: 1e-3 -> 1e-4).
        dropout: before the linear layer (paper: 0.5).
        cache_dir: feature cache folder (default ``RUN/feature_cache``); point several runs
            at one folder to share entries (keys include the model and data fingerprints).
    """

    epochs: int = Field(50, ge=1)
    batch_size: int = Field(40, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_end: float = Field(1e-4, gt=0)
    dropout: float = Field(0.5, ge=0, lt=1)
    cache_dir: str | None = None


class MultiCNNRecipe(BaseRecipe):
    """Recipe of the ``multicnn`` task."""

    task: Literal["multicnn"] = "multicnn"
    data: ClassificationData
    members: list[MemberConfig] = Field(min_length=1)
    train: MultiCNNTrainConfig = MultiCNNTrainConfig()
    fusion: FusionConfig = FusionConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> "MultiCNNRecipe":
        keys = [m.key for m in self.members]
        if len(set(keys)) != len(keys):
            raise ValueError(f"members: names must be unique (set 'name' when a backbone repeats), got {keys}")
        return self


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each square image of ``[B, C, S, S]`` about its centre by ``angles`` ``[B]`` (radians).

    Bilinear ``grid_sample`` with reflection padding (no black corners).
    """
    cos, sin = angles.cos(), angles.sin()
    theta = torch.zeros(x.shape[0], 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def online_augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image flips, rotation by a random angle and colour change of ``[B, 3, S, S]`` in [0, 1].

    Rotation uses ``affine_grid``/``grid_sample`` (bilinear, reflection padding) on
    square images; colour change scales brightness, contrast (around each image's
    mean) and saturation (around its luminance). Output is clamped to [0, 1].
    """
    b = x.shape[0]
    if cfg.flips:
        x = random_flips(x, generator)
    if cfg.rotation > 0:
        x = rotate(x, (torch.rand(b, generator=generator) * 2 - 1) * math.radians(cfg.rotation))

    def factor(v: float) -> torch.Tensor:
        return (1 + (torch.rand(b, generator=generator) * 2 - 1) * v).to(x.dtype).view(b, 1, 1, 1)

    if cfg.brightness:
        x = x * factor(cfg.brightness)
    if cfg.contrast:
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * factor(cfg.contrast) + m
    if cfg.saturation:
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = grey + (x - grey) * factor(cfg.saturation)
    return x.clamp_(0, 1)


def exponential_decay(opt: torch.optim.Optimizer, total_steps: int, lr: float, lr_end: float):
    """Per-step exponential decay of the learning rate from ``lr`` to ``lr_end`` over ``total_steps``."""
    total = max(1, total_steps - 1)
    ratio = lr_end / lr
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: ratio ** (min(step, total) / total))


class MemberModule(ImageClassifierModule):
    """Fine-tuning of one member: :class:`ImageClassifierModule` with RMSprop, lr decay and paper-003 augmentation.

    Args:
        model: a ``classifier`` model (partially frozen) mapping ``[B, 3, S, S]`` to logits ``[B, K]``.
        num_classes: ``K``.
        cfg: :class:`MultiCNNTrainConfig` (lr, lr_end, rmsprop_alpha, loss, augmentation).
        image_size: the member's input side; inputs of another size are resized.
    """

    def __init__(self, model: nn.Module, num_classes: int, cfg: MultiCNNTrainConfig, image_size: int) -> None:
        super().__init__(model, num_classes, cfg.lr, cfg.weight_decay, cfg.loss, cfg.focal_gamma, cfg.label_smoothing,
                         cfg.augment, cfg.channels_last)
        self.cfg = cfg
        self.image_size = image_size

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_to(to_float(x), self.image_size)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = self._prep(x)
        if self.augment:
            x = online_augment(x, self.cfg.augmentation)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        loss = self.loss_fn(self.model(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.RMSprop(params, lr=self.cfg.lr, alpha=self.cfg.rmsprop_alpha, eps=1e-7,
                                  weight_decay=self.cfg.weight_decay)
        sched = exponential_decay(opt, int(self.trainer.estimated_stepping_batches), self.cfg.lr, self.cfg.lr_end)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _Sized(nn.Module):
    """Resize inputs to ``size`` before ``model`` (members whose input size differs from the data's)."""

    def __init__(self, model: nn.Module, size: int) -> None:
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(resize_to(x, self.size))


@torch.no_grad()
def predict_member_probs(model: nn.Module, x: np.ndarray, size: int, batch_size: int = 32) -> np.ndarray:
    """Softmax probabilities ``[N, K]`` of a member on uint8 images ``[N, 3, H, W]`` resized to ``size``."""
    from defectscope.engine.classification import predict_probs

    return predict_probs(_Sized(model, size), x, batch_size)


@torch.no_grad()
def extract_features(model: FeatureFusionClassifier, i: int, x: np.ndarray, batch_size: int = 32) -> torch.Tensor:
    """Pooled features ``[N, C_i]`` (float32, eval mode) of member ``i`` on uint8 images ``[N, 3, H, W]``.

    The same computation as :meth:`FeatureFusionClassifier.member_features`, batched.
    """
    model.eval()
    xt = torch.as_tensor(x)
    out = [model.member_features(i, to_float(xt[j : j + batch_size])) for j in range(0, len(xt), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.dims[i])


def train_fusion_head(model: FeatureFusionClassifier, feats: dict[str, torch.Tensor], ys: dict[str, np.ndarray],
                      cfg: FusionConfig, seed: int) -> dict:
    """Train ``model.head`` (dropout + linear) on cached concatenated features; keeps the best validation epoch.

    Args:
        model: the fusion model; only ``head`` is optimised (RMSprop, exponential decay, cross-entropy).
        feats: ``{"train": [N, D], "val": [M, D] (optional)}`` concatenated features.
        ys: class indices per split.
        cfg: :class:`FusionConfig`.
        seed: shuffling and dropout seed.

    Returns:
        ``{"best_epoch", "epochs", "history": [{epoch, train_loss, val_loss, val_weighted_f1}]}``.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr = feats["train"], torch.as_tensor(ys["train"]).long()
    steps = cfg.epochs * math.ceil(len(x_tr) / cfg.batch_size)
    opt = torch.optim.RMSprop(model.head.parameters(), lr=cfg.lr, alpha=0.9, eps=1e-7)
    sched = exponential_decay(opt, steps, cfg.lr, cfg.lr_end)
    has_val = "val" in feats and len(feats["val"])
    best, best_state, history = (-1.0, math.inf), None, []
    for epoch in range(cfg.epochs):
        model.drop.train()
        order = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for j in range(0, len(order), cfg.batch_size):
            idx = order[j : j + cfg.batch_size]
            loss = F.cross_entropy(model.forward_head(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        row = {"epoch": epoch + 1, "train_loss": total / len(x_tr)}
        model.drop.eval()
        if has_val:
            with torch.no_grad():
                logits = model.forward_head(feats["val"])
            yv = torch.as_tensor(ys["val"]).long()
            row["val_loss"] = float(F.cross_entropy(logits, yv))
            m = classification_metrics(ys["val"], F.softmax(logits, 1).numpy(), [str(c) for c in range(logits.shape[1])])
            row["val_weighted_f1"] = m["weighted_f1"]
            score = (row["val_weighted_f1"], row["val_loss"])
            if score[0] > best[0] or (score[0] == best[0] and score[1] < best[1]):
                best, best_state, row["best"] = score, {k: v.clone() for k, v in model.head.state_dict().items()}, True
        history.append(row)
    if best_state is not None:
        model.head.load_state_dict(best_state)
    model.eval()
    best_epoch = max((r["epoch"] for r in history if r.get("best")), default=cfg.epochs)
    return {"best_epoch": best_epoch, "epochs": cfg.epochs, "history": history}


def _row(name: str, kind: str, m: dict, **extra) -> dict:
    return {"model": name, "kind": kind, "accuracy": m["accuracy"], "weighted_precision": m["weighted_precision"],
            "weighted_recall": m["weighted_recall"], "weighted_f1": m["weighted_f1"], "macro_auroc": m["macro_auroc"],
            **extra}


# legacy split helper (multi-CNN has not moved onto the pipeline hooks yet)
@dataclass
class ImageSplits:
    """The three splits as uint8 arrays ``[N, 3, S, S]`` with labels ``[N]`` and file lists."""

    class_names: list[str]
    files: dict[str, list[Path]]
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]


def prepare_splits(data: ClassificationData, val_fraction: float, seed: int, run: RunFolder | None,
                   progress: bool = False) -> ImageSplits:
    """Discover, subset, split (test, then val from train), write file lists and decode images.

    Raises:
        DatasetError / ImageReadError: bad folder or a corrupt image (named).
    """
    items, class_names, _ = discover_labelled_images(data.root, data.layout)
    labels = np.array([it.label for it in items])
    if data.max_per_class:
        rng = np.random.default_rng(data.split_seed)
        keep = np.concatenate([
            rng.permutation(np.flatnonzero(labels == c))[: data.max_per_class] for c in range(len(class_names))
        ])
        items = [items[i] for i in np.sort(keep)]
        labels = labels[np.sort(keep)]
    trainval_idx, test_idx = stratified_split(labels, data.test_fraction, data.split_seed)
    parts = {"test": test_idx}
    if val_fraction > 0:
        tr, va = stratified_split(labels[trainval_idx], val_fraction, data.split_seed)
        parts["train"], parts["val"] = trainval_idx[tr], trainval_idx[va]
    else:
        parts["train"] = trainval_idx
    files = {k: [items[i].path for i in v] for k, v in parts.items()}
    ys = {k: labels[v] for k, v in parts.items()}
    if run is not None:
        for k in parts:
            write_file_list(run.split_dir / f"{k}.txt", files[k], [class_names[c] for c in ys[k]])
    xs = {k: load_stack(files[k], data.image_size, progress=progress) for k in parts}
    return ImageSplits(class_names, files, xs, ys)



class MultiCNNTask(ClassificationTask):
    """The ``multicnn`` task; ``evaluate`` and ``predict`` are the classification ones (the saved model is the fused one)."""

    name = "multicnn"
    recipe = MultiCNNRecipe

    def _fit_member(self, recipe: MultiCNNRecipe, m: MemberConfig, splits, run: RunFolder) -> dict:
        """Fine-tune one member; writes ``RUN/members/<name>`` as a classification run. Returns model, probs, metrics."""
        t = recipe.train
        k = len(splits.class_names)
        size = m.image_size or recipe.data.image_size
        mt = t.model_copy(update={"epochs": m.epochs or t.epochs, "batch_size": m.batch_size or t.batch_size})
        mrun = RunFolder(run.path / "members" / m.key).create()
        L.seed_everything(recipe.seed, workers=True, verbose=False)
        kwargs = {"backbone": m.backbone, "num_classes": k, "image_size": size, "dropout": m.dropout}
        model = create_model("classifier", **kwargs, pretrained=m.pretrained, weights=m.weights)
        freeze = freeze_first(model.backbone.body, m.freeze, m.freeze_unit)
        module = MemberModule(model, k, mt, size)
        loader = lambda s, shuffle: DataLoader(  # noqa: E731
            TensorDataset(torch.from_numpy(splits.x[s]), torch.from_numpy(splits.y[s]).long()),
            batch_size=mt.batch_size, shuffle=shuffle, num_workers=0,
            drop_last=shuffle and len(splits.y[s]) > mt.batch_size)
        has_val = "val" in splits.x
        trainer = build_trainer(mt, mrun.path, "val/weighted_f1" if has_val else None)
        start = time.perf_counter()
        trainer.fit(module, loader("train", True), loader("val", False) if has_val else None)
        seconds = time.perf_counter() - start
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if has_val else ""
        if best:
            module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
        model = module.model.to(memory_format=torch.contiguous_format).float().eval()
        probs = predict_member_probs(model, splits.x["test"], size)
        metrics = classification_metrics(splits.y["test"], probs, splits.class_names)
        # the member folder is a complete classification run (predict/evaluate work on it)
        base = {f: getattr(mt, f) for f in ClassifierTrainConfig.model_fields}
        member_recipe = ClassificationRecipe(
            seed=recipe.seed, data=recipe.data.model_copy(update={"image_size": size}), train=ClassifierTrainConfig(**base),
            model=ClassificationModelConfig(name="classifier", backbone=m.backbone, pretrained=m.pretrained,
                                            weights=m.weights, dropout=m.dropout))
        mrun.write_config(member_recipe.model_dump(mode="json"))
        mrun.save_model("classification", "classifier", kwargs, model.state_dict(), class_names=splits.class_names,
                        image_size=size, normalisation="inside model: input RGB in [0, 1]",
                        weights_source=model.backbone.weights_source)
        result = {"task": "classification", "member_of": str(run.path), "backbone": m.backbone,
                  "weights": model.backbone.weights_source, "seed": recipe.seed, "image_size": size,
                  "freeze": freeze.as_dict(), "epochs_run": int(trainer.current_epoch),
                  "best_checkpoint": Path(best).name if best else "last", "train_seconds": round(seconds, 1),
                  "test": metrics}
        mrun.write_metrics(result)
        write_classification_report(mrun, f"defectscope multicnn member {m.key}", metrics, splits.y["test"], probs,
                                    splits.class_names, {"backbone": m.backbone, "weights": model.backbone.weights_source,
                                                         "frozen": f"first {freeze.n} {freeze.unit}: {freeze.frozen_params:,} of {freeze.total_params:,} parameters",
                                                         "epochs run": trainer.current_epoch, "train seconds": round(seconds, 1)})
        return {"model": model, "probs": probs, "metrics": metrics, "result": result, "freeze": freeze,
                "seconds": seconds, "size": size}

    def fit(self, recipe: MultiCNNRecipe, run_dir: Path, source: Path | None = None) -> dict | None:
        t = recipe.train
        if t.devices > 1:
            raise ValueError("multicnn: train.devices > 1 is not supported (members are trained one after another)")
        set_threads(t)
        t0 = time.perf_counter()
        run = RunFolder(run_dir).create()
        splits = prepare_splits(recipe.data, t.val_fraction, recipe.seed, run, progress=t.progress)
        k = len(splits.class_names)

        members = {}
        for m in recipe.members:
            members[m.key] = self._fit_member(recipe, m, splits, run)
        member_seconds = time.perf_counter() - t0

        # feature fusion: frozen fine-tuned extractors, cached pooled features, dropout + linear
        spec = [{"name": m.key, "backbone": m.backbone, "image_size": members[m.key]["size"]} for m in recipe.members]
        fusion_kwargs = {"members": spec, "num_classes": k, "dropout": recipe.fusion.dropout,
                         "image_size": recipe.data.image_size}
        fused = FeatureFusionClassifier(**fusion_kwargs)
        for i, m in enumerate(recipe.members):
            fused.extractors[i].load_state_dict(members[m.key]["model"].backbone.state_dict())
        fused.eval()
        cache = FeatureCache(Path(recipe.fusion.cache_dir) if recipe.fusion.cache_dir else run.path / "feature_cache")
        t1 = time.perf_counter()
        feats, cache_log = {}, []
        for s in splits.x:
            fp = data_fingerprint(splits.files[s])
            blocks = []
            for i, m in enumerate(recipe.members):
                f, hit = cache.get_or_compute(
                    fused.extractors[i], splits.files[s], recipe.data.image_size,
                    lambda i=i, s=s: extract_features(fused, i, splits.x[s]), prefix=f"{m.key}-{s}", data_fp=fp,
                    member_size=members[m.key]["size"])
                blocks.append(f)
                cache_log.append({"member": m.key, "split": s, "hit": hit, "shape": list(f.shape)})
            feats[s] = torch.cat(blocks, dim=1)  # member order, see fused.feature_slices()
        feature_seconds = time.perf_counter() - t1
        t2 = time.perf_counter()
        head_log = train_fusion_head(fused, feats, splits.y, recipe.fusion, recipe.seed)
        fusion_seconds = time.perf_counter() - t2
        with torch.no_grad():
            fused_probs = F.softmax(fused.forward_head(feats["test"]), dim=1).numpy()
        test = classification_metrics(splits.y["test"], fused_probs, splits.class_names)
        late_probs = late_fusion([members[m.key]["probs"] for m in recipe.members])
        late = classification_metrics(splits.y["test"], late_probs, splits.class_names)
        train_seconds = time.perf_counter() - t0

        run.save_model(self.name, "multicnn_fusion", fusion_kwargs, fused.state_dict(), class_names=splits.class_names,
                       image_size=recipe.data.image_size, normalisation="inside model: input RGB in [0, 1]",
                       feature_order=fused.feature_slices())
        members_out = {m.key: {**members[m.key]["metrics"], "backbone": m.backbone,
                               "weights": members[m.key]["result"]["weights"], "freeze": members[m.key]["freeze"].as_dict(),
                               "train_seconds": round(members[m.key]["seconds"], 1),
                               "epochs_run": members[m.key]["result"]["epochs_run"]} for m in recipe.members}
        members_out["late_fusion"] = late
        comparison = [_row(m.key, "single", members[m.key]["metrics"], train_seconds=round(members[m.key]["seconds"], 1))
                      for m in recipe.members]
        comparison.append(_row("feature_fusion", "fused", test, train_seconds=round(fusion_seconds, 2)))
        comparison.append(_row("late_fusion", "late", late, train_seconds=0.0))
        best_single = max(comparison[: len(recipe.members)], key=lambda r: r["weighted_f1"])
        result = {
            "task": self.name,
            "model": "multicnn_fusion",
            "members_order": [m.key for m in recipe.members],
            "feature_order": [{"member": n, "start": a, "end": b} for n, a, b in fused.feature_slices()],
            "seed": recipe.seed,
            "split": {"seed": recipe.data.split_seed, "test_fraction": recipe.data.test_fraction,
                      **{s: int(len(v)) for s, v in splits.y.items()}},
            "train_seconds": round(train_seconds, 1),
            "member_seconds": round(member_seconds, 1),
            "feature_seconds": round(feature_seconds, 1),
            "fusion_seconds": round(fusion_seconds, 2),
            "feature_cache": {"dir": str(cache.root), "hits": cache.hits, "misses": cache.misses, "entries": cache_log},
            "fusion_training": {"best_epoch": head_log["best_epoch"], "epochs": head_log["epochs"]},
            "best_single": best_single["model"],
            "fusion_beats_best_single": test["weighted_f1"] >= best_single["weighted_f1"],
            "comparison": comparison,
            "test": test,
            "members": members_out,
        }
        run.write_metrics(result)
        self._report(recipe, run, result, splits, members, fused_probs, late_probs, head_log)
        return result

    def _report(self, recipe, run: RunFolder, result: dict, splits, members: dict, fused_probs, late_probs,
                head_log: dict) -> None:
        names = splits.class_names
        rep = Report(f"defectscope multicnn: feature fusion of {', '.join(result['members_order'])} "
                     f"on {Path(recipe.data.root).name}")
        rep.kv("Run", {"data": recipe.data.root,
                       "split": f"stratified {1 - recipe.data.test_fraction:.0%}/{recipe.data.test_fraction:.0%}, seed {recipe.data.split_seed}",
                       "train / val / test images": " / ".join(str(result["split"].get(s, 0)) for s in ("train", "val", "test")),
                       "total seconds": result["train_seconds"], "members seconds": result["member_seconds"],
                       "feature extraction seconds": result["feature_seconds"], "fusion head seconds": result["fusion_seconds"],
                       "feature cache": f"{result['feature_cache']['hits']} hits, {result['feature_cache']['misses']} misses"})
        rep.table("Comparison on the held-out split (paper 003 Tables 2-3 layout)", result["comparison"],
                  ["model", "kind", "accuracy", "weighted_precision", "weighted_recall", "weighted_f1", "macro_auroc",
                   "train_seconds"])
        test = result["test"]
        rows = [{"class": n, **v} for n, v in test["per_class"].items()]
        rows.append({"class": "weighted average", "precision": test["weighted_precision"], "recall": test["weighted_recall"],
                     "f1": test["weighted_f1"], "support": test["n"]})
        rep.table("Per class, feature fusion (paper 003 Table 4 layout)", rows, ["class", "precision", "recall", "f1", "support"])
        rep.table("Fusion order of the concatenated features", result["feature_order"], ["member", "start", "end"])
        rep.table("Members", [{"member": m.key, "backbone": m.backbone, "weights": result["members"][m.key]["weights"],
                               "input px": members[m.key]["size"], "frozen": f"first {members[m.key]['freeze'].n} {m.freeze_unit}",
                               **{k: result["members"][m.key]["freeze"][k] for k in ("frozen_params", "trainable_params")},
                               "epochs run": result["members"][m.key]["epochs_run"]} for m in recipe.members])
        all_probs = {m.key: members[m.key]["probs"] for m in recipe.members}
        all_probs["feature_fusion"], all_probs["late_fusion"] = fused_probs, late_probs
        for key, probs in all_probs.items():
            metrics = result["test"] if key == "feature_fusion" else result["members"][key]
            plot_confusion_matrix(metrics["confusion_matrix"], names, run.plots / f"{key}_confusion_matrix.png",
                                  title=f"{key} (weighted F1 {metrics['weighted_f1']:.4f})")
            rep.image(f"plots/{key}_confusion_matrix.png", f"Confusion matrix, {key} (rows: true class)")
        plot_roc_curves(splits.y["test"], fused_probs, names, run.plots / "feature_fusion_roc_curves.png")
        rep.image("plots/feature_fusion_roc_curves.png", "One-vs-rest ROC curves, feature fusion")
        for m in recipe.members:
            p = plot_training_curves(csv_log_path(run.path / "members" / m.key),
                                     run.plots / f"{m.key}_training_curves.png")
            if p:
                rep.image(f"plots/{m.key}_training_curves.png", f"Fine-tuning curves, {m.key}")
        rep.table("Fusion classifier training (cached features)", head_log["history"],
                  ["epoch", "train_loss", "val_loss", "val_weighted_f1", "best"])
        verdict = ("helps" if result["fusion_beats_best_single"] else "does NOT help")
        rep.text(f"Feature fusion {verdict} here: fused weighted F1 {test['weighted_f1']:.4f} vs best single "
                 f"({result['best_single']}) {result['members'][result['best_single']]['weighted_f1']:.4f}; "
                 f"late fusion {result['members']['late_fusion']['weighted_f1']:.4f}.")
        rep.write(run.report_path)


register_task(MultiCNNTask())
