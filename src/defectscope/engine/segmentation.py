"""Defect segmentation task (paper 004): U-Net, BCE + Dice, per-class masks, run-length csv output.

Recipe (``task: segmentation``)::

    data:  {root: ../shared/datasets/kolektorsdd, height: 320, width: 128, defect_oversample: 3}
    model: {name: unet, encoder: resnet18, pretrained: false}
    train: {epochs: 12, batch_size: 8, lr: 1.0e-3, val_fraction: 0}

Protocol: the manifest's ``train`` split (KolektorSDD: 320 images, 42 defective)
trains the model; its ``val`` split (79 images, 10 defective) is used once, after
training, and reported under ``test``. ``train.val_fraction > 0`` holds out a
stratified share of the train split for checkpoint selection on the validation
loss; the KolektorSDD recipes use 0 (a fixed epoch count, last weights) because
the train split has only 42 defective images. :func:`cross_validate` compares recipes by
stratified k-fold cross-validation on the train split instead (the test split is never read).

Size rule: the U-Net needs sides that are multiples of 32. Images (about
500 x 1250, W x H) are **resized** to ``height x width`` (default 320 x 128, about
a quarter of the original side, chosen for this shared 2-core CPU); masks are
resized by area coverage >= 0.5. Metrics are computed at that resolution;
``predict`` upsamples the probabilities bilinearly to each image's own size before
thresholding and run-length encoding. Training may use ``crop_height`` tall crops
of the resized images (defective images: a crop holding a random defect pixel).
The loss is ``bce_weight * BCE + dice_weight * Dice`` (smp's ``DiceLoss``,
multilabel, from logits); ``train.loss``/``focal_gamma``/``label_smoothing`` do
not apply to this task.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from defectscope.config import BaseRecipe, StrictModel, TrainConfig
from defectscope.data.images import iter_images, resize_uint8
from defectscope.data.masks import MaskedImage, load_masked_stack, read_manifest
from defectscope.data.rle import masks_to_records, write_rle_csv
from defectscope.data.splits import stratified_split, write_file_list
from defectscope.engine.classification import expand_inputs, random_flips, to_float, to_model_input, warmup_cosine
from defectscope.engine.run import RunFolder
from defectscope.engine.tasks import register_task
from defectscope.engine.trainer import build_trainer, report_training_curves, set_threads
from defectscope.evaluation.report import Report
from defectscope.evaluation.segmentation import IMAGE_SCORE_METHODS, image_scores, segmentation_metrics
from defectscope.evaluation.segmentation_plots import plot_image_level_curves, plot_mask_overlays
from defectscope.models import create_model
from defectscope.models.unet import check_input_size
from defectscope.utils.io import atomic_path, write_json


class SegmentationData(StrictModel):
    """Where the images and masks are, the size rule and the sampling of training images.

    Attributes:
        root: KolektorSDD-layout folder (images/, masks/, manifest.csv).
        height, width: network input size (multiples of 32); images are resized to it.
        train_split, test_split: manifest ``split`` values trained on / reported under ``test``.
        defect_oversample: each defective training image appears this many times per epoch.
        good_per_epoch: good (empty-mask) training images drawn per epoch (``None``: all).
        crop_height: train on crops this tall (full width; 0: whole images); multiple of 32.
        max_images: keep at most this many images per split (quick runs and tests), defective first.
    """

    root: str
    height: int = Field(320, ge=32)
    width: int = Field(128, ge=32)
    train_split: str = "train"
    test_split: str = "val"
    defect_oversample: int = Field(3, ge=1)
    good_per_epoch: int | None = Field(None, ge=0)
    crop_height: int = Field(0, ge=0)
    max_images: int | None = Field(None, ge=2)

    @field_validator("height", "width", "crop_height")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32 (U-Net size rule); try {v // 32 * 32 or 32} or {(v // 32 + 1) * 32}")
        return v


class SegmentationModelConfig(StrictModel):
    """U-Net settings (paper 004, section 2).

    Attributes:
        name: registered model (``unet``).
        encoder: ``resnet18`` (random init here) or ``efficientnet_lite0`` (real ImageNet weights).
        pretrained: load the encoder's ImageNet weights (EfficientNet-Lite0 only).
        weights: local encoder state dict (any encoder).
        decoder_channels: the five decoder widths.
        bce_weight, dice_weight: loss = bce_weight * BCE + dice_weight * Dice.
        threshold: probability at or above which a pixel is predicted defective.
        tta: test-time augmentation: average the probabilities of the image and its
            horizontal, vertical and double flips (the flips training uses); 4x inference.
        image_score: how a mask becomes the image-level "defect present" score
            (``max``, ``blur_max``, ``top_mean``; see :func:`defectscope.evaluation.segmentation.image_scores`).
    """

    name: str = "unet"
    encoder: str = "resnet18"
    pretrained: bool = False
    weights: str | None = None
    decoder_channels: list[int] = [128, 64, 32, 16, 16]
    bce_weight: float = Field(1.0, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    threshold: float = Field(0.5, gt=0, lt=1)
    tta: bool = False
    image_score: Literal[IMAGE_SCORE_METHODS] = "max"


class SegmentationRecipe(BaseRecipe):
    """Recipe of the ``segmentation`` task."""

    task: str = "segmentation"
    data: SegmentationData
    model: SegmentationModelConfig = SegmentationModelConfig()
    train: TrainConfig = TrainConfig(epochs=12, batch_size=8, lr=1e-3, val_fraction=0.0, early_stopping_patience=0)


class MaskDataset(Dataset):
    """Images and masks in memory, with optional defect-centred crops.

    Args:
        x: ``uint8 [N, 3, H, W]``; y: ``uint8 [N, K, H, W]``.
        crop_height: crop this many rows (0: whole image).

    Crops: a defective image is cropped around a random defect pixel; a good image at one of
    ``ceil(H / h) + 1`` evenly spaced positions whose crops tile it, the first at the top edge and
    the last at the bottom. Uniform random positions would show the image's top and bottom rows
    almost never (chance ``1 / (H - h + 1)``), and a model trained so marks the dark top/bottom
    borders of good KolektorSDD images as defects at test time.

    Items: ``(image uint8 [3, h, W], mask uint8 [K, h, W])``.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, crop_height: int = 0) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.crop = crop_height if 0 < crop_height < x.shape[2] else 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x, y = self.x[i], self.y[i]
        if self.crop:
            h = x.shape[1]
            rows = torch.nonzero(y.amax(dim=(0, 2))).flatten()
            if len(rows):
                r = int(rows[torch.randint(len(rows), (1,))])
                lo, hi = max(0, r - self.crop + 1), min(r, h - self.crop)
                top = int(torch.randint(lo, hi + 1, (1,)))
            else:  # one of the evenly spaced crops that tile the image, first and last at the edges
                n = -(-h // self.crop) + 1
                top = round(int(torch.randint(n, (1,))) * (h - self.crop) / (n - 1))
            x, y = x[:, top : top + self.crop], y[:, top : top + self.crop]
        return x, y


class DefectOversampler(Sampler[int]):
    """Per epoch: every defective index ``oversample`` times plus ``good_per_epoch`` random good ones, shuffled.

    Args:
        defective: ``[N]`` bool, image has a non-empty mask.
        oversample: repeats of each defective image per epoch.
        good_per_epoch: good images per epoch (``None``: all of them).
        seed: seed of the draw (each epoch draws anew from the same generator).
    """

    def __init__(self, defective: np.ndarray, oversample: int, good_per_epoch: int | None, seed: int) -> None:
        self.pos = np.flatnonzero(defective)
        self.neg = np.flatnonzero(~np.asarray(defective, bool))
        self.oversample = oversample
        self.good = len(self.neg) if good_per_epoch is None else min(good_per_epoch, len(self.neg))
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.pos) * self.oversample + self.good

    def __iter__(self):
        idx = np.concatenate([np.tile(self.pos, self.oversample), self.rng.permutation(self.neg)[: self.good]])
        return iter(self.rng.permutation(idx).tolist())


class BCEDiceLoss(nn.Module):
    """``bce_weight * BCEWithLogits + dice_weight * Dice`` on ``[B, K, H, W]`` logits and 0/1 targets (paper 004, sec. 2)."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight
        self.dice = DiceLoss(mode="multilabel", from_logits=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()
        return (self.bce_weight * F.binary_cross_entropy_with_logits(logits, target)
                + self.dice_weight * self.dice(logits, target))


class SegmentationModule(L.LightningModule):
    """Lightning wrapper: AdamW + warm-up cosine, joint flips of image and mask, BCE + Dice.

    Args:
        model: maps ``[B, 3, H, W]`` in [0, 1] to logits ``[B, K, H, W]``.
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, bce_weight: float = 1.0,
                 dice_weight: float = 1.0, augment: bool = True, channels_last: bool = True) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.loss_fn = BCEDiceLoss(bce_weight, dice_weight)
        self.augment, self.channels_last = augment, channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return to_model_input(x, self.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.augment:
            both = random_flips(torch.cat([x, y], dim=1))
            x, y = both[:, :3], both[:, 3:]
        loss = self.loss_fn(self.model(self._prep(x)), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step} (train.precision="
                f"{self.trainer.precision!r}); bf16 autocast gave NaN in the ResNet18 encoder on this CPU stack: "
                "use train.precision=32")
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", self.loss_fn(self.model(self._prep(x)), y), on_epoch=True, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = warmup_cosine(opt, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def predict_mask_probs(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 8, tta: bool = False) -> np.ndarray:
    """Sigmoid mask probabilities ``float32 [N, K, H, W]`` of ``uint8 [N, 3, H, W]`` images (fp32, eval mode).

    With ``tta`` the probabilities are the mean over the image and its horizontal, vertical and
    double flips, each flipped back (4 forward passes per image).
    """
    model.eval()
    x = torch.as_tensor(x)
    flips = ((), (-1,), (-2,), (-2, -1)) if tta else ((),)
    out = []
    for i in range(0, len(x), batch_size):
        xb = to_float(x[i : i + batch_size])
        total = torch.zeros(())
        for dims in flips:
            prob = torch.sigmoid(model(xb.flip(dims) if dims else xb).float())
            total = total + (prob.flip(dims) if dims else prob)
        out.append(total / len(flips))
    return torch.cat(out).numpy() if out else np.zeros((0, 1, *x.shape[2:]), dtype=np.float32)


def select_items(items: list[MaskedImage], split: str, limit: int | None, source: str) -> list[MaskedImage]:
    """The manifest rows of ``split``; with ``limit``, at most that many (half defective where possible).

    Raises:
        ValueError: no row has that split.
    """
    chosen = [it for it in items if it.split == split]
    if not chosen:
        raise ValueError(f"{source}: no manifest rows with split '{split}' (found {sorted({i.split for i in items})})")
    if limit:
        pos = [it for it in chosen if it.defective][: max(1, limit // 2)]
        neg = [it for it in chosen if not it.defective][: limit - len(pos)]
        chosen = sorted(pos + neg, key=lambda it: it.id)
    return chosen


def load_segmenter(run_dir: Path) -> tuple[nn.Module, dict]:
    """Rebuild a trained U-Net from ``RUN/model.ckpt``; returns ``(model in eval mode, payload)``."""
    payload = RunFolder(run_dir).load_model_payload()
    model = create_model(payload["model_name"], **payload["model_kwargs"])
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


def write_segmentation_report(run: RunFolder, title: str, metrics: dict, x: np.ndarray, y: np.ndarray, probs: np.ndarray,
                              ids: list[str], info: dict, threshold: float, prefix: str = "") -> None:
    """Report: run facts, metrics, image-level ROC/PR, overlays on defective and good images, training curves."""
    rep = Report(title)
    rep.kv("Run", info)
    rep.kv("Held-out metrics", {k: metrics[k] for k in ("n", "n_defective", "dice", "iou", "dice_defective", "iou_defective",
                                                        "pixel_auroc", "image_ap", "image_auroc", "threshold", "image_score")})
    defective = y.reshape(len(y), -1).any(axis=1)
    scores = np.asarray(metrics["image_scores"])
    dice = np.asarray(metrics["per_image_dice"])
    if plot_image_level_curves(defective, scores, run.plots / f"{prefix}image_level_curves.png"):
        rep.image(f"plots/{prefix}image_level_curves.png", "Image level: ROC and precision-recall of 'defect present'")
    pos = np.flatnonzero(defective)[:10]
    neg_all = np.flatnonzero(~defective)
    hardest = neg_all[np.argsort(-scores[neg_all])][:3]
    rest = np.setdiff1d(neg_all, hardest)
    neg = np.concatenate([hardest, np.random.default_rng(0).permutation(rest)[:3]]).astype(int)
    for name, idx, caption in (("defective", pos, "Defective held-out images"),
                               ("good", neg, "Good held-out images (3 with the highest scores, 3 at random)")):
        if len(idx):
            titles = [f"{ids[i]} s={scores[i]:.2f} d={dice[i]:.2f}" for i in idx]
            plot_mask_overlays(x[idx], y[idx, 0], probs[idx, 0], titles, run.plots / f"{prefix}overlays_{name}.png", threshold)
            rep.image(f"plots/{prefix}overlays_{name}.png",
                      f"{caption}: predicted mask red, true mask green outline; s = image score, d = Dice")
    if not prefix:
        report_training_curves(rep, run, "Training loss per epoch")
    rep.write(run.report_path)


class SegmentationTask:
    """The ``segmentation`` task (registered as such)."""

    name = "segmentation"
    recipe = SegmentationRecipe

    def fit(self, recipe: SegmentationRecipe, run_dir: Path, source: Path | None = None) -> dict | None:
        d = recipe.data
        check_input_size(d.height, d.width)
        items = read_manifest(d.root)
        parts = {"train": select_items(items, d.train_split, d.max_images, d.root),
                 "test": select_items(items, d.test_split, d.max_images, d.root)}
        split = {"source": "manifest.csv", "train_split": d.train_split, "test_split": d.test_split}
        return self.fit_parts(recipe, run_dir, parts, split)

    def fit_parts(self, recipe: SegmentationRecipe, run_dir: Path, parts: dict[str, list[MaskedImage]],
                  split: dict) -> dict | None:
        """Train on ``parts["train"]``, evaluate ``parts["test"]`` and write the run folder.

        ``train.val_fraction > 0`` first moves a stratified share of ``parts["train"]`` to a
        validation part (checkpoint selection). ``split`` describes where the parts came from
        (written to ``metrics.json``). Returns the metrics dict (``None`` on non-zero DDP ranks).
        """
        t, d, m = recipe.train, recipe.data, recipe.model
        set_threads(t)
        L.seed_everything(recipe.seed, workers=True, verbose=False)
        run = RunFolder(run_dir).create()
        size = (d.height, d.width)
        check_input_size(*size)
        parts = dict(parts)
        if t.val_fraction > 0:
            tr = parts["train"]
            a, b = stratified_split([int(it.defective) for it in tr], t.val_fraction, recipe.seed)
            parts["train"], parts["val"] = [tr[i] for i in a], [tr[i] for i in b]
        for k, v in parts.items():
            write_file_list(run.split_dir / f"{k}.txt", [it.image for it in v], ["defective" if it.defective else "good" for it in v])
        data = {k: load_masked_stack(v, size, progress=t.progress) for k, v in parts.items()}
        kwargs = {"encoder": m.encoder, "num_classes": 1, "decoder_channels": list(m.decoder_channels)}
        model = create_model(m.name, **kwargs, pretrained=m.pretrained, weights=m.weights)
        weights_source = model.weights_source
        module = SegmentationModule(model, t.lr, t.weight_decay, m.bce_weight, m.dice_weight, t.augment, t.channels_last)
        xtr, ytr = data["train"]
        defective_tr = ytr.reshape(len(ytr), -1).any(axis=1)
        sampler = DefectOversampler(defective_tr, d.defect_oversample, d.good_per_epoch, recipe.seed)
        train_loader = DataLoader(MaskDataset(xtr, ytr, d.crop_height), batch_size=t.batch_size, sampler=sampler,
                                  num_workers=0, drop_last=len(sampler) > t.batch_size)
        has_val = "val" in data
        val_loader = DataLoader(MaskDataset(*data["val"]), batch_size=t.batch_size) if has_val else None
        trainer = build_trainer(t, run.path, "val/loss" if has_val else None, mode="min")
        start = time.perf_counter()
        trainer.fit(module, train_loader, val_loader)
        train_seconds = time.perf_counter() - start
        if not trainer.is_global_zero:
            return None
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if has_val else ""
        if best:
            module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
        model = module.model.to(memory_format=torch.contiguous_format).float().eval()
        xte, yte = data["test"]
        t0 = time.perf_counter()
        probs = predict_mask_probs(model, xte, tta=m.tta)
        infer_seconds = time.perf_counter() - t0
        metrics = segmentation_metrics(probs, yte, m.threshold, seed=recipe.seed, score_method=m.image_score)
        ids = [it.id for it in parts["test"]]
        run.save_model(self.name, m.name, kwargs, model.state_dict(), class_names=["defect"], input_size=list(size),
                       threshold=m.threshold, tta=m.tta, image_score=m.image_score,
                       normalisation="inside model: input RGB in [0, 1]", weights_source=weights_source)
        test = {k: v for k, v in metrics.items() if k not in ("image_scores", "per_image_dice")}
        result = {
            "task": self.name,
            "model": m.name,
            "encoder": m.encoder,
            "weights": weights_source,
            "seed": recipe.seed,
            "split": {**split, **{k: len(v) for k, v in parts.items()},
                      **{f"{k}_defective": int(sum(it.defective for it in v)) for k, v in parts.items()}},
            "input_size": {"height": d.height, "width": d.width, "rule": "resized (images bilinear, masks area >= 0.5)"},
            "metric_resolution": f"{d.height}x{d.width}",
            "epochs_run": int(trainer.current_epoch),
            "best_checkpoint": Path(best).name if best else "last",
            "train_seconds": round(train_seconds, 1),
            "test_inference_seconds": round(infer_seconds, 2),
            "precision": t.precision,
            "test": test,
            "per_image": {"id": ids, "score": metrics["image_scores"], "dice": metrics["per_image_dice"]},
        }
        run.write_metrics(result)
        info = {"data": d.root, "encoder": m.encoder, "weights": weights_source,
                "input (H x W)": f"{d.height} x {d.width} (resized)", "split": ", ".join(f"{k} {v}" for k, v in split.items()),
                "train / val / test images": f"{len(parts['train'])} / {len(parts.get('val', []))} / {len(parts['test'])}",
                "defect oversampling": d.defect_oversample, "epochs run": trainer.current_epoch,
                "test-time flips": m.tta, "image score": m.image_score,
                "train seconds": round(train_seconds, 1), "precision": t.precision}
        write_segmentation_report(run, f"defectscope {self.name}: U-Net {m.encoder} on {Path(d.root).name}", metrics,
                                  xte, yte, probs, ids, info, m.threshold)
        return result

    def evaluate(self, run_dir: Path, data: Path, out: Path | None = None) -> dict:
        """Evaluate a trained run on every image of a KolektorSDD-layout folder; writes ``out`` (default ``RUN/evaluations/<name>``)."""
        model, payload = load_segmenter(run_dir)
        items = read_manifest(data)
        x, y = load_masked_stack(items, tuple(payload["input_size"]))
        probs = predict_mask_probs(model, x, tta=payload.get("tta", False))
        metrics = segmentation_metrics(probs, y, payload["threshold"], score_method=payload.get("image_score", "max"))
        out = Path(out) if out else Path(run_dir) / "evaluations" / Path(data).name
        ev = RunFolder(out).create()
        test = {k: v for k, v in metrics.items() if k not in ("image_scores", "per_image_dice")}
        ev.write_metrics({"task": self.name, "run": str(run_dir), "data": str(data), "test": test})
        write_segmentation_report(ev, f"defectscope evaluate: {Path(run_dir).name} on {Path(data).name}", metrics, x, y, probs,
                                  [it.id for it in items], {"run": str(run_dir), "data": str(data), "images": len(items)},
                                  payload["threshold"])
        return test

    def predict(self, run_dir: Path, inputs: list[Path], out: Path, save_images: bool = False, **options) -> dict:
        """Segment image files; write the run-length csv ``out`` (``ImageId,ClassId,EncodedPixels``).

        Masks are predicted at the model's input size, upsampled bilinearly to each
        image's own size and thresholded; every (image, class) gets a row (empty
        ``EncodedPixels`` for no defect). ``save_images`` also writes 0/255 PNG masks
        to ``<out stem>_masks/<image stem>.png`` (``_class<k>`` suffix when K > 1).

        Raises:
            ValueError: two inputs share a file name (``ImageId`` must be unique).
        """
        model, payload = load_segmenter(run_dir)
        h, w = payload["input_size"]
        thr = payload["threshold"]
        tta, score_method = payload.get("tta", False), payload.get("image_score", "max")
        files = expand_inputs(inputs)
        names = [f.name for f in files]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"input file names must be unique (they become ImageId); repeated: {dup[:5]}")
        out = Path(out)
        mask_dir = out.parent / f"{out.stem}_masks"
        records, skipped, scores = [], [], {}
        for f, img, err in iter_images(files):
            if err:
                skipped.append((f, err))
                continue
            x = resize_uint8(img, (h, w)).transpose(2, 0, 1)[None]
            probs = predict_mask_probs(model, x, tta=tta)
            scores[f.name] = float(image_scores(probs, score_method)[0])
            p = F.interpolate(torch.from_numpy(probs), size=img.shape[:2], mode="bilinear", align_corners=False)
            p = p[0].numpy()
            masks = (p >= thr).astype(np.uint8)
            records += masks_to_records(f.name, masks, include_empty=True)
            if save_images:
                from PIL import Image

                for k in range(masks.shape[0]):
                    name = f"{f.stem}.png" if masks.shape[0] == 1 else f"{f.stem}_class{k + 1}.png"
                    with atomic_path(mask_dir / name) as tmp:
                        Image.fromarray(masks[k] * 255).save(tmp, format="PNG")
        write_rle_csv(out, records)
        return {"predicted": len(files) - len(skipped), "skipped": skipped, "out": str(out), "scores": scores,
                "mask_dir": str(mask_dir) if save_images else None}


def cv_folds(labels: np.ndarray, folds: int, group_size: int = 0, seed: int = 0) -> np.ndarray:
    """Fold index ``[N]`` (0 .. folds-1) of each image for stratified k-fold cross-validation.

    Args:
        labels: ``[N]`` bool, image is defective (the stratification label).
        folds: number of folds.
        group_size: if > 0, blocks of this many consecutive images share a fold
            (scikit-learn ``StratifiedGroupKFold``); 0: ``StratifiedKFold`` image by image.
        seed: shuffling seed.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels, bool)
    idx = np.arange(len(labels))
    groups = idx // group_size if group_size > 0 else idx
    splitter = (StratifiedGroupKFold if group_size > 0 else StratifiedKFold)(folds, shuffle=True, random_state=seed)
    out = np.empty(len(labels), dtype=int)
    for k, (_, te) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        out[te] = k
    return out


def cross_validate(recipe: SegmentationRecipe, out_dir: Path, folds: int = 5, group_size: int = 0) -> dict:
    """Stratified k-fold cross-validation on the recipe's train split, for choosing a recipe.

    The test split is never read. Fold ``k`` trains the recipe on the other folds of the train
    split (run folder ``out_dir/fold<k>``) and predicts its own images with and without
    test-time flips. The out-of-fold probabilities of all train images are pooled and scored
    with every image-score method (:data:`IMAGE_SCORE_METHODS`), so a choice rests on every
    defective train image (KolektorSDD: 42) rather than on a few.

    Args:
        recipe: a segmentation recipe (``data.max_images`` limits the train split as in ``fit``).
        out_dir: folder for the fold runs and ``crossval.json``.
        folds: number of folds (2 or more, at most the number of defective train images).
        group_size: if > 0, images are grouped in blocks of this many consecutive manifest rows
            and a block never spans two folds (``StratifiedGroupKFold``). Images of one part taken
            in a row (KolektorSDD: 8 views per commutator) then stay together, as the source's own
            val split (a contiguous block of ids) keeps them; 0: images are split one by one.

    Returns:
        ``{"folds", "n", "n_defective", "rows", "per_image"}``: ``rows`` holds, per (tta,
        image_score), pooled ``image_ap``, ``image_auroc``, ``dice_defective``, ``pixel_auroc``;
        ``per_image`` the ids, labels and fold of every image and its scores per row.

    Raises:
        ValueError: fewer than 2 folds, or fewer defective or good train images than folds.
    """
    d = recipe.data
    items = select_items(read_manifest(d.root), d.train_split, d.max_images, d.root)
    labels = np.array([it.defective for it in items])
    if folds < 2 or min(labels.sum(), (~labels).sum()) < folds:
        raise ValueError(f"{d.root}: {folds}-fold cross-validation needs folds >= 2 and at least {folds} defective and "
                         f"{folds} good images in split '{d.train_split}'; it has {labels.sum()} and {(~labels).sum()}")
    out_dir = Path(out_dir)
    task = SegmentationTask()
    probs: dict[bool, list] = {False: [], True: []}
    order, truth = [], []
    assigned = cv_folds(labels, folds, group_size, recipe.seed)
    for k in range(folds):
        tr, te = np.flatnonzero(assigned != k), np.flatnonzero(assigned == k)
        parts = {"train": [items[i] for i in tr], "test": [items[i] for i in te]}
        split = {"source": f"{d.train_split} split, fold {k + 1} of {folds}", "cv_seed": recipe.seed}
        RunFolder(out_dir / f"fold{k + 1}").create().write_config(recipe.model_dump(mode="json"))
        task.fit_parts(recipe, out_dir / f"fold{k + 1}", parts, split)
        model, _ = load_segmenter(out_dir / f"fold{k + 1}")
        x, y = load_masked_stack(parts["test"], (d.height, d.width))
        for tta in (False, True):
            probs[tta].append(predict_mask_probs(model, x, tta=tta))
        order += list(te)
        truth.append(y)
    y = np.concatenate(truth)
    rows, per_image = [], {"id": [items[i].id for i in order], "defective": [bool(labels[i]) for i in order],
                           "fold": [int(assigned[i]) + 1 for i in order]}
    for tta in (False, True):
        pooled = np.concatenate(probs[tta])
        for method in IMAGE_SCORE_METHODS:
            met = segmentation_metrics(pooled, y, recipe.model.threshold, seed=recipe.seed, score_method=method)
            rows.append({"tta": tta, "image_score": method,
                         **{k: met[k] for k in ("image_ap", "image_auroc", "dice_defective", "pixel_auroc")}})
            per_image[f"{method}{'+tta' if tta else ''}"] = met["image_scores"]
    result = {"folds": folds, "group_size": group_size, "n": len(items), "n_defective": int(labels.sum()),
              "rows": rows, "per_image": per_image}
    write_json(out_dir / "crossval.json", result)
    rep = Report(f"defectscope cross-validation: {recipe.model.encoder} U-Net, {d.height} x {d.width}, {folds} folds")
    rep.kv("Data", {"root": d.root, "split": d.train_split, "images": len(items), "defective": int(labels.sum()),
                    "seed": recipe.seed, "folds": f"fold1 ... fold{folds} (run folders)",
                    "groups": f"blocks of {group_size} consecutive images" if group_size else "none (image by image)"})
    rep.table("Out-of-fold figures, pooled over folds", rows)
    plots = RunFolder(out_dir).create().plots
    key = f"{recipe.model.image_score}{'+tta' if recipe.model.tta else ''}"
    if plot_image_level_curves(labels[order], np.asarray(per_image[key]), plots / "oof_image_level_curves.png"):
        rep.image("plots/oof_image_level_curves.png", f"Out-of-fold image level ROC and precision-recall ({key}, the recipe's rule)")
    rep.write(out_dir / "report.html")
    return result


register_task(SegmentationTask())
