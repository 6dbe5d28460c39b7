"""Defect segmentation task (paper 004): U-Net, BCE + Dice, per-class masks, run-length csv output.

Recipe (``task: segmentation``)::

    data:  {root: ../shared/datasets/kolektorsdd, height: 320, width: 128, defect_oversample: 3}
    model: {name: unet, encoder: resnet18, pretrained: false}
    train: {epochs: 12, batch_size: 8, lr: 1.0e-3, val_fraction: 0}

Schema: :class:`defectscope.recipes.segmentation.SegmentationRecipe`; report:
:mod:`defectscope.evaluation.segmentation_report`. This module holds the task's hooks.

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

import numpy as np
import torch
from torch.utils.data import DataLoader

from defectscope.data.images import DatasetError
from defectscope.data.masks import MaskedImage, MaskStack, read_manifest
from defectscope.engine.pipeline import Fitted, Predictions, Samples, TaskHooks
from defectscope.engine.run import RunFolder
from defectscope.engine.tasks import register_task
from defectscope.engine.trainer import fit_lightning, resolved_precision
from defectscope.evaluation.segmentation import dice_per_image, segmentation_metrics
from defectscope.evaluation.segmentation_report import write_segmentation_report  # noqa: F401 (re-exported)
from defectscope.models import create_model
from defectscope.models.unet import check_input_size
from defectscope.models.unet.inference import UNetInference, predict_unet
from defectscope.models.unet.lightning_model import DefectOversampler, MaskDataset, SegmentationModule
from defectscope.recipes.segmentation import SegmentationData, SegmentationRecipe

#: Rows per block of the computed ``--group-by`` column ``block8`` (KolektorSDD: 8 views per part).
BLOCK_ROWS = 8
#: Class names of the image-level label (index = ``Samples.labels`` value).
CLASS_NAMES = ["good", "defective"]


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


class SegmentationTask(TaskHooks):
    """The ``segmentation`` task (registered as such): hooks of the shared pipeline."""

    name = "segmentation"
    recipe = SegmentationRecipe
    monitor = SegmentationModule.monitor
    summary_keys = ("image_ap", "image_auroc", "dice", "dice_defective", "pixel_auroc")

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
        info = fit_lightning(module, train_loader, val_loader, t, run.path, self.monitor, SegmentationModule.mode,
                             resume=run.resume)
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

        The forward is the method's :class:`~defectscope.models.unet.inference.UNetInference`, the module
        ``predict``, ``serve`` and the ONNX graph run, so the image scores the operating point is chosen
        on are the ones the deployed model computes.

        ``pred`` is ``defective`` when the image score reaches ``model.threshold``; ``dice`` is the
        image's Dice at that threshold (1 for a good image predicted empty).
        """
        m, d = recipe.model, recipe.data
        x, y = samples.data.get(idx)
        probs, scores = predict_unet(UNetInference(fitted.model, m.tta, m.image_score, (d.height, d.width)), x)
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


register_task(SegmentationTask())
