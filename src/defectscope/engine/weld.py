"""Multimodal laser-weld classification task (paper 000, sections 4-5): ``task: weld``.

Pipeline of :meth:`WeldTask.fit`:

1. read a weld data folder (:mod:`defectscope.data.weld.format`) or simulate one (``data.simulate``);
2. stratified 8:2 split (``data.test_fraction``, ``data.split_seed``), validation share from the training part;
3. train the seam U-Net on the training masks, predict masks for every sample, report the seam Dice
   on the held-out split; crop each weld (the first flipped vertically, section 4.2), optionally
   blank the background outside the predicted seam (``data.segmented``);
4. min-max normalise the spectra with training statistics; Pearson correlation over the training
   spectra (eq. 1) and selection of the least redundant channels (stored with the model);
5. train the weld model (fusion by default) with focal loss (eq. 14) and AdamW;
6. evaluate the held-out split: Table-4 layout per class (precision, recall, F1, AUROC), confusion
   matrix, ROC, correlation heat map with the chosen wavelengths, cross-attention overlays (Fig. 14),
   seam masks; the report is marked synthetic when the data is.
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

from defectscope.config import BaseRecipe, ClassifierTrainConfig, StrictModel, TrainConfig
from defectscope.data.splits import stratified_split, write_file_list
from defectscope.data.weld.channels import minmax_normalise, minmax_stats, pearson_matrix, select_channels
from defectscope.data.weld.format import WeldDataError, WeldDataset, read_weld_dataset
from defectscope.engine.classification import build_loss, warmup_cosine
from defectscope.engine.run import RunFolder
from defectscope.engine.tasks import register_task
from defectscope.engine.trainer import build_trainer, report_training_curves, set_threads
from defectscope.evaluation.classification import classification_metrics
from defectscope.evaluation.plots import plot_confusion_matrix, plot_roc_curves, save_figure
from defectscope.evaluation.report import Report
from defectscope.models import create_model
from defectscope.models.weld_fusion.torch_model import MODALITIES
from defectscope.utils.io import write_text


class SimulateConfig(StrictModel):
    """Simulate the data set (no real data needed): ``n_samples`` coupons, ``seed``, ``image_size`` px."""

    n_samples: int = Field(603, ge=14)
    seed: int = 0
    image_size: int = Field(256, ge=64)


class WeldData(StrictModel):
    """Data, split and input preparation.

    Attributes:
        root: a weld data folder (manifest.json); with ``simulate`` it is where the simulated set is
            written (default ``RUN/data``).
        simulate: simulate the set first (the demo); ``None`` reads ``root``.
        seq_len: ``T`` time steps per series (paper 000: 560); ``length_policy`` resample or crop.
        test_fraction, split_seed: the stratified held-out split (paper: 8:2).
        crop_height, crop_width: size (px) each weld crop is resized to for the vision encoder.
        seg_size: side (px) images are resized to for the seam U-Net.
        segmented: blank the background outside the (predicted) seam in the crops (paper's
            "segmented images"); ``False`` feeds raw crops.
    """

    root: str | None = None
    simulate: SimulateConfig | None = None
    seq_len: int = Field(560, ge=16)
    length_policy: Literal["resample", "crop"] = "resample"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    crop_height: int = Field(64, ge=32)
    crop_width: int = Field(256, ge=32)
    seg_size: int = Field(128, ge=32)
    segmented: bool = True


class SegmentationConfig(StrictModel):
    """Seam U-Net (compact, Fig. 7) training: ``enabled=False`` crops fixed bands (no masks needed)."""

    enabled: bool = True
    base_channels: int = Field(8, ge=2)
    depth: int = Field(3, ge=1, le=5)
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)


class WeldModelConfig(StrictModel):
    """Weld model and spectral settings.

    Attributes:
        name: ``weld_fusion`` (paper 000), ``weld_vision``, ``weld_dlinear``, ``weld_informer``, ``weld_inverted``.
        backbone, pretrained, weights: vision encoder (``efficientnet_lite0`` has real ImageNet weights here;
            the paper's ``mobilenetv2_100`` has none on this machine).
        fusion: ``v2s`` | ``s2v`` | ``bidirectional`` | ``add`` | ``concat``.
        embedding: ``inverted`` | ``vanilla``; ``spectral_dim`` its width D (paper: 64/96/128).
        embed_dim, num_heads, num_layers, dropout: fusion/head settings.
        channels: ``select`` (Pearson selection of ``num_channels``), or ``all``.
        freeze_backbone: keep the (ImageNet) vision encoder fixed and train on its cached feature
            maps, computed once; the CPU demo uses it (the paper fine-tunes the encoder).
        num_channels: channels kept by the selection (paper: 4); ``per_band`` balances VIS/NIR.
    """

    name: Literal["weld_fusion", "weld_vision", "weld_dlinear", "weld_informer", "weld_inverted"] = "weld_fusion"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None
    fusion: Literal["v2s", "s2v", "bidirectional", "add", "concat"] = "v2s"
    embedding: Literal["inverted", "vanilla"] = "inverted"
    spectral_dim: int = Field(96, ge=4)
    embed_dim: int = Field(128, ge=8)
    num_heads: int = Field(4, ge=1)
    num_layers: int = Field(1, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    freeze_backbone: bool = False
    channels: Literal["select", "all"] = "select"
    num_channels: int = Field(4, ge=1)
    per_band: bool = True


def _weld_train_defaults() -> ClassifierTrainConfig:
    return ClassifierTrainConfig(epochs=10, batch_size=16, lr=2e-4, early_stopping_patience=4, augment=False)


class WeldRecipe(BaseRecipe):
    """Recipe of the ``weld`` task."""

    task: Literal["weld"] = "weld"
    data: WeldData = WeldData()
    segmentation: SegmentationConfig = SegmentationConfig()
    model: WeldModelConfig = WeldModelConfig()
    train: ClassifierTrainConfig = Field(default_factory=_weld_train_defaults)


# ------------------------------------------------------------------------------------------ seam U-Net


def _dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum((1, 2, 3))
    dice = 1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


def _seg_inputs(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` images -> float ``[N, 3, size, size]`` in [0, 1]."""
    x = [F.interpolate(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float() / 255.0, size=(size, size), mode="bilinear",
                       align_corners=False) for im in images]
    return torch.cat(x)


def train_seam_unet(images: list[np.ndarray], masks: list[np.ndarray], cfg: SegmentationConfig, size: int, seed: int) -> nn.Module:
    """Train the seam U-Net (BCE + Dice loss, AdamW) on images and binary masks resized to ``size``.

    Returns the model in eval mode.
    """
    torch.manual_seed(seed)
    model = create_model("weld_seam_unet", base=cfg.base_channels, depth=cfg.depth)
    x = _seg_inputs(images, size)
    y = torch.cat([F.interpolate(torch.from_numpy(m)[None, None].float(), size=(size, size), mode="nearest") for m in masks])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * max(1, -(-len(x) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _dice_bce(model(x[idx]).float(), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict_masks(model: nn.Module, images: list[np.ndarray], size: int, batch_size: int = 16) -> list[np.ndarray]:
    """Binary seam masks (uint8 ``[H, W]`` per image, original size) from the U-Net."""
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        logits = model(_seg_inputs(chunk, size))
        for im, lg in zip(chunk, logits):
            up = F.interpolate(lg[None], size=im.shape[:2], mode="bilinear", align_corners=False)[0, 0]
            out.append((up > 0).numpy().astype(np.uint8))
    return out


def dice_score(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice ``2|P n T| / (|P| + |T|)`` of two binary masks (1.0 when both are empty)."""
    p, t = pred.astype(bool), true.astype(bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2 * (p & t).sum() / denom)


def crop_welds(image: np.ndarray, mask: np.ndarray | None, n_welds: int, size: tuple[int, int], segmented: bool) -> np.ndarray:
    """Crop each weld (paper 000 section 4.2): uint8 ``[W, 3, h, w]``, the first crop flipped vertically.

    Weld ``k`` is searched in the ``k``-th horizontal band of the image; its box spans the mask's
    columns (+-4 px) and is centred on the mask's mean row, with the aspect ratio of ``size``. Without
    mask pixels in a band (or without a mask) the whole band is taken, unmasked. With ``segmented``
    the pixels outside the (3 px dilated) seam mask are set to 0 before resizing.
    """
    h_img, w_img = image.shape[:2]
    ch, cw = size
    crops = []
    for k in range(n_welds):
        b0, b1 = int(round(k * h_img / n_welds)), int(round((k + 1) * h_img / n_welds))
        band = mask[b0:b1] if mask is not None else None
        found = band is not None and bool(band.any())
        if found:
            rows, cols = np.nonzero(band)
            x0, x1 = max(cols.min() - 4, 0), min(cols.max() + 5, w_img)
            yc = b0 + rows.mean()
        else:
            x0, x1, yc = 0, w_img, (b0 + b1) / 2
        bh = max(8, int(round((x1 - x0) * ch / cw)))
        y0 = int(round(yc - bh / 2))
        y0 = min(max(y0, 0), max(h_img - bh, 0))
        y1 = min(y0 + bh, h_img)
        img = torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1])).permute(2, 0, 1).float()
        if segmented and found:  # no seam found in this band: keep the raw crop rather than a black one
            m = torch.from_numpy(mask[y0:y1, x0:x1]).float()[None, None]
            m = F.max_pool2d(m, 7, 1, 3)[0]
            img = img * m
        crop = F.interpolate(img[None], size=(ch, cw), mode="bilinear", align_corners=False)[0]
        if k == 0:
            crop = crop.flip(-2)
        crops.append(crop.round().clamp(0, 255).to(torch.uint8).numpy())
    return np.stack(crops)


# ------------------------------------------------------------------------------------------ pipeline


@dataclass
class WeldInputs:
    """Everything a weld classifier is trained and evaluated on.

    Attributes:
        dataset: the data as read.
        crops: uint8 ``[N, W, 3, h, w]`` (segmented or raw per the recipe).
        spectra: float32 ``[N, W, C_all, T]`` raw (not normalised), all channels.
        labels: ``[N]``; ``split``: index arrays ``train``/``val``/``test``.
        masks: predicted seam masks; ``seam_dice``: mean Dice on the test split (``None`` without masks).
    """

    dataset: WeldDataset
    crops: np.ndarray
    spectra: np.ndarray
    labels: np.ndarray
    split: dict[str, np.ndarray]
    masks: list[np.ndarray] | None
    seam_dice: float | None
    unet: nn.Module | None
    unet_seconds: float


def split_indices(labels: np.ndarray, test_fraction: float, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified test split, then a stratified validation share of the rest (``val_fraction`` 0: none)."""
    trainval, test = stratified_split(labels, test_fraction, seed)
    out = {"test": test}
    if val_fraction > 0 and len(trainval) >= 2 * len(np.unique(labels[trainval])):
        try:
            tr, va = stratified_split(labels[trainval], val_fraction, seed)
            out["train"], out["val"] = trainval[tr], trainval[va]
            return out
        except ValueError:
            pass
    out["train"] = trainval
    return out


def load_weld_data(data: WeldData, run_dir: Path | None, progress: bool = False) -> WeldDataset:
    """Read ``data.root``, simulating it first when ``data.simulate`` is set.

    Raises:
        WeldDataError: invalid folder; ValueError: neither ``root`` nor ``simulate``.
    """
    if data.simulate is not None:
        from defectscope.data.weld.simulate import simulate_weld_dataset

        root = Path(data.root) if data.root else Path(run_dir or ".") / "data"
        if not (root / "manifest.json").is_file():
            simulate_weld_dataset(root, data.simulate.n_samples, data.simulate.seed, data.simulate.image_size)
        return read_weld_dataset(root, data.seq_len, data.length_policy)
    if not data.root:
        raise ValueError("data.root: give a weld data folder, or data.simulate to simulate one")
    return read_weld_dataset(data.root, data.seq_len, data.length_policy)


def prepare_inputs(ds: WeldDataset, recipe: WeldRecipe, split: dict[str, np.ndarray], unet: nn.Module | None = None,
                   segmented: bool | None = None) -> WeldInputs:
    """Seam U-Net (trained on ``split['train']`` unless given), crops and raw spectra for every sample."""
    d, seg = recipe.data, recipe.segmentation
    segmented = d.segmented if segmented is None else segmented
    images = [s.image for s in ds.samples]
    masks, dice, secs = None, None, 0.0
    if seg.enabled:
        if unet is None:
            if not ds.has_masks:
                missing = [s.id for s in ds.samples if s.mask is None][:5]
                raise WeldDataError(f"{ds.root}: segmentation.enabled needs a 'mask' for every sample; missing e.g. for {missing} "
                                    "(or set segmentation.enabled=false)")
            t0 = time.perf_counter()
            tr = split["train"]
            unet = train_seam_unet([images[i] for i in tr], [ds.samples[i].mask for i in tr], seg, d.seg_size, recipe.seed)
            secs = time.perf_counter() - t0
        masks = predict_masks(unet, images, d.seg_size)
        if ds.has_masks:
            dice = float(np.mean([dice_score(masks[i], ds.samples[i].mask) for i in split["test"]]))
    crops = np.stack([crop_welds(im, masks[i] if masks else None, ds.welds_per_sample, (d.crop_height, d.crop_width), segmented)
                      for i, im in enumerate(images)])
    spectra = np.stack([s.spectra for s in ds.samples]).astype(np.float32)
    return WeldInputs(ds, crops, spectra, ds.labels, split, masks, dice, unet, secs)


@dataclass
class SpectralPrep:
    """Channel selection and normalisation fitted on the training split (stored in the checkpoint)."""

    corr: np.ndarray
    selected: list[int]
    lo: np.ndarray
    hi: np.ndarray

    def apply(self, spectra: np.ndarray) -> np.ndarray:
        """Raw ``[N, W, C_all, T]`` -> normalised selected ``[N, W, C_sel, T]``."""
        return minmax_normalise(spectra[:, :, self.selected], self.lo, self.hi)


def fit_spectral_prep(spectra_train: np.ndarray, wavelengths: list[float], mcfg: WeldModelConfig) -> SpectralPrep:
    """Pearson matrix (eq. 1) on the training spectra, channel selection, min-max statistics."""
    corr = pearson_matrix(spectra_train)
    c = spectra_train.shape[2]
    selected = list(range(c)) if mcfg.channels == "all" else select_channels(corr, min(mcfg.num_channels, c), wavelengths, mcfg.per_band)
    lo, hi = minmax_stats(spectra_train[:, :, selected])
    return SpectralPrep(corr, selected, lo, hi)


def model_kwargs(mcfg: WeldModelConfig, num_classes: int, channels: int, seq_len: int, welds: int) -> dict:
    """Arguments for ``create_model`` (architecture only, no weights)."""
    return {"num_classes": num_classes, "channels": channels, "seq_len": seq_len, "welds": welds, "backbone": mcfg.backbone,
            "fusion": mcfg.fusion, "embedding": mcfg.embedding, "spectral_dim": mcfg.spectral_dim,
            "embed_dim": mcfg.embed_dim, "num_heads": mcfg.num_heads, "num_layers": mcfg.num_layers, "dropout": mcfg.dropout}


class WeldModule(L.LightningModule):
    """Lightning wrapper of a weld model: focal/CE loss, AdamW + warm-up cosine, weighted-F1 validation.

    Batches are ``(crops uint8 [B, W, 3, h, w], spectra float [B, W, C, T], labels [B])``.
    """

    def __init__(self, model: nn.Module, num_classes: int, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.loss_fn = build_loss(cfg.loss, cfg.focal_gamma, cfg.label_smoothing)
        self.val_f1 = MulticlassF1Score(num_classes, average="weighted")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, crops: torch.Tensor, spectra: torch.Tensor) -> torch.Tensor:
        x = crops.float() / 255.0 if crops.dtype == torch.uint8 else crops  # cached features pass through
        return self.model(x, spectra)

    def training_step(self, batch, batch_idx):
        x, s, y = batch
        loss = self.loss_fn(self(x, s), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, s, y = batch
        logits = self(x, s).float()
        self.log("val/loss", self.loss_fn(logits, y), on_epoch=True)
        self.val_f1.update(logits, y)
        self.val_acc.update(logits, y)

    def on_validation_epoch_end(self):
        self.log("val/weighted_f1", self.val_f1.compute(), prog_bar=True)
        self.log("val/accuracy", self.val_acc.compute())
        self.val_f1.reset()
        self.val_acc.reset()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        sched = warmup_cosine(opt, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loader(crops: np.ndarray, spectra: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool) -> DataLoader:
    ds = TensorDataset(torch.from_numpy(crops), torch.from_numpy(spectra), torch.from_numpy(labels).long())
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=0, drop_last=shuffle and len(labels) > batch_size)


def train_weld_model(recipe: WeldRecipe, inputs: WeldInputs, prep: SpectralPrep, run_dir: Path,
                     train_cfg: TrainConfig | None = None) -> tuple[nn.Module, dict, dict]:
    """Train the recipe's model on ``inputs.split['train']`` (checkpoint selection on ``val``).

    Returns ``(model in eval mode, fp32, model kwargs, info)`` with ``epochs_run``, ``train_seconds``,
    ``best_checkpoint``, ``weights_source``.
    """
    t = train_cfg or recipe.train
    ds = inputs.dataset
    spectra = prep.apply(inputs.spectra)
    kwargs = model_kwargs(recipe.model, len(ds.classes), len(prep.selected), recipe.data.seq_len, ds.welds_per_sample)
    model = create_model(recipe.model.name, **kwargs, pretrained=recipe.model.pretrained and "image" in MODALITIES[recipe.model.name],
                         weights=recipe.model.weights)
    weights_source = getattr(getattr(getattr(model, "vision", None), "backbone", None), "weights_source", "n/a (no vision encoder)")
    module = WeldModule(model, len(ds.classes), t)
    sp = inputs.split
    images = inputs.crops
    if recipe.model.freeze_backbone and hasattr(model, "vision"):
        backbone = model.vision.backbone
        backbone.requires_grad_(False)
        images = cached_features(backbone, inputs.crops)
    has_val = "val" in sp and len(sp["val"]) > 0
    trainer = build_trainer(t, run_dir, "val/weighted_f1" if has_val else None)
    start = time.perf_counter()
    trainer.fit(module, _loader(images[sp["train"]], spectra[sp["train"]], inputs.labels[sp["train"]], t.batch_size, True),
                _loader(images[sp["val"]], spectra[sp["val"]], inputs.labels[sp["val"]], t.batch_size, False) if has_val else None)
    secs = time.perf_counter() - start
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") if has_val else ""
    if best:
        module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    model = module.model.float().eval()
    return model, kwargs, {"epochs_run": int(trainer.current_epoch), "train_seconds": round(secs, 1),
                           "best_checkpoint": Path(best).name if best else "last", "weights_source": weights_source}


@torch.no_grad()
def cached_features(backbone: nn.Module, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Feature maps of a frozen backbone for uint8 crops ``[N, W, 3, h, w]`` -> float32 ``[N, W, C, h', w']`` (bf16 autocast)."""
    backbone.eval()
    out = []
    flat = crops.reshape(-1, *crops.shape[2:])
    for i in range(0, len(flat), batch_size):
        x = torch.from_numpy(flat[i : i + batch_size]).float().div_(255.0).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.append(backbone(x).float())
    f = torch.cat(out).numpy()
    return f.reshape(crops.shape[0], crops.shape[1], *f.shape[1:])


@torch.no_grad()
def predict_weld_probs(model: nn.Module, crops: np.ndarray, spectra: np.ndarray, batch_size: int = 32,
                       with_attention: bool = False):
    """Softmax probabilities ``[N, K]`` (and the fusion attention per batch when asked), fp32, eval mode."""
    model.eval()
    probs, attns = [], []
    for i in range(0, len(crops), batch_size):
        x = torch.from_numpy(crops[i : i + batch_size]).float() / 255.0
        s = torch.from_numpy(spectra[i : i + batch_size])
        if with_attention and hasattr(model, "forward_with_attention"):
            logits, attn = model.forward_with_attention(x, s)
            attns.append({k: v.numpy() for k, v in attn.items()})
        else:
            logits = model(x, s)
        probs.append(F.softmax(logits.float(), dim=1).numpy())
    p = np.concatenate(probs) if probs else np.zeros((0, 0), np.float32)
    if not with_attention:
        return p
    merged = {k: np.concatenate([a[k] for a in attns]) for k in (attns[0] if attns else {})}
    return p, merged


# ------------------------------------------------------------------------------------------ plots


def plot_correlation(corr: np.ndarray, wavelengths: list[float], selected: list[int], path: Path) -> Path:
    """Pearson heat map (eq. 1) with the selected channels' wavelengths marked."""
    import matplotlib.pyplot as plt

    c = len(wavelengths)
    fig, ax = plt.subplots(figsize=(8.5, 7.5))
    im = ax.imshow(corr, cmap="coolwarm", vmin=-1, vmax=1)
    labels = [f"{w:.0f}" for w in wavelengths]
    ax.set_xticks(range(c), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(c), labels, fontsize=6)
    for i in selected:
        ax.get_xticklabels()[i].set_color("red")
        ax.get_yticklabels()[i].set_color("red")
        ax.axhline(i, color="k", lw=0.4, alpha=0.5)
        ax.axvline(i, color="k", lw=0.4, alpha=0.5)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("Pearson correlation of the channels (train split); selected: "
                 + ", ".join(f"{wavelengths[i]:.0f} nm" for i in selected), fontsize=9)
    ax.set_xlabel("wavelength (nm)")
    return save_figure(fig, path)


def plot_attention_overlays(crops: np.ndarray, attn: dict, grid: tuple[int, int], ids: list[str], true: list[str],
                            pred: list[str], channel_names: list[str], path: Path) -> Path | None:
    """Fig. 14: cross-attention over each weld crop.

    ``v2s`` ``[n, W, h, N, M]``: one panel per spectral token (channel), the weight image tokens give it;
    ``s2v`` ``[n, W, h, M, N]``: the attention of the spectral tokens over the image, averaged.
    """
    import matplotlib.pyplot as plt

    key = "v2s" if "v2s" in attn else "s2v" if "s2v" in attn else None
    if key is None:
        return None
    a = attn[key].mean(2)  # heads
    if key == "s2v":
        maps = a.mean(2)[..., None]  # [n, W, N, 1]
        names = ["spectra -> image"]
    else:
        maps = a  # [n, W, N, M]
        m = maps.shape[-1]
        if m > 8:  # vanilla embedding: 560 time tokens; show their mean
            maps = maps.mean(-1, keepdims=True)
            names = ["mean over time tokens"]
        else:
            names = channel_names[:m]
    n, w = maps.shape[:2]
    cols = 1 + maps.shape[-1]
    fig, axes = plt.subplots(n * w, cols, figsize=(2.6 * cols, 0.9 * n * w + 0.6), squeeze=False)
    gh, gw = grid
    for i in range(n):
        for k in range(w):
            r = i * w + k
            img = crops[i, k].transpose(1, 2, 0)
            axes[r, 0].imshow(img)
            axes[r, 0].set_title(f"{ids[i]} weld {k + 1}: {true[i]} -> {pred[i]}", fontsize=6)
            for j in range(maps.shape[-1]):
                heat = maps[i, k, :, j].reshape(gh, gw)
                up = F.interpolate(torch.from_numpy(heat)[None, None].float(), size=img.shape[:2], mode="bilinear",
                                   align_corners=False)[0, 0].numpy()
                axes[r, j + 1].imshow(img)
                axes[r, j + 1].imshow(up, cmap="jet", alpha=0.5)
                if r == 0:
                    axes[r, j + 1].set_title(names[j], fontsize=7)
            for ax in axes[r]:
                ax.axis("off")
    fig.suptitle("Cross-attention over the weld crops (first weld flipped vertically)", fontsize=8)
    return save_figure(fig, path)


def plot_seam_examples(ds: WeldDataset, masks: list[np.ndarray], crops: np.ndarray, idx: list[int], path: Path) -> Path:
    """Raw image, predicted seam mask (true mask contour) and the crops for a few samples (Fig. 7/8)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(idx), 2 + crops.shape[1], figsize=(3 * (2 + crops.shape[1]), 2.6 * len(idx)), squeeze=False)
    for r, i in enumerate(idx):
        s = ds.samples[i]
        axes[r, 0].imshow(s.image)
        axes[r, 0].set_title(f"{s.id} ({s.label})", fontsize=7)
        axes[r, 1].imshow(masks[i], cmap="gray")
        if s.mask is not None:
            axes[r, 1].contour(s.mask, levels=[0.5], colors="r", linewidths=0.5)
        axes[r, 1].set_title("predicted seam (red: true)", fontsize=7)
        for k in range(crops.shape[1]):
            axes[r, 2 + k].imshow(crops[i, k].transpose(1, 2, 0))
            axes[r, 2 + k].set_title(f"crop {k + 1}" + (" (flipped)" if k == 0 else ""), fontsize=7)
        for ax in axes[r]:
            ax.axis("off")
    return save_figure(fig, path)


def plot_spectra_examples(ds: WeldDataset, selected: list[int], path: Path) -> Path:
    """Mean selected-channel series per class (weld 1), the spectral side of Fig. 8."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(selected), figsize=(3.2 * len(selected), 3), squeeze=False)
    labels = ds.labels
    x = np.stack([s.spectra[0] for s in ds.samples])
    for j, c in enumerate(selected):
        ax = axes[0, j]
        for k, name in enumerate(ds.classes):
            if (labels == k).any():
                ax.plot(x[labels == k, c].mean(0), lw=0.8, label=name)
        ax.set_title(f"{ds.wavelengths_nm[c]:.0f} nm", fontsize=8)
        ax.set_xlabel("time step")
    axes[0, 0].set_ylabel("counts (class mean)")
    axes[0, -1].legend(fontsize=6)
    return save_figure(fig, path)


def table4_rows(metrics: dict) -> list[dict]:
    """Per-class rows in paper 000's Table-4 layout (precision, recall, F1, AUROC in %)."""
    rows = []
    for name, v in metrics["per_class"].items():
        rows.append({"class": name, "precision (%)": round(100 * v["precision"], 1), "recall (%)": round(100 * v["recall"], 1),
                     "F1 (%)": round(100 * v["f1"], 1), "AUROC (%)": None if v["auroc"] is None else round(100 * v["auroc"], 1),
                     "support": v["support"]})
    return rows


def _percent_strings(rows: list[dict]) -> list[dict]:
    """Floats as ``"97.8"`` strings for the HTML table (the report's default is 4 decimals)."""
    return [{k: f"{v:.1f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]


# ------------------------------------------------------------------------------------------ the task


def _load_run(run_dir: Path) -> tuple[nn.Module, nn.Module | None, dict]:
    payload = RunFolder(run_dir).load_model_payload()
    model = create_model(payload["model_name"], **payload["model_kwargs"])
    model.load_state_dict(payload["state_dict"])
    unet = None
    if payload.get("unet_state_dict") is not None:
        unet = create_model("weld_seam_unet", **payload["unet_kwargs"])
        unet.load_state_dict(payload["unet_state_dict"])
        unet.eval()
    return model.eval(), unet, payload


def _recipe_from_payload(payload: dict) -> WeldRecipe:
    return WeldRecipe.model_validate(payload["recipe"])


def _prepare_for_run(run_dir: Path, data: Path, require_labels: bool):
    model, unet, payload = _load_run(run_dir)
    recipe = _recipe_from_payload(payload)
    ds = read_weld_dataset(data, recipe.data.seq_len, recipe.data.length_policy, require_labels=require_labels,
                           load_masks=require_labels)
    if ds.wavelengths_nm != payload["wavelengths_nm"]:
        raise WeldDataError(f"{data}/manifest.json: field 'wavelengths_nm' differs from the trained run's "
                            f"{payload['wavelengths_nm'][:3]}... ({len(payload['wavelengths_nm'])} channels)")
    if ds.welds_per_sample != payload["welds_per_sample"]:
        raise WeldDataError(f"{data}/manifest.json: field 'welds_per_sample' is {ds.welds_per_sample}, the run was "
                            f"trained with {payload['welds_per_sample']}")
    split = {"train": np.zeros(0, int), "test": np.arange(len(ds.samples))}
    if not recipe.segmentation.enabled:
        unet = None
    inputs = prepare_inputs(ds, recipe, split, unet=unet) if unet is not None or not recipe.segmentation.enabled else None
    if inputs is None:
        raise WeldDataError(f"{run_dir}: the checkpoint has no seam U-Net")
    prep = SpectralPrep(np.zeros(0), payload["selected_channels"], np.asarray(payload["minmax_lo"]), np.asarray(payload["minmax_hi"]))
    probs = predict_weld_probs(model, inputs.crops, prep.apply(inputs.spectra))
    return ds, probs, payload, inputs


class WeldTask:
    """The ``weld`` task (registered as such)."""

    name = "weld"
    recipe = WeldRecipe

    def fit(self, recipe: WeldRecipe, run_dir: Path, source: Path | None = None) -> dict | None:
        t = recipe.train
        set_threads(t)
        L.seed_everything(recipe.seed, workers=True, verbose=False)
        run = RunFolder(run_dir).create()
        t_total = time.perf_counter()
        t0 = time.perf_counter()
        ds = load_weld_data(recipe.data, run.path)
        data_seconds = time.perf_counter() - t0
        split = split_indices(ds.labels, recipe.data.test_fraction, t.val_fraction, recipe.data.split_seed)
        for k, idx in split.items():
            write_file_list(run.split_dir / f"{k}.txt", [Path(ds.samples[i].id) for i in idx], [ds.samples[i].label for i in idx])
        t0 = time.perf_counter()
        inputs = prepare_inputs(ds, recipe, split)
        prepare_seconds = time.perf_counter() - t0
        prep = fit_spectral_prep(inputs.spectra[split["train"]], ds.wavelengths_nm, recipe.model)
        t0 = time.perf_counter()
        model, kwargs, info = train_weld_model(recipe, inputs, prep, run.path)
        fit_seconds = time.perf_counter() - t0
        spectra = prep.apply(inputs.spectra)
        test = split["test"]
        t0 = time.perf_counter()
        probs, attn = predict_weld_probs(model, inputs.crops[test], spectra[test], with_attention=True)
        eval_seconds = time.perf_counter() - t0
        metrics = classification_metrics(inputs.labels[test], probs, ds.classes)
        selected_nm = [ds.wavelengths_nm[i] for i in prep.selected]
        run.save_model(self.name, recipe.model.name, kwargs, model.state_dict(), class_names=ds.classes,
                       recipe=recipe.model_dump(mode="json"), selected_channels=prep.selected, selected_wavelengths_nm=selected_nm,
                       minmax_lo=prep.lo.tolist(), minmax_hi=prep.hi.tolist(), wavelengths_nm=ds.wavelengths_nm,
                       welds_per_sample=ds.welds_per_sample, crop_size=[recipe.data.crop_height, recipe.data.crop_width],
                       unet_kwargs={"base": recipe.segmentation.base_channels, "depth": recipe.segmentation.depth},
                       unet_state_dict=inputs.unet.state_dict() if inputs.unet is not None else None,
                       synthetic=ds.synthetic, weights_source=info["weights_source"])
        result = {
            "task": self.name, "model": recipe.model.name, "fusion": recipe.model.fusion if recipe.model.name == "weld_fusion" else None,
            "embedding": recipe.model.embedding, "backbone": recipe.model.backbone, "weights": info["weights_source"],
            "synthetic": ds.synthetic, "seed": recipe.seed, "data": str(ds.root),
            "split": {"seed": recipe.data.split_seed, "test_fraction": recipe.data.test_fraction,
                      **{k: int(len(v)) for k, v in split.items()}},
            "selected_channels": prep.selected, "selected_wavelengths_nm": selected_nm,
            "seam_dice_test": inputs.seam_dice, "unet_train_seconds": round(inputs.unet_seconds, 1),
            "data_seconds": round(data_seconds, 1), "prepare_seconds": round(prepare_seconds, 1),
            "features_and_train_seconds": round(fit_seconds, 1), "test_inference_seconds": round(eval_seconds, 1),
            "epochs_run": info["epochs_run"],
            "best_checkpoint": info["best_checkpoint"], "train_seconds": info["train_seconds"],
            "total_seconds": None, "crop_size": [recipe.data.crop_height, recipe.data.crop_width],
            "segmented": recipe.data.segmented, "test": metrics,
        }
        # report
        rep = Report(f"defectscope weld: {recipe.model.name} ({recipe.model.fusion if recipe.model.name == 'weld_fusion' else 'baseline'})"
                     f" on {ds.root.name}", synthetic=ds.synthetic)
        rep.kv("Run", {"data": str(ds.root), "samples": len(ds.samples), "classes": len(ds.classes),
                       "split": f"stratified {1 - recipe.data.test_fraction:.0%}/{recipe.data.test_fraction:.0%}, seed {recipe.data.split_seed}",
                       "train / val / test": f"{len(split['train'])} / {len(split.get('val', []))} / {len(test)}",
                       "model": recipe.model.name, "fusion": recipe.model.fusion, "embedding": f"{recipe.model.embedding}, D={recipe.model.spectral_dim}",
                       "vision encoder": f"{recipe.model.backbone} ({info['weights_source']})",
                       "crop size (h x w)": f"{recipe.data.crop_height} x {recipe.data.crop_width}, segmented={recipe.data.segmented}",
                       "selected channels": ", ".join(f"{w:.0f} nm" for w in selected_nm),
                       "seam Dice (test)": inputs.seam_dice, "epochs run": info["epochs_run"], "train seconds": info["train_seconds"],
                       "stage seconds": f"data {data_seconds:.0f} (simulation included), seam U-Net + crops {prepare_seconds:.0f}, "
                                        f"features + training {fit_seconds:.0f}, test inference {eval_seconds:.0f}"})
        rep.kv("Test metrics", {k: metrics[k] for k in ("n", "accuracy", "weighted_precision", "weighted_recall", "weighted_f1",
                                                          "macro_f1", "macro_auroc")})
        rep.table("Per class (paper 000 Table 4 layout)", _percent_strings(table4_rows(metrics)),
                  ["class", "precision (%)", "recall (%)", "F1 (%)", "AUROC (%)", "support"])
        plot_confusion_matrix(metrics["confusion_matrix"], ds.classes, run.plots / "confusion_matrix.png")
        rep.image("plots/confusion_matrix.png", "Confusion matrix on the held-out split (rows: true class)")
        plot_roc_curves(inputs.labels[test], probs, ds.classes, run.plots / "roc_curves.png")
        rep.image("plots/roc_curves.png", "One-vs-rest ROC curves on the held-out split")
        plot_correlation(prep.corr, ds.wavelengths_nm, prep.selected, run.plots / "channel_correlation.png")
        rep.image("plots/channel_correlation.png", "Pearson correlation between the spectral channels (eq. 1) and the selected channels (red)")
        plot_spectra_examples(ds, prep.selected, run.plots / "spectra_by_class.png")
        rep.image("plots/spectra_by_class.png", "Selected channels, class means of weld 1 (raw counts)")
        if inputs.masks is not None:
            pick = [int(test[np.flatnonzero(inputs.labels[test] == c)[0]]) for c in range(len(ds.classes)) if (inputs.labels[test] == c).any()][:4]
            plot_seam_examples(ds, inputs.masks, inputs.crops, pick, run.plots / "seam_segmentation.png")
            rep.image("plots/seam_segmentation.png", f"Seam U-Net on held-out samples (mean Dice {inputs.seam_dice:.3f}) and the weld crops")
        if attn:
            pick = [int(np.flatnonzero(inputs.labels[test] == c)[0]) for c in range(len(ds.classes)) if (inputs.labels[test] == c).any()][:5]
            names = [f"{w:.0f} nm" for w in selected_nm]
            done = plot_attention_overlays(inputs.crops[test][pick], {k: v[pick] for k, v in attn.items()}, model.grid,
                                           [ds.samples[test[i]].id for i in pick], [ds.classes[inputs.labels[test[i]]] for i in pick],
                                           [ds.classes[int(probs[i].argmax())] for i in pick], names, run.plots / "attention_overlays.png")
            if done:
                rep.image("plots/attention_overlays.png", "Cross-attention weights over the weld crops (Fig. 14): per spectral "
                          "channel token, how strongly each image region attends to it")
        report_training_curves(rep, run, "Training loss and validation scores per epoch")
        result["total_seconds"] = round(time.perf_counter() - t_total, 1)
        run.write_metrics(result)
        rep.write(run.report_path)
        return result

    def evaluate(self, run_dir: Path, data: Path, out: Path | None = None) -> dict:
        """Evaluate a trained run on a labelled weld folder; writes metrics and a report to ``out``."""
        ds, probs, payload, inputs = _prepare_for_run(Path(run_dir), Path(data), require_labels=True)
        metrics = classification_metrics(ds.labels, probs, payload["class_names"])
        out = Path(out) if out else Path(run_dir) / "evaluations" / Path(data).name
        ev = RunFolder(out).create()
        ev.write_metrics({"task": self.name, "run": str(run_dir), "data": str(data), "synthetic": ds.synthetic, "test": metrics})
        rep = Report(f"defectscope evaluate: {Path(run_dir).name} on {Path(data).name}", synthetic=ds.synthetic)
        rep.table("Per class (Table 4 layout)", _percent_strings(table4_rows(metrics)), ["class", "precision (%)", "recall (%)", "F1 (%)", "AUROC (%)", "support"])
        plot_confusion_matrix(metrics["confusion_matrix"], payload["class_names"], ev.plots / "confusion_matrix.png")
        rep.image("plots/confusion_matrix.png", "Confusion matrix")
        rep.write(ev.report_path)
        return metrics

    def predict(self, run_dir: Path, inputs: list[Path], out: Path, **options) -> dict:
        """Classify every sample of one or more weld data folders (labels optional).

        Writes ``out`` as CSV: ``folder, id, class, prob_<name>...`` (one row per sample).

        Raises:
            WeldDataError: a folder is not in the format, or its channels/welds differ from the run's.
        """
        buf = io.StringIO()
        w = csv.writer(buf)
        names: list[str] | None = None
        count = 0
        for folder in map(Path, inputs):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: not a weld data folder (expected a folder with manifest.json)")
            ds, probs, payload, _ = _prepare_for_run(Path(run_dir), folder, require_labels=False)
            if names is None:
                names = payload["class_names"]
                w.writerow(["folder", "id", "class", *[f"prob_{n}" for n in names]])
            for s, p in zip(ds.samples, probs):
                w.writerow([str(folder), s.id, names[int(p.argmax())], *[f"{v:.6f}" for v in p]])
                count += 1
        write_text(out, buf.getvalue())
        return {"predicted": count, "skipped": [], "out": str(out)}


register_task(WeldTask())


def demo_recipe(n_samples: int = 603) -> dict:
    """The recipe of ``defectscope demo`` (same values as ``configs/weld_fusion.yaml``, data simulated).

    Sized for a shared 2-core CPU in <= 15 minutes: 256 px coupons, compact seam U-Net at 128 px for
    4 epochs, weld crops of 48 x 192 px, EfficientNet-Lite0 with ImageNet weights kept frozen (its
    feature maps are computed once), then up to 30 epochs of the fusion and head (5-minute cap), one
    torch thread (on an oversubscribed machine two threads were 7x slower than one).
    """
    return {"task": "weld", "seed": 0,
            "data": {"simulate": {"n_samples": n_samples, "seed": 0, "image_size": 256}, "crop_height": 48, "crop_width": 192,
                     "seg_size": 128, "test_fraction": 0.2, "split_seed": 0},
            "segmentation": {"epochs": 4, "batch_size": 8},
            "model": {"name": "weld_fusion", "fusion": "v2s", "embedding": "inverted", "spectral_dim": 96, "embed_dim": 128,
                      "backbone": "efficientnet_lite0", "pretrained": True, "freeze_backbone": True, "num_channels": 4},
            "train": {"epochs": 30, "batch_size": 16, "lr": 2.0e-4, "early_stopping_patience": 6, "max_minutes": 5.0,
                      "num_threads": 1, "augment": False, "channels_last": False}}
