"""Defect segmentation task (paper 004): U-Net, BCE + Dice, per-class masks, run-length csv output.

Recipe (``task: segmentation``)::

    data:  {root: ../shared/datasets/kolektorsdd, height: 320, width: 128, defect_oversample: 3}
    model: {name: unet, encoder: resnet18, pretrained: false}
    train: {epochs: 12, batch_size: 8, lr: 1.0e-3, val_fraction: 0}

The task plugs into the shared pipeline (:mod:`defectscope.engine.pipeline`); its model's
Lightning wrapper is :class:`defectscope.models.unet.lightning_model.SegmentationModule`.

Protocol: the samples are the manifest's rows of ``data.train_split`` and ``data.test_split``
(``labels``: defective 0/1, class names ``good`` / ``defective``). The test split's rows
(KolektorSDD ``val``: 79 images, 10 defective) are the data's own test set: a single-split run
trains on the train split (KolektorSDD: 320 images, 42 defective) and uses the test split once,
after training (reported under ``test``); ``--folds K`` cross-validates on the train split only
and never decodes a test-split image. A manifest without a ``split`` column (or without rows of
``test_split``) is split by the pipeline: a stratified ``data.test_fraction`` (seed
``data.split_seed``) is held out, and ``--folds K`` folds every image.
``train.val_fraction > 0`` holds out a stratified share of the training part for checkpoint
selection and early stopping on the validation loss ``val/loss`` (min); the KolektorSDD recipes use
0 (a fixed epoch count, last weights) because the train split has only 42 defective images.

``--group-by`` accepts a manifest column (KolektorSDD: ``n_polygons``, ``mask_pixels``,
``width``, ``height``; also ``id`` and ``split``) or ``block8``: blocks of 8 consecutive
manifest rows of a split share a fold (KolektorSDD holds 8 views of each part in a row; images
of one part split across folds make out-of-fold figures optimistic).

Size rule: the U-Net needs sides that are multiples of 32. Images (about
500 x 1250, W x H) are **resized** to ``height x width`` (default 320 x 128, about
a quarter of the original side, chosen for this shared 2-core CPU); masks are
resized by area coverage >= 0.5. Metrics are computed at that resolution;
``predict`` upsamples the probabilities bilinearly to each image's own size before
thresholding and run-length encoding. Training may use ``crop_height`` tall crops
of the resized images (defective images: a crop holding a random defect pixel).
The loss is ``bce_weight * BCE + dice_weight * Dice`` (smp's ``DiceLoss``,
multilabel, from logits); ``train.loss``/``focal_gamma``/``label_smoothing`` are not
settings of this task (validation rejects them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import DataLoader

from defectscope.config import BaseRecipe, StrictModel, TrainConfig
from defectscope.data.images import DatasetError, expand_inputs, iter_images, resize_uint8
from defectscope.data.masks import MaskedImage, MaskStack, load_masked_stack, read_manifest
from defectscope.data.rle import masks_to_records, write_rle_csv
from defectscope.engine.pipeline import Fitted, Predictions, Samples, TaskHooks, crossval_table, report_sections
from defectscope.engine.run import RunFolder
from defectscope.engine.tasks import register_task
from defectscope.engine.trainer import fit_lightning, report_training_curves, resolved_precision
from defectscope.evaluation.report import Report
from defectscope.evaluation.segmentation import IMAGE_SCORE_METHODS, dice_per_image, image_scores, segmentation_metrics
from defectscope.evaluation.segmentation_plots import plot_image_level_curves, plot_mask_overlays
from defectscope.models import create_model
from defectscope.models.training import to_float
from defectscope.models.unet import check_input_size
from defectscope.models.unet.lightning_model import DefectOversampler, MaskDataset, SegmentationModule
from defectscope.utils.io import atomic_path

#: Rows per block of the computed ``--group-by`` column ``block8`` (KolektorSDD: 8 views per part).
BLOCK_ROWS = 8
#: Class names of the image-level label (index = ``Samples.labels`` value).
CLASS_NAMES = ["good", "defective"]


class SegmentationData(StrictModel):
    """Where the images and masks are, how they are split, the size rule and the sampling of training images.

    Attributes:
        root: KolektorSDD-layout folder (images/, masks/, manifest.csv with id,[split,]defective).
        height, width: network input size (multiples of 32); images are resized to it.
        train_split, test_split: manifest ``split`` values trained on / reported under ``test``
            (the test split is the data's own test set: cross-validation leaves it out).
        test_fraction, split_seed: the stratified held-out share and its seed, used only when the
            manifest has no ``split`` column or no rows of ``test_split``.
        defect_oversample: each defective training image appears this many times per epoch.
        good_per_epoch: good (empty-mask) training images drawn per epoch (``None``: all).
        crop_height: train on crops this tall (full width; 0: whole images); multiple of 32.
        max_images: keep at most this many images per split (quick runs and tests), half defective
            where possible.
    """

    root: str
    height: int = Field(320, ge=32)
    width: int = Field(128, ge=32)
    train_split: str = "train"
    test_split: str = "val"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
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
        threshold: probability at or above which a pixel is predicted defective; an image is
            predicted defective when its image score reaches it.
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
    """Recipe of the ``segmentation`` task.

    With ``train.val_fraction > 0`` checkpoints are selected, and training stopped early
    (``train.early_stopping_patience``), on the validation loss ``val/loss`` (BCE + Dice, min);
    with 0 the last weights of the fixed schedule are kept.
    """

    task: str = "segmentation"
    data: SegmentationData
    model: SegmentationModelConfig = SegmentationModelConfig()
    train: TrainConfig = TrainConfig(epochs=12, batch_size=8, lr=1e-3, val_fraction=0.0, early_stopping_patience=0)


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
        DatasetError: no row has that split (the message lists the splits found).
    """
    chosen = [it for it in items if it.split == split]
    if not chosen:
        raise DatasetError(f"{source}: no manifest rows with split '{split}' (found {sorted({i.split for i in items})})")
    if limit:
        pos = [it for it in chosen if it.defective][: max(1, limit // 2)]
        neg = [it for it in chosen if not it.defective][: limit - len(pos)]
        chosen = sorted(pos + neg, key=lambda it: it.id)
    return chosen


def _manifest_parts(data: SegmentationData) -> tuple[list[MaskedImage], list[MaskedImage]]:
    """``(trainable rows, rows of the data's own test split)`` of ``data.root`` (subset by ``max_images``).

    Without a ``split`` column (or without rows of ``test_split``) every row is in the first list
    and the second is empty.
    """
    items = read_manifest(data.root)
    if not any(it.split for it in items):
        return select_items(items, "", data.max_images, data.root), []
    train = select_items(items, data.train_split, data.max_images, data.root)
    if not any(it.split == data.test_split for it in items):
        return train, []
    return train, select_items(items, data.test_split, data.max_images, data.root)


def load_mask_samples(data: SegmentationData) -> Samples:
    """The task's samples: manifest rows of the train split, then of the test split (if any).

    Returns:
        :class:`Samples` with ``ids`` = image paths, ``labels`` = defective 0/1, ``test_only``
        marking the test split's rows (``None`` without one), ``columns`` = the manifest columns
        plus ``block8`` (see the module docs), and ``data`` = a :class:`MaskStack` of the images
        and masks at ``(height, width)``, decoded on first use.

    Raises:
        DatasetError: missing manifest, column, file, or no rows of ``train_split`` (named).
    """
    train, test = _manifest_parts(data)
    chosen = train + test
    has_test = bool(test)
    extra_keys = list(dict.fromkeys(k for it in chosen for k in it.extra))
    blocks = [f"{it.split}:{i // BLOCK_ROWS:04d}" for part in (train, test) for i, it in enumerate(part)]
    columns = {"id": [it.id for it in chosen], "split": [it.split for it in chosen],
               **{k: [it.extra.get(k, "") for it in chosen] for k in extra_keys}, f"block{BLOCK_ROWS}": blocks}
    labels = np.array([int(it.defective) for it in chosen], dtype=int)
    if has_test:
        where = (f"train split '{data.train_split}' {len(train)} ({sum(it.defective for it in train)} defective), "
                 f"test split '{data.test_split}' {len(test)} ({sum(it.defective for it in test)} defective)")
    else:
        where = f"{len(chosen)} images ({int(labels.sum())} defective), no test split in the manifest"
    return Samples([str(it.image) for it in chosen], labels, list(CLASS_NAMES), MaskStack(chosen, (data.height, data.width)),
                   columns=columns, test_only=np.array([False] * len(train) + [True] * len(test)) if has_test else None,
                   description=f"{data.root} (manifest.csv; {where})")


def model_kwargs_from(recipe: SegmentationRecipe) -> dict:
    """Arguments for :func:`create_model` that rebuild the U-Net without loading weights."""
    m = recipe.model
    return {"encoder": m.encoder, "num_classes": 1, "decoder_channels": list(m.decoder_channels)}


def load_segmenter(run_dir: Path) -> tuple[nn.Module, dict]:
    """Rebuild a trained U-Net from ``RUN/model.ckpt``; returns ``(model in eval mode, payload)``."""
    return RunFolder(run_dir).load_model()


def write_segmentation_report(run: RunFolder, title: str, metrics: dict, x: np.ndarray, y: np.ndarray, probs: np.ndarray,
                              ids: list[str], scores: np.ndarray, dice: np.ndarray, info: dict, threshold: float,
                              prefix: str = "", crossval: dict | None = None, decisions: dict | None = None) -> None:
    """Report: run facts, metrics, image-level ROC/PR, overlays on defective and good images, training curves.

    Args:
        metrics: from :func:`segmentation_metrics` (the lists may be absent).
        x, y, probs: ``uint8 [N, 3, H, W]`` images, ``[N, 1, H, W]`` true masks and probabilities.
        ids: ``N`` image names for the overlay titles; scores, dice: ``[N]`` image scores and Dice.
        prefix: file-name prefix of the figures (``oof_`` for cross-validation).
        crossval: the pipeline's ``{"folds", "mean", "std"}``: adds the fold table; the metrics
            are then the pooled out-of-fold ones and no training curves are drawn.
    """
    rep = Report(title)
    rep.kv("Run", info)
    keys = ["n", "n_defective", "image_ap", "image_auroc", "dice", "dice_defective", "pixel_auroc"]
    if crossval:
        rep.table("Cross-validation: held-out figures per fold", crossval_table({**crossval, "pooled": metrics}, keys))
    what = "out-of-fold" if crossval else "held-out"
    rep.kv("Pooled out-of-fold metrics" if crossval else "Held-out metrics",
           {k: metrics[k] for k in ("n", "n_defective", "dice", "iou", "dice_defective", "iou_defective",
                                    "pixel_auroc", "image_ap", "image_auroc", "threshold", "image_score")})
    defective = y.reshape(len(y), -1).any(axis=1)
    scores, dice = np.asarray(scores, dtype=float), np.asarray(dice, dtype=float)
    if plot_image_level_curves(defective, scores, run.plots / f"{prefix}image_level_curves.png"):
        rep.image(f"plots/{prefix}image_level_curves.png", f"Image level ({what}): ROC and precision-recall of 'defect present'")
    pos = np.flatnonzero(defective)[:10]
    neg_all = np.flatnonzero(~defective)
    hardest = neg_all[np.argsort(-scores[neg_all])][:3]
    rest = np.setdiff1d(neg_all, hardest)
    neg = np.concatenate([hardest, np.random.default_rng(0).permutation(rest)[:3]]).astype(int)
    for name, idx, caption in (("defective", pos, f"Defective {what} images"),
                               ("good", neg, f"Good {what} images (3 with the highest scores, 3 at random)")):
        if len(idx):
            titles = [f"{ids[i]} s={scores[i]:.2f} d={dice[i]:.2f}" for i in idx]
            plot_mask_overlays(x[idx], y[idx, 0], probs[idx, 0], titles, run.plots / f"{prefix}overlays_{name}.png", threshold)
            rep.image(f"plots/{prefix}overlays_{name}.png",
                      f"{caption}: predicted mask red, true mask green outline; s = image score, d = Dice")
    if not prefix and not crossval:
        report_training_curves(rep, run, "Training loss per epoch")
    report_sections(rep, run, {"decisions": decisions})
    rep.write(run.report_path)


class SegmentationTask(TaskHooks):
    """The ``segmentation`` task (registered as such): hooks of the shared pipeline."""

    name = "segmentation"
    recipe = SegmentationRecipe
    monitor = SegmentationModule.monitor
    summary_keys = ("image_ap", "image_auroc", "dice", "dice_defective", "pixel_auroc")
    predict_options = ("save_images",)
    default_predict_out = "masks.csv"

    def load_samples(self, recipe: SegmentationRecipe, run_dir: Path | None = None) -> Samples:
        check_input_size(recipe.data.height, recipe.data.width)
        return load_mask_samples(recipe.data)

    def split_info(self, recipe: SegmentationRecipe) -> dict:
        d = recipe.data
        if _manifest_parts(d)[1]:
            return {"source": "manifest.csv", "train_split": d.train_split, "test_split": d.test_split}
        return {"source": f"stratified test_fraction (manifest has no '{d.test_split}' split)",
                "seed": d.split_seed, "test_fraction": d.test_fraction}

    def fit_model(self, recipe: SegmentationRecipe, samples: Samples, parts: dict[str, np.ndarray],
                  run: RunFolder) -> Fitted | None:
        t, d, m = recipe.train, recipe.data, recipe.model
        stack: MaskStack = samples.data
        xtr, ytr = stack.get(parts["train"], progress=t.progress)
        val = parts.get("val")
        has_val = val is not None and len(val) > 0
        kwargs = model_kwargs_from(recipe)
        model = create_model(m.name, **kwargs, pretrained=m.pretrained, weights=m.weights)
        weights_source = model.weights_source
        module = SegmentationModule(model, t.lr, t.weight_decay, m.bce_weight, m.dice_weight, t.augment, t.channels_last)
        defective_tr = ytr.reshape(len(ytr), -1).any(axis=1)
        sampler = DefectOversampler(defective_tr, d.defect_oversample, d.good_per_epoch, recipe.seed)
        train_loader = DataLoader(MaskDataset(xtr, ytr, d.crop_height), batch_size=t.batch_size, sampler=sampler,
                                  num_workers=0, drop_last=len(sampler) > t.batch_size)
        val_loader = DataLoader(MaskDataset(*stack.get(val, progress=t.progress)), batch_size=t.batch_size) if has_val else None
        info = fit_lightning(module, train_loader, val_loader, t, run.path, self.monitor, SegmentationModule.mode)
        if info is None:
            return None
        model = module.model.to(memory_format=torch.contiguous_format).float().eval()
        info.update(weights=weights_source, precision=resolved_precision(t),
                    defective={k: int(samples.labels[v].sum()) for k, v in parts.items()})
        ckpt = {"model_name": m.name, "model_kwargs": kwargs, "state_dict": model.state_dict(),
                "class_names": ["defect"], "input_size": [d.height, d.width], "threshold": m.threshold,
                "tta": m.tta, "image_score": m.image_score, "normalisation": "inside model: input RGB in [0, 1]",
                "weights_source": weights_source}
        return Fitted(model, ckpt, info)

    def run_info(self, recipe: SegmentationRecipe, fitted: Fitted) -> dict:
        d = recipe.data
        return {"model": recipe.model.name, "encoder": recipe.model.encoder,
                "input_size": {"height": d.height, "width": d.width, "rule": "resized (images bilinear, masks area >= 0.5)"},
                "metric_resolution": f"{d.height}x{d.width}"}

    def predict_samples(self, recipe: SegmentationRecipe, fitted: Fitted, samples: Samples, idx: np.ndarray) -> Predictions:
        """Mask probabilities of ``idx`` (``raw``: ``float32 [n, 1, H, W]``); table ``pred``, ``image_score``, ``dice``.

        ``pred`` is ``defective`` when the image score reaches ``model.threshold``; ``dice`` is the
        image's Dice at that threshold (1 for a good image predicted empty).
        """
        m = recipe.model
        x, y = samples.data.get(idx)
        probs = predict_mask_probs(fitted.model, x, tta=m.tta)
        scores = image_scores(probs, m.image_score)
        dice = dice_per_image(probs >= m.threshold, y).mean(axis=1)
        table = {"pred": [CLASS_NAMES[int(s >= m.threshold)] for s in scores],
                 "image_score": [float(s) for s in scores], "dice": [float(v) for v in dice]}
        return Predictions(table, probs)

    def compute_metrics(self, recipe: SegmentationRecipe, samples: Samples, idx: np.ndarray, preds: Predictions) -> dict:
        _, y = samples.data.get(idx)
        met = segmentation_metrics(preds.raw, y, recipe.model.threshold, seed=recipe.seed, score_method=recipe.model.image_score)
        return {k: v for k, v in met.items() if k not in ("image_scores", "per_image_dice")}

    def decision_scores(self, recipe: SegmentationRecipe, samples: Samples, idx: np.ndarray,
                        preds: Predictions) -> tuple[np.ndarray, np.ndarray]:
        """Defective images (manifest flag) and their image scores (``model.image_score`` rule)."""
        return samples.labels[idx] == 1, np.asarray(preds.table["image_score"], dtype=float)

    def write_report(self, run: RunFolder, recipe: SegmentationRecipe, samples: Samples, idx: np.ndarray,
                     preds: Predictions, metrics: dict, info: dict) -> None:
        d, m = recipe.data, recipe.model
        info = dict(info)
        cv = info.pop("crossval", None)
        decisions = info.pop("decisions", None)
        x, y = samples.data.get(idx)
        ids = [samples.data.items[i].id for i in idx]
        facts = {"encoder": m.encoder, "input (H x W)": f"{d.height} x {d.width} (resized)",
                 "defect oversampling": d.defect_oversample, "test-time flips": m.tta, "image score": m.image_score, **info}
        title = f"defectscope {self.name}: U-Net {m.encoder} on {Path(d.root).name}"
        write_segmentation_report(run, title + (" (cross-validation)" if cv else ""), metrics, x, y, preds.raw, ids,
                                  preds.table["image_score"], preds.table["dice"], facts, m.threshold,
                                  prefix="oof_" if cv else "", crossval=cv, decisions=decisions)

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
                                  [it.id for it in items], metrics["image_scores"], metrics["per_image_dice"],
                                  {"run": str(run_dir), "data": str(data), "images": len(items)}, payload["threshold"])
        return test

    def predict(self, run_dir: Path, inputs: list[Path], out: Path, save_images: bool = False, **options) -> dict:
        """Segment image files; write the run-length csv ``out`` (``ImageId,ClassId,EncodedPixels``).

        Masks are predicted at the model's input size, upsampled bilinearly to each
        image's own size and thresholded; every (image, class) gets a row (empty
        ``EncodedPixels`` for no defect). ``save_images`` also writes 0/255 PNG masks
        to ``<out stem>_masks/<image stem>.png`` (``_class<k>`` suffix when K > 1).

        Raises:
            ConfigError: an option other than ``save_images``.
            ValueError: two inputs share a file name (``ImageId`` must be unique).
        """
        self.check_predict_options(options)
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


register_task(SegmentationTask())
