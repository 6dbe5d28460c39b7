"""Image classification task: NEU-style or class-per-folder data, any registered classifier.

Recipe (``task: classification``)::

    data:  {root: ../shared/datasets/neu-det, image_size: 200, test_fraction: 0.2, split_seed: 0}
    model: {name: multiscale, backbone: efficientnet_lite0, pretrained: true, low_res: 128}
    train: {epochs: 6, batch_size: 16, lr: 5.0e-4, loss: focal}

Protocol: a stratified ``test_fraction`` split (seed ``split_seed``) is held out
and used once, after training. ``train.val_fraction`` of the rest is the
validation set for early stopping and checkpoint selection.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from defectscope.config import BaseRecipe, StrictModel
from defectscope.data.images import (
    IMAGE_SUFFIXES,
    discover_labelled_images,
    iter_images,
    load_stack,
    resize_uint8,
)
from defectscope.data.splits import stratified_split, write_file_list
from defectscope.engine.run import RunFolder
from defectscope.engine.tasks import register_task
from defectscope.engine.trainer import build_trainer, report_training_curves, set_threads
from defectscope.evaluation.classification import classification_metrics
from defectscope.evaluation.plots import plot_confusion_matrix, plot_roc_curves
from defectscope.evaluation.report import Report
from defectscope.models import create_model
from defectscope.models.layers.losses import FocalLoss
from defectscope.utils.io import write_text


class ClassificationData(StrictModel):
    """Where the images are and how they are split.

    Attributes:
        root: data folder (NEU prefix layout or class-per-folder).
        layout: ``auto``, ``prefix`` or ``folder``.
        image_size: side in pixels the images are resized to (square).
        test_fraction: held-out share per class.
        split_seed: seed of the stratified split.
        max_per_class: keep at most this many images per class (small subsets for
            quick runs and tests); chosen with ``split_seed``.
    """

    root: str
    layout: Literal["auto", "prefix", "folder"] = "auto"
    image_size: int = Field(200, ge=16)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    max_per_class: int | None = Field(None, ge=2)


class ClassificationModelConfig(StrictModel):
    """Model choice: ``multiscale`` (paper 000 section 5.7) or ``classifier`` (plain baseline).

    Attributes:
        name: registered model name.
        backbone: registry backbone name.
        pretrained: load real ImageNet weights (only EfficientNet-Lite has them here).
        weights: a local state-dict file for the backbone (any backbone).
        low_res: key/value resolution of the multiscale model.
        embed_dim, num_heads, num_layers, dropout: attention settings.
    """

    name: Literal["multiscale", "classifier"] = "multiscale"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None
    low_res: int = Field(128, ge=16)
    embed_dim: int = Field(256, ge=8)
    num_heads: int = Field(8, ge=1)
    num_layers: int = Field(1, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)


class ClassificationRecipe(BaseRecipe):
    """Recipe of the ``classification`` task."""

    task: Literal["classification"] = "classification"
    data: ClassificationData
    model: ClassificationModelConfig = ClassificationModelConfig()


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


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float in [0, 1]."""
    return x.float().div_(255.0)


def to_model_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float in [0, 1], in channels_last memory layout when asked."""
    x = to_float(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def random_flips(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent random horizontal and vertical flips per image of ``[B, C, H, W]``."""
    b = x.shape[0]
    h = torch.rand(b, generator=generator) < 0.5
    v = torch.rand(b, generator=generator) < 0.5
    x = torch.where(h.view(b, 1, 1, 1), x.flip(-1), x)
    return torch.where(v.view(b, 1, 1, 1), x.flip(-2), x)


def build_loss(kind: str, gamma: float, label_smoothing: float = 0.0) -> nn.Module:
    """``focal`` (paper 000 eq. 14) or ``ce``."""
    return FocalLoss(gamma) if kind == "focal" else nn.CrossEntropyLoss(label_smoothing=label_smoothing)


class ImageClassifierModule(L.LightningModule):
    """Lightning wrapper: AdamW + cosine schedule, flips, focal or CE loss, weighted-F1 validation.

    Args:
        model: any ``nn.Module`` mapping ``[B, 3, H, W]`` in [0, 1] to logits ``[B, K]``.
        num_classes: ``K``.
        lr, weight_decay: AdamW settings.
        loss: ``focal`` or ``ce``; ``focal_gamma`` its focusing parameter.
        augment: random flips on training batches.
        channels_last: NHWC layout for inputs and convolution weights.
    """

    def __init__(self, model: nn.Module, num_classes: int, lr: float, weight_decay: float, loss: str = "focal",
                 focal_gamma: float = 2.0, label_smoothing: float = 0.0, augment: bool = True,
                 channels_last: bool = True) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.loss_fn = build_loss(loss, focal_gamma, label_smoothing)
        self.augment = augment
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.val_f1 = MulticlassF1Score(num_classes, average="weighted")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return to_model_input(x, self.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = self._prep(x)
        if self.augment:
            x = random_flips(x)
        loss = self.loss_fn(self.model(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(self._prep(x))
        self.log("val/loss", self.loss_fn(logits, y), on_epoch=True, prog_bar=False, sync_dist=True)
        self.val_f1.update(logits.float(), y)
        self.val_acc.update(logits.float(), y)

    def on_validation_epoch_end(self):
        self.log("val/weighted_f1", self.val_f1.compute(), prog_bar=True, sync_dist=False)
        self.log("val/accuracy", self.val_acc.compute(), sync_dist=False)
        self.val_f1.reset()
        self.val_acc.reset()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = warmup_cosine(opt, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def warmup_cosine(opt: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.05):
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to 0 (per step)."""
    import math

    total = max(1, total_steps)
    warm = max(1, int(warmup_fraction * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def predict_probs(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Softmax probabilities ``[N, K]`` of uint8 images ``[N, 3, H, W]`` (fp32, eval mode)."""
    model.eval()
    x = torch.as_tensor(x)
    out = [F.softmax(model(to_float(x[i : i + batch_size])).float(), dim=1) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def model_kwargs_from(recipe: ClassificationRecipe, num_classes: int) -> dict:
    """Arguments for :func:`create_model` that rebuild the architecture without loading weights."""
    m = recipe.model
    return {"backbone": m.backbone, "num_classes": num_classes, "image_size": recipe.data.image_size,
            "low_res": m.low_res, "embed_dim": m.embed_dim, "num_heads": m.num_heads,
            "num_layers": m.num_layers, "dropout": m.dropout}


def load_classifier(run_dir: Path) -> tuple[nn.Module, dict]:
    """Rebuild a trained classifier from ``RUN/model.ckpt``; returns ``(model in eval mode, payload)``."""
    payload = RunFolder(run_dir).load_model_payload()
    model = create_model(payload["model_name"], **payload["model_kwargs"])
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


def write_classification_report(run: RunFolder, title: str, metrics: dict, y_true: np.ndarray, probs: np.ndarray,
                                class_names: list[str], info: dict, prefix: str = "", baseline_note: str | None = None) -> None:
    """Report with the metrics table, per-class table, confusion matrix, ROC and training curves."""
    rep = Report(title)
    rep.kv("Run", info)
    rep.kv("Test metrics", {k: metrics[k] for k in ("n", "accuracy", "weighted_precision", "weighted_recall",
                                                      "weighted_f1", "macro_f1", "macro_auroc")})
    rep.table("Per class", [{"class": n, **v} for n, v in metrics["per_class"].items()],
              ["class", "precision", "recall", "f1", "auroc", "support"])
    plot_confusion_matrix(metrics["confusion_matrix"], class_names, run.plots / f"{prefix}confusion_matrix.png")
    rep.image(f"plots/{prefix}confusion_matrix.png", "Confusion matrix on the held-out split (rows: true class)")
    plot_roc_curves(y_true, probs, class_names, run.plots / f"{prefix}roc_curves.png")
    rep.image(f"plots/{prefix}roc_curves.png", "One-vs-rest ROC curves on the held-out split")
    report_training_curves(rep, run, "Training loss and validation scores per epoch")
    if baseline_note:
        rep.text(baseline_note)
    rep.write(run.report_path)


class ClassificationTask:
    """The ``classification`` task (registered as such)."""

    name = "classification"
    recipe = ClassificationRecipe

    def fit(self, recipe: ClassificationRecipe, run_dir: Path, source: Path | None = None) -> dict | None:
        t = recipe.train
        set_threads(t)
        L.seed_everything(recipe.seed, workers=True, verbose=False)
        run = RunFolder(run_dir).create()
        splits = prepare_splits(recipe.data, t.val_fraction, recipe.seed, run, progress=t.progress)
        k = len(splits.class_names)
        kwargs = model_kwargs_from(recipe, k)
        model = create_model(recipe.model.name, **kwargs, pretrained=recipe.model.pretrained, weights=recipe.model.weights)
        weights_source = model.backbone.weights_source
        module = ImageClassifierModule(model, k, t.lr, t.weight_decay, t.loss, t.focal_gamma, t.label_smoothing,
                                       t.augment, t.channels_last)
        loader = lambda s, shuffle: DataLoader(  # noqa: E731
            TensorDataset(torch.from_numpy(splits.x[s]), torch.from_numpy(splits.y[s]).long()),
            batch_size=t.batch_size, shuffle=shuffle, num_workers=0, drop_last=shuffle and len(splits.y[s]) > t.batch_size)
        has_val = "val" in splits.x
        trainer = build_trainer(t, run.path, "val/weighted_f1" if has_val else None)
        start = time.perf_counter()
        trainer.fit(module, loader("train", True), loader("val", False) if has_val else None)
        train_seconds = time.perf_counter() - start
        if not trainer.is_global_zero:
            return None
        ckpt_cb = trainer.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") if has_val else ""
        if best:
            state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
            module.load_state_dict(state)
        model = module.model.to(memory_format=torch.contiguous_format).float()
        model.eval()
        probs = predict_probs(model, splits.x["test"])
        metrics = classification_metrics(splits.y["test"], probs, splits.class_names)
        run.save_model(self.name, recipe.model.name, kwargs, model.state_dict(), class_names=splits.class_names,
                       image_size=recipe.data.image_size, normalisation="inside model: input RGB in [0, 1]",
                       weights_source=weights_source)
        result = {
            "task": self.name,
            "model": recipe.model.name,
            "backbone": recipe.model.backbone,
            "weights": weights_source,
            "seed": recipe.seed,
            "split": {"seed": recipe.data.split_seed, "test_fraction": recipe.data.test_fraction,
                      **{k2: int(len(v)) for k2, v in splits.y.items()}},
            "epochs_run": int(trainer.current_epoch),
            "best_checkpoint": Path(best).name if best else "last",
            "train_seconds": round(train_seconds, 1),
            "precision": t.precision,
            "channels_last": t.channels_last,
            "test": metrics,
        }
        run.write_metrics(result)
        info = {"data": recipe.data.root, "model": recipe.model.name, "backbone": recipe.model.backbone,
                "weights": weights_source, "split": f"stratified {1 - recipe.data.test_fraction:.0%}/{recipe.data.test_fraction:.0%}, seed {recipe.data.split_seed}",
                "train / val / test images": f"{len(splits.y['train'])} / {len(splits.y.get('val', []))} / {len(splits.y['test'])}",
                "epochs run": trainer.current_epoch, "train seconds": round(train_seconds, 1),
                "precision": t.precision}
        write_classification_report(run, f"defectscope {self.name}: {recipe.model.name} on {Path(recipe.data.root).name}",
                                    metrics, splits.y["test"], probs, splits.class_names, info)
        return result

    def evaluate(self, run_dir: Path, data: Path, out: Path | None = None) -> dict:
        """Evaluate a trained run on all labelled images in ``data``; writes ``out`` (default ``RUN/evaluations/<name>``)."""
        model, payload = load_classifier(run_dir)
        items, class_names, layout = discover_labelled_images(data, "auto", payload["class_names"])
        x = load_stack([it.path for it in items], payload["image_size"])
        y = np.array([it.label for it in items])
        probs = predict_probs(model, x)
        metrics = classification_metrics(y, probs, class_names)
        out = Path(out) if out else Path(run_dir) / "evaluations" / Path(data).name
        ev = RunFolder(out).create()
        ev.write_metrics({"task": self.name, "run": str(run_dir), "data": str(data), "layout": layout, "test": metrics})
        write_classification_report(ev, f"defectscope evaluate: {Path(run_dir).name} on {Path(data).name}", metrics, y, probs,
                                    class_names, {"run": str(run_dir), "data": str(data), "images": len(y)})
        return metrics

    def predict(self, run_dir: Path, inputs: list[Path], out: Path, **options) -> dict:
        """Classify image files (folders are expanded); unreadable files are skipped and reported.

        Writes ``out`` as CSV: ``file, class, prob_<name>..., error`` (one row per file;
        skipped files have an empty class and the error message).
        """
        model, payload = load_classifier(run_dir)
        names, size = payload["class_names"], payload["image_size"]
        files = expand_inputs(inputs)
        ok_files, arrays, skipped = [], [], []
        for f, img, err in iter_images(files):
            if err:
                skipped.append((f, err))
                continue
            arrays.append(resize_uint8(img, size).transpose(2, 0, 1))
            ok_files.append(f)
        probs = predict_probs(model, np.stack(arrays)) if arrays else np.zeros((0, len(names)))
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "class", *[f"prob_{n}" for n in names], "error"])
        for f, p in zip(ok_files, probs):
            w.writerow([str(f), names[int(p.argmax())], *[f"{v:.6f}" for v in p], ""])
        for f, err in skipped:
            w.writerow([str(f), "", *[""] * len(names), err])
        write_text(out, buf.getvalue())
        return {"predicted": len(ok_files), "skipped": skipped, "out": str(out)}


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted, recursive).

    Raises:
        FileNotFoundError: an input path does not exist.
    """
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


register_task(ClassificationTask())
