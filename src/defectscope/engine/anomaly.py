"""Unsupervised inspection task (``task: anomaly``): Grad-MobileNet (paper 001) with PatchCore beside it.

Recipe (``configs/ksdd_gradmobilenet.yaml``)::

    task: anomaly
    data:  {root: ../shared/datasets/kolektorsdd, image_size: [640, 256], calibration_fraction: 0.15}
    model: {backbone: mobilenetv3_large_100, pretrained: false, grid: [10, 4], bins: 16, nu: 0.1}
    peer:  {name: patchcore, backbone: efficientnet_lite0, pretrained: true, layers: [2, 4]}
    clustering: {source: neu, root: ../shared/datasets/neu-det, reference_class: crazing}
    train: {epochs: 8, batch_size: 16, lr: 1.0e-3, augment: false}

Protocol (KolektorSDD, :func:`defectscope.data.kolektor.anomaly_protocol`): the good
images of the manifest's ``train`` split are the only images any model is fitted
on; ``calibration_fraction`` of them is kept out of network training / the
memory bank and used to fit the one-class SVM (Grad-MobileNet) and the decision
threshold (PatchCore) on normal images the models have not seen. The test set
is every ``val`` image plus the defective ``train`` images. The file lists are
written to ``RUN/split/{fit,calibration,test}.txt``.

Clustering of defect types (paper 001, section 4.4.2) runs on a separate data
source (KolektorSDD has one defect type): ``neu`` trains a second Grad-MobileNet on
one NEU class held as the normal reference and clusters held-out images of the
other five classes by t-SNE + K-means. New sources (the simulated welds) register
a loader in :data:`CLUSTERING_SOURCES`.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from defectscope.config import BaseRecipe, StrictModel, TrainConfig
from defectscope.data.images import DatasetError, iter_images, load_stack, resize_uint8
from defectscope.data.kolektor import KolektorItem, anomaly_protocol, load_mask, read_kolektor_manifest
from defectscope.data.splits import write_file_list
from defectscope.engine.classification import expand_inputs, random_flips, to_float, warmup_cosine
from defectscope.engine.run import RunFolder
from defectscope.engine.tasks import register_task
from defectscope.engine.trainer import build_trainer, report_training_curves, set_threads
from defectscope.evaluation.anomaly import (
    clustering_metrics,
    image_metrics,
    pixel_auroc,
    plot_overlays,
    plot_score_histograms,
    plot_tsne,
    tsne_kmeans,
)
from defectscope.evaluation.plots import plt, save_figure
from defectscope.evaluation.report import Report
from defectscope.models import create_model
from defectscope.models.grad_mobilenet import (
    GradientFeatureSpec,
    OneClassScorer,
    artificial_landmark,
    gradient_norm,
    input_gradient,
)
from defectscope.utils.io import write_text

# ---------------------------------------------------------------- recipe


class AnomalyData(StrictModel):
    """KolektorSDD-style data and the protocol.

    Attributes:
        root: folder with ``images/``, ``masks/``, ``manifest.csv``.
        image_size: ``[H, W]`` the images are resized to. KolektorSDD images are about
            1250 x 500 (H x W, aspect 2.5); ``[384, 160]`` keeps the aspect (2.4) at about
            0.31 of the resolution, both sides multiples of 32 (chosen for the time the
            shared 2-core CPU allows; ``[640, 256]`` is the half-resolution option).
        calibration_fraction: share of the good train images kept out of model fitting
            (one-class SVM / threshold fitted on them); 0 = the paper's setting (the SVM
            is then fitted on the training images themselves).
        max_fit, max_test: keep at most this many fitting / test images (quick runs and
            tests; the test subset keeps defective and good images in proportion).
    """

    root: str = "../shared/datasets/kolektorsdd"
    image_size: tuple[int, int] = (384, 160)
    calibration_fraction: float = Field(0.15, ge=0, lt=1)
    max_fit: int | None = Field(None, ge=2)
    max_test: int | None = Field(None, ge=2)


class GradModelConfig(StrictModel):
    """Grad-MobileNet settings (paper 001, section 4).

    Attributes:
        backbone: trunk; ``mobilenetv3_large_100`` as in the paper (random init here).
        pretrained / weights: ImageNet weights (only EfficientNet-Lite here) / a local file.
        num_classes: head outputs ``K`` (training always targets class ``target``).
        target: the fixed ``y`` of eq. 2 (0).
        grid: ``[gh, gw]`` cells of the pooled gradient-norm map in the feature.
        bins: histogram bins of the feature.
        landmark_low, landmark_high: grey-level range of the artificial landmark (0..50).
        nu, gamma: one-class SVM settings.
        ocsvm_fit_on: ``calibration`` (unseen normal images), ``fit`` (the training
            images, as in the paper) or ``both``.
        map_blur_sigma: Gaussian smoothing (input pixels) of the gradient-norm map used as
            anomaly map (0 = raw eq. 3 map); the feature always uses the raw map.
        grad_batch_size: images per backward pass when computing gradients.
    """

    backbone: str = "mobilenetv3_large_100"
    pretrained: bool = False
    weights: str | None = None
    num_classes: int = Field(2, ge=2)
    target: int = Field(0, ge=0)
    grid: tuple[int, int] = (10, 4)
    bins: int = Field(16, ge=2)
    landmark_low: int = Field(0, ge=0, le=255)
    landmark_high: int = Field(50, ge=0, le=255)
    nu: float = Field(0.1, gt=0, le=1)
    gamma: str | float = "scale"
    ocsvm_fit_on: Literal["calibration", "fit", "both"] = "calibration"
    map_blur_sigma: float = Field(4.0, ge=0)
    grad_batch_size: int = Field(8, ge=1)


class PeerConfig(StrictModel):
    """PatchCore, the peer scored on the same protocol.

    Attributes:
        enabled: run it.
        backbone, pretrained, weights: feature extractor (EfficientNet-Lite0 with real weights).
        layers: backbone stages used (indices into ``blocks``).
        coreset_ratio: memory-bank size as a share of all fitting patches (PatchCore: 1-10%).
        score_border: feature-grid cells at each edge left out of the image score (padding effects).
        image_size: ``[H, W]`` the peer's own input size (``None``: ``data.image_size``). PatchCore
            needs no training, so it can afford a larger input than Grad-MobileNet's backward passes;
            KolektorSDD's thin cracks are about 1 px wide at 0.31 of the resolution.
        max_patches: random pre-subsample of the fitting patches before the greedy coreset
            (bounds the time of the selection).
        threshold_quantile: decision threshold = this quantile of the calibration images'
            scores (1.0 = their maximum).
        batch_size: images per forward pass.
    """

    enabled: bool = True
    name: Literal["patchcore"] = "patchcore"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None
    layers: list[int] = [2, 4]
    coreset_ratio: float = Field(0.01, gt=0, le=1)
    score_border: int = Field(0, ge=0)
    image_size: tuple[int, int] | None = None
    max_patches: int = Field(200_000, ge=100)
    threshold_quantile: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, ge=1)


class ClusteringConfig(StrictModel):
    """Defect-type clustering (paper 001, section 4.4.2) on a multi-class source.

    Attributes:
        enabled: run it.
        source: a key of :data:`CLUSTERING_SOURCES` (``neu``; ``weld_sim`` once the weld
            simulator has landed).
        root: data folder of the source.
        reference_class: the class held as "normal" (trains the network, fits the SVM).
        fit_images: reference images used to train; ``per_class`` held-out images of each
            class (the reference too) are embedded and the defect classes clustered.
        image_size: square input side.
        epochs: training epochs of this second network (batch size, lr from ``train``).
        perplexity: t-SNE perplexity.
    """

    enabled: bool = True
    source: str = "neu"
    root: str = "../shared/datasets/neu-det"
    reference_class: str = "crazing"
    fit_images: int = Field(200, ge=4)
    per_class: int = Field(60, ge=2)
    image_size: int = Field(200, ge=32)
    epochs: int = Field(8, ge=1)
    perplexity: float = Field(30.0, gt=1)


class AnomalyRecipe(BaseRecipe):
    """Recipe of the ``anomaly`` task."""

    task: Literal["anomaly"] = "anomaly"
    data: AnomalyData = AnomalyData()
    model: GradModelConfig = GradModelConfig()
    peer: PeerConfig = PeerConfig()
    clustering: ClusteringConfig = ClusteringConfig()
    train: TrainConfig = TrainConfig(epochs=8, lr=1e-3, augment=False, val_fraction=0.0, early_stopping_patience=0)


# ---------------------------------------------------------------- training (section 4.1)


class GradMobileNetModule(L.LightningModule):
    """Lightning wrapper: cross-entropy toward the fixed target ``y = 0`` on normal images only.

    Args:
        model: maps ``[B, 3, H, W]`` in [0, 1] to logits ``[B, K]``.
        target: the fixed class (eq. 2).
        lr, weight_decay: AdamW; warm-up + cosine schedule per step.
        augment: random flips (off by default: the model is meant to overfit).
        channels_last: NHWC layout.
    """

    def __init__(self, model: nn.Module, target: int, lr: float, weight_decay: float, augment: bool = False,
                 channels_last: bool = True) -> None:
        super().__init__()
        self.model, self.target = model, target
        self.lr, self.weight_decay, self.augment, self.channels_last = lr, weight_decay, augment, channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        x = to_float(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.augment:
            x = random_flips(x)
        logits = self.model(x)
        y = torch.full((x.shape[0],), self.target, dtype=torch.long, device=x.device)
        loss = F.cross_entropy(logits.float(), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = warmup_cosine(opt, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train_grad_model(cfg: GradModelConfig, t: TrainConfig, x_fit: np.ndarray, run_dir: Path | None,
                     epochs: int | None = None, log_name: str = "logs") -> tuple[nn.Module, float, dict]:
    """Train a Grad-MobileNet on normal images ``x_fit`` (uint8 ``[N, 3, H, W]``) toward ``y = target``.

    Returns:
        ``(model in eval mode, fp32, contiguous; train seconds; model kwargs)``.
    """
    kwargs = {"backbone": cfg.backbone, "num_classes": cfg.num_classes}
    model = create_model("grad_mobilenet", **kwargs, pretrained=cfg.pretrained, weights=cfg.weights)
    module = GradMobileNetModule(model, cfg.target, t.lr, t.weight_decay, t.augment, t.channels_last)
    t2 = t.model_copy(update={"epochs": epochs or t.epochs, "early_stopping_patience": 0})
    if run_dir is None:
        t2 = t2.model_copy(update={"logger": []})
        trainer = L.Trainer(max_epochs=t2.epochs, accelerator=t.accelerator, devices=1, precision=t.precision,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
    else:
        trainer = build_trainer(t2, run_dir, None)
    loader = DataLoader(TensorDataset(torch.from_numpy(x_fit)), batch_size=t.batch_size, shuffle=True,
                        num_workers=0, drop_last=len(x_fit) > t.batch_size)
    start = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    model = module.model.to(memory_format=torch.contiguous_format).float().eval()
    return model, seconds, kwargs


# ---------------------------------------------------------------- gradient features (eq. 2-3, section 4.3)


def blur_maps(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of ``[N, H, W]`` maps (``sigma`` in pixels; 0 = unchanged)."""
    if sigma <= 0:
        return maps
    from torchvision.transforms.functional import gaussian_blur

    k = int(2 * round(4 * sigma) + 1)
    return gaussian_blur(maps[:, None], [k, k], [sigma, sigma])[:, 0]


def gradient_maps(model: nn.Module, x: np.ndarray, cfg: GradModelConfig, progress: bool = False,
                  label: str = "gradients") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 2-3 and the landmark for uint8 images ``[N, 3, H, W]``.

    Returns:
        ``(gnorm [N, H, W] float32, landmark [N], max softmax probability of the target [N])``.
    """
    model.eval()
    gn, lm, pt = [], [], []
    steps = range(0, len(x), cfg.grad_batch_size)
    if progress:
        from rich.progress import track

        steps = track(steps, description=label, transient=True)
    for i in steps:
        xb = to_float(torch.from_numpy(x[i : i + cfg.grad_batch_size]))
        g = input_gradient(model, xb, cfg.target)
        gn.append(gradient_norm(g))
        lm.append(artificial_landmark(xb, cfg.landmark_low, cfg.landmark_high))
        with torch.no_grad():
            pt.append(F.softmax(model(xb).float(), dim=1)[:, cfg.target])
    return torch.cat(gn), torch.cat(lm), torch.cat(pt)


# ---------------------------------------------------------------- PatchCore helpers


def patchcore_fit(cfg: PeerConfig, x_fit: np.ndarray, seed: int) -> tuple[nn.Module, dict, dict]:
    """Build PatchCore and fill its memory bank from normal images ``x_fit``; returns ``(model, kwargs, info)``."""
    kwargs = {"backbone": cfg.backbone, "layers": list(cfg.layers), "score_border": cfg.score_border}
    model = create_model("patchcore", **kwargs, pretrained=cfg.pretrained, weights=cfg.weights)
    embs = []
    for i in range(0, len(x_fit), cfg.batch_size):
        e = model.embed(to_float(torch.from_numpy(x_fit[i : i + cfg.batch_size])))
        embs.append(e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]))
    patches = torch.cat(embs)
    total = len(patches)
    g = torch.Generator().manual_seed(seed)
    if total > cfg.max_patches:
        patches = patches[torch.randperm(total, generator=g)[: cfg.max_patches]]
    size = max(1, int(round(cfg.coreset_ratio * total)))
    model.fit(patches, size, seed=seed)
    kwargs["bank_size"] = int(model.memory_bank.shape[0])
    info = {"patches": total, "presampled": int(len(patches)), "memory_bank": kwargs["bank_size"],
            "feature_dim": int(patches.shape[1]), "weights": model.backbone.weights_source}
    return model, kwargs, info


def patchcore_score(model: nn.Module, x: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, torch.Tensor]:
    """Image scores ``[N]`` and anomaly maps ``[N, H, W]`` of uint8 images."""
    s, m = [], []
    for i in range(0, len(x), batch_size):
        a, b = model(to_float(torch.from_numpy(x[i : i + batch_size])))
        s.append(a)
        m.append(b)
    return torch.cat(s).numpy(), torch.cat(m)


# ---------------------------------------------------------------- clustering sources


@dataclass
class ClusterData:
    """Images of a multi-class source for the clustering study.

    Attributes:
        fit: uint8 ``[N, 3, S, S]`` reference ("normal") images to train on.
        eval_x: uint8 ``[M, 3, S, S]`` held-out images of every class (reference included).
        eval_y: ``[M]`` class index into ``class_names``.
        class_names: names; ``class_names[reference]`` is the reference class.
        reference: index of the reference class.
        description: one line for the report.
    """

    fit: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    class_names: list[str]
    reference: int
    description: str


def neu_cluster_data(cfg: ClusteringConfig, seed: int) -> ClusterData:
    """NEU with ``cfg.reference_class`` as the normal reference.

    Draws (seeded) ``fit_images`` reference images for training and ``per_class``
    other images of every class (the reference's are disjoint from the training ones).

    Raises:
        DatasetError: unknown reference class or too few images.
    """
    from defectscope.data.images import discover_labelled_images

    items, names, _ = discover_labelled_images(cfg.root, "prefix")
    if cfg.reference_class not in names:
        raise DatasetError(f"{cfg.root}: clustering.reference_class '{cfg.reference_class}' not among {names}")
    ref = names.index(cfg.reference_class)
    rng = np.random.default_rng(seed)
    fit_paths, eval_paths, eval_y = [], [], []
    for c in range(len(names)):
        paths = [it.path for it in items if it.label == c]
        perm = rng.permutation(len(paths))
        need = cfg.per_class + (cfg.fit_images if c == ref else 0)
        if len(paths) < need:
            raise DatasetError(f"{cfg.root}: class '{names[c]}' has {len(paths)} images, {need} needed")
        if c == ref:
            fit_paths = [paths[i] for i in perm[: cfg.fit_images]]
            chosen = perm[cfg.fit_images : need]
        else:
            chosen = perm[: cfg.per_class]
        eval_paths += [paths[i] for i in chosen]
        eval_y += [c] * len(chosen)
    return ClusterData(load_stack(fit_paths, cfg.image_size), load_stack(eval_paths, cfg.image_size),
                       np.array(eval_y), names, ref,
                       f"NEU ({cfg.root}), reference (normal) class '{cfg.reference_class}': {cfg.fit_images} images "
                       f"to train, {cfg.per_class} held-out images per class, seed {seed}")


#: clustering source name -> loader ``(config, seed) -> ClusterData``; the weld simulator registers ``weld_sim``
CLUSTERING_SOURCES: dict[str, Callable[[ClusteringConfig, int], ClusterData]] = {"neu": neu_cluster_data}


def run_clustering(recipe: AnomalyRecipe, run: RunFolder) -> dict:
    """Train Grad-MobileNet on the reference class, embed held-out images, t-SNE + K-means the defect classes.

    Returns:
        metrics: ``cluster_accuracy``, ``nmi``, ``ari`` over the defect classes, the one-class
        SVM's ``image_auroc`` (reference vs the rest), sizes and seconds.

    Raises:
        KeyError: unknown ``clustering.source``.
    """
    c = recipe.clustering
    if c.source not in CLUSTERING_SOURCES:
        raise KeyError(f"clustering.source '{c.source}' unknown; known: {', '.join(sorted(CLUSTERING_SOURCES))} "
                       "(the simulated weld set registers 'weld_sim' when it lands)")
    start = time.perf_counter()
    data = CLUSTERING_SOURCES[c.source](c, recipe.seed)
    model, train_s, _ = train_grad_model(recipe.model, recipe.train, data.fit, None, epochs=c.epochs)
    gn_fit, lm_fit, _ = gradient_maps(model, data.fit, recipe.model)
    gn, lm, _ = gradient_maps(model, data.eval_x, recipe.model)
    spec = GradientFeatureSpec(tuple(recipe.model.grid), recipe.model.bins).fit_range(gn_fit)
    f_fit, f_eval = spec(gn_fit, lm_fit).numpy(), spec(gn, lm).numpy()
    scorer = OneClassScorer(recipe.model.nu, recipe.model.gamma).fit(f_fit)
    is_def = data.eval_y != data.reference
    binary = image_metrics(is_def, scorer.score(f_eval), scorer.predict(f_eval))
    defect_classes = [k for k in range(len(data.class_names)) if k != data.reference]
    emb, clusters = tsne_kmeans(f_eval[is_def], len(defect_classes), recipe.seed, c.perplexity)
    y = data.eval_y[is_def]
    metrics = clustering_metrics(y, clusters)
    plot_tsne(emb, clusters, y, data.class_names, run.plots / "tsne_clusters.png",
              f"{c.source}: t-SNE of Grad-MobileNet features of the defect classes (reference '{data.class_names[data.reference]}')")
    return {"source": c.source, "reference_class": data.class_names[data.reference],
            "classes": [data.class_names[k] for k in defect_classes], "k": len(defect_classes),
            **metrics, "one_class": {k: binary[k] for k in ("image_auroc", "image_ap", "f1")},
            "fit_images": int(len(data.fit)), "train_seconds": round(train_s, 1),
            "seconds": round(time.perf_counter() - start, 1), "description": data.description}


# ---------------------------------------------------------------- the task


def _subset_test(items: list[KolektorItem], n: int | None, seed: int) -> list[KolektorItem]:
    if n is None or n >= len(items):
        return items
    rng = np.random.default_rng(seed)
    bad = [it for it in items if it.defective]
    good = [it for it in items if not it.defective]
    nb = max(1, min(len(bad), round(n * len(bad) / len(items))))
    keep = {id(bad[i]) for i in rng.permutation(len(bad))[:nb]} | {id(good[i]) for i in rng.permutation(len(good))[: n - nb]}
    return [it for it in items if id(it) in keep]


@dataclass
class Scored:
    """Everything scored on one image set: scores, decisions, maps (``[N, H, W]``), features."""

    score: np.ndarray
    decision: np.ndarray
    maps: torch.Tensor
    features: np.ndarray | None = None
    p_target: np.ndarray | None = None


class AnomalyModels:
    """The trained pair rebuilt from a checkpoint payload (used by ``predict`` and ``evaluate``)."""

    def __init__(self, payload: dict) -> None:
        self.payload = payload
        self.cfg = GradModelConfig(**payload["grad_config"])
        self.image_size = tuple(payload["image_size"])
        self.grad = create_model("grad_mobilenet", **payload["model_kwargs"])
        self.grad.load_state_dict(payload["state_dict"])
        self.grad.eval()
        self.spec = GradientFeatureSpec(tuple(payload["feature_spec"]["grid"]), payload["feature_spec"]["bins"],
                                        tuple(payload["feature_spec"]["hist_range"]))
        self.scorer = OneClassScorer.from_state_dict(payload["ocsvm"])
        self.peer = None
        if payload.get("peer_kwargs"):
            self.peer = create_model("patchcore", **payload["peer_kwargs"], pretrained=False)
            self.peer.load_state_dict(payload["peer_state_dict"])
            self.peer.eval()
        self.peer_threshold = payload.get("peer_threshold")
        self.peer_size = tuple(payload.get("peer_image_size") or self.image_size)

    def load(self, paths: list) -> tuple[np.ndarray, np.ndarray]:
        """uint8 stacks of image files at Grad-MobileNet's size and at the peer's (the same array if equal)."""
        x = load_stack(paths, self.image_size)
        return x, (x if self.peer_size == self.image_size else load_stack(paths, self.peer_size))

    def score_grad(self, x: np.ndarray) -> Scored:
        gn, lm, pt = gradient_maps(self.grad, x, self.cfg)
        f = self.spec(gn, lm).numpy()
        s = self.scorer.score(f)
        return Scored(s, s > 0, blur_maps(gn, self.cfg.map_blur_sigma), f, pt.numpy())

    def score_peer(self, x: np.ndarray) -> Scored | None:
        """PatchCore scores of uint8 images ``[N, 3, *peer_size]``; maps at ``peer_size``."""
        if self.peer is None:
            return None
        s, m = patchcore_score(self.peer, x)
        return Scored(s, s > self.peer_threshold, m)


def _maps_pixel_auroc(maps: torch.Tensor, masks: np.ndarray, stride: int = 2) -> float | None:
    return pixel_auroc(maps[:, ::stride, ::stride].numpy(), masks[:, ::stride, ::stride])


def _pixel_stride(size: tuple[int, int]) -> int:
    """Pixel subsampling step of the pixel AUROC: 2 up to 640 rows, more above (bounded memory and time)."""
    return 2 * max(1, size[0] // 640)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Anomaly maps ``[N, h, w]`` resized (area average, or bilinear when enlarging) to ``[N, H, W]``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    mode = "area" if maps.shape[-2] >= size[0] else "bilinear"
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode=mode)[:, 0]


def write_anomaly_report(run: RunFolder, title: str, info: dict, metrics: dict, y: np.ndarray,
                         test_items: list[KolektorItem], x_test: np.ndarray, masks: np.ndarray,
                         grad: Scored, peer: Scored | None, grad_thr: float, clustering: dict | None) -> None:
    """The report: results table, score histograms, overlays against true masks, t-SNE, curves."""
    rep = Report(title)
    rep.kv("Run", info)
    rows = [{"method": "Grad-MobileNet + one-class SVM", **metrics["test"]}]
    if peer is not None:
        rows.append({"method": "PatchCore (peer)", **metrics["peer"]})
    rep.table("Test metrics (defective = positive class)", rows,
              ["method", "image_auroc", "image_ap", "f1", "precision", "recall", "accuracy", "pixel_auroc", "n", "n_defective"])
    hist_rows = [("Grad-MobileNet (-OCSVM decision)", grad.score, y, grad_thr)]
    if peer is not None:
        hist_rows.append(("PatchCore (max patch distance)", peer.score, y, metrics["peer_threshold"]))
    plot_score_histograms(hist_rows, run.plots / "score_histograms.png")
    rep.image("plots/score_histograms.png", "Score histograms of good and defective test images; dashed: the decision")
    # overlays: the 8 most anomalous defective images by Grad-MobileNet score + 2 good ones
    bad = np.flatnonzero(y == 1)
    good = np.flatnonzero(y == 0)
    pick = list(bad[np.argsort(-grad.score[bad])][:4]) + list(bad[np.argsort(grad.score[bad])][:2]) + list(good[:2])
    imgs = x_test[pick].transpose(0, 2, 3, 1)
    maps = [("Grad-MobileNet |dL/dx|", grad.maps[pick].numpy())]
    if peer is not None:
        maps.append(("PatchCore", peer.maps[pick].numpy()))
    titles = [f"{test_items[i].id} {'defect' if y[i] else 'good'}" for i in pick]
    plot_overlays(imgs, masks[pick], maps, titles, run.plots / "overlays.png")
    rep.image("plots/overlays.png", "Anomaly maps over the image; true mask outline in red/white "
              "(4 highest- and 2 lowest-scored defective images by Grad-MobileNet, 2 good ones)")
    if clustering is not None:
        rep.kv("Defect-type clustering (t-SNE + K-means, Hungarian-matched)",
               {k: v for k, v in clustering.items() if not isinstance(v, (dict, list))})
        rep.image("plots/tsne_clusters.png", "t-SNE of the gradient features, coloured by cluster and by true label")
    rep.text("Grad-MobileNet needs a backward pass per image (eq. 2), so it cannot be exported to ONNX as a "
             "forward-only graph; PatchCore's feature extractor can.")
    report_training_curves(rep, run, "Training loss toward y = 0 (normal images only)")
    rep.write(run.report_path)


class AnomalyTask:
    """The ``anomaly`` task (registered as such)."""

    name = "anomaly"
    recipe = AnomalyRecipe

    def fit(self, recipe: AnomalyRecipe, run_dir: Path, source: Path | None = None) -> dict:
        t = recipe.train
        set_threads(t)
        L.seed_everything(recipe.seed, workers=True, verbose=False)
        run = RunFolder(run_dir).create()
        d, m = recipe.data, recipe.model
        wall = time.perf_counter()
        items = read_kolektor_manifest(d.root)
        parts = anomaly_protocol(items, d.calibration_fraction, recipe.seed)
        if d.max_fit:
            parts["fit"] = parts["fit"][: d.max_fit]
            parts["calibration"] = parts["calibration"][: max(2, d.max_fit // 4)] if parts["calibration"] else []
        parts["test"] = _subset_test(parts["test"], d.max_test, recipe.seed)
        assert not any(it.defective for it in parts["fit"] + parts["calibration"]), "defective image in fitting data"
        for k, v in parts.items():
            write_file_list(run.split_dir / f"{k}.txt", [it.image for it in v],
                            ["defective" if it.defective else "good" for it in v])
        size = tuple(d.image_size)
        x = {k: load_stack([it.image for it in v], size, progress=t.progress) for k, v in parts.items()}
        y = np.array([int(it.defective) for it in parts["test"]])
        masks = np.stack([load_mask(it.mask, size) for it in parts["test"]])

        # Grad-MobileNet (section 4.1-4.4.1)
        grad_model, train_s, kwargs = train_grad_model(m, t, x["fit"], run.path)
        gn_fit, lm_fit, pt_fit = gradient_maps(grad_model, x["fit"], m, t.progress, "gradients (fit)")
        spec = GradientFeatureSpec(tuple(m.grid), m.bins).fit_range(gn_fit)
        feats = {"fit": spec(gn_fit, lm_fit).numpy()}
        del gn_fit
        if len(x["calibration"]):
            gn_cal, lm_cal, _ = gradient_maps(grad_model, x["calibration"], m)
            feats["calibration"] = spec(gn_cal, lm_cal).numpy()
        gn_test, lm_test, pt_test = gradient_maps(grad_model, x["test"], m, t.progress, "gradients (test)")
        feats["test"] = spec(gn_test, lm_test).numpy()
        fit_on = m.ocsvm_fit_on if "calibration" in feats else "fit"
        train_feats = {"fit": feats["fit"], "calibration": feats.get("calibration"),
                       "both": np.concatenate([feats["fit"], feats.get("calibration", feats["fit"][:0])])}[fit_on]
        scorer = OneClassScorer(m.nu, m.gamma).fit(train_feats)
        gs = scorer.score(feats["test"])
        grad = Scored(gs, gs > 0, blur_maps(gn_test, m.map_blur_sigma), feats["test"], pt_test.numpy())
        del gn_test
        test_metrics = {**image_metrics(y, grad.score, grad.decision),
                        "pixel_auroc": _maps_pixel_auroc(grad.maps, masks)}
        grad_seconds = time.perf_counter() - wall

        # PatchCore (peer)
        peer = None
        peer_payload: dict = {}
        result_peer: dict = {}
        if recipe.peer.enabled:
            p0 = time.perf_counter()
            psize = tuple(recipe.peer.image_size or size)
            xp = x if psize == size else {k: load_stack([it.image for it in v], psize, progress=t.progress)
                                          for k, v in parts.items()}
            pmasks = masks if psize == size else np.stack([load_mask(it.mask, psize) for it in parts["test"]])
            pc, pkw, pinfo = patchcore_fit(recipe.peer, xp["fit"], recipe.seed)
            ref = xp["calibration"] if len(xp["calibration"]) else xp["fit"]
            ref_scores, _ = patchcore_score(pc, ref, recipe.peer.batch_size)
            thr = float(np.quantile(ref_scores, recipe.peer.threshold_quantile))
            ps, pm = patchcore_score(pc, xp["test"], recipe.peer.batch_size)
            peer = Scored(ps, ps > thr, resize_maps(pm, size))
            result_peer = {**image_metrics(y, ps, peer.decision),
                           "pixel_auroc": _maps_pixel_auroc(pm, pmasks, _pixel_stride(psize)),
                           "image_size": list(psize), "threshold": thr,
                           "threshold_from": "calibration" if len(x["calibration"]) else "fit",
                           **pinfo, "seconds": round(time.perf_counter() - p0, 1)}
            peer_payload = {"peer_kwargs": pkw, "peer_state_dict": pc.state_dict(), "peer_threshold": thr,
                            "peer_image_size": list(psize), "peer_config": recipe.peer.model_dump(mode="json")}
            del xp, pm, pmasks

        clustering = run_clustering(recipe, run) if recipe.clustering.enabled else None

        run.save_model(self.name, "grad_mobilenet", kwargs, grad_model.state_dict(), image_size=list(size),
                       grad_config=m.model_dump(mode="json"),
                       feature_spec={"grid": list(spec.grid), "bins": spec.bins, "hist_range": list(spec.hist_range)},
                       ocsvm=scorer.state_dict(), normalisation="inside model: input RGB in [0, 1]",
                       weights_source=grad_model.backbone.weights_source, **peer_payload)
        protocol = {"fit": "good images of the manifest's train split"
                           + (f" minus a {d.calibration_fraction:.0%} calibration draw (seed {recipe.seed})" if d.calibration_fraction else ""),
                    "calibration": "held-out good train images: one-class SVM fit (ocsvm_fit_on="
                                   f"{fit_on}) and PatchCore threshold",
                    "test": "every val image + the defective train images",
                    "files": "split/fit.txt, split/calibration.txt, split/test.txt",
                    "defective_in_fit": 0}
        result = {
            "task": self.name,
            "model": "grad_mobilenet",
            "backbone": m.backbone,
            "weights": grad_model.backbone.weights_source,
            "seed": recipe.seed,
            "image_size": list(size),
            "protocol": protocol,
            "split": {k: int(len(v)) for k, v in parts.items()} | {"test_defective": int(y.sum())},
            "train_seconds": round(train_s, 1),
            "grad_seconds_total": round(grad_seconds, 1),
            "wall_seconds": round(time.perf_counter() - wall, 1),
            "feature": {"dim": spec.dim, "grid": list(spec.grid), "bins": spec.bins, "hist_range": list(spec.hist_range),
                        "layout": "log10 pooled |dL/dx| map (grid cells), histogram of log10 |dL/dx| (shares), landmark"},
            "ocsvm": {"nu": m.nu, "gamma": m.gamma, "fit_on": fit_on, "n_fit": int(len(train_feats))},
            "p_target_fit_mean": float(pt_fit.mean()),
            "test": test_metrics,
            "peer_name": recipe.peer.name if peer is not None else None,
            "peer": result_peer or None,
            "peer_threshold": result_peer.get("threshold"),
            "clustering": clustering,
        }
        result["wall_seconds"] = round(time.perf_counter() - wall, 1)
        run.write_metrics(result)
        info = {"data": d.root, "input size (H x W)": f"{size[0]} x {size[1]}", "trunk": m.backbone,
                "trunk weights": grad_model.backbone.weights_source,
                "peer": f"PatchCore on {recipe.peer.backbone} ({result_peer.get('weights', '-')})" if peer else "off",
                "fit / calibration / test images": f"{len(parts['fit'])} / {len(parts['calibration'])} / {len(parts['test'])} "
                                                   f"({int(y.sum())} defective in test, none in fitting)",
                "one-class SVM fitted on": fit_on, "epochs": t.epochs, "train seconds": round(train_s, 1),
                "wall seconds": result["wall_seconds"], "seed": recipe.seed}
        write_anomaly_report(run, f"defectscope anomaly: Grad-MobileNet vs PatchCore on {Path(d.root).name}", info,
                             result, y, parts["test"], x["test"], masks, grad, peer, 0.0, clustering)
        return result

    def evaluate(self, run_dir: Path, data: Path, out: Path | None = None) -> dict:
        """Score every image of a KolektorSDD-style folder (manifest + masks) with a trained run."""
        models = AnomalyModels(RunFolder(run_dir).load_model_payload())
        items = read_kolektor_manifest(data)
        x, xp = models.load([it.image for it in items])
        y = np.array([int(it.defective) for it in items])
        masks = np.stack([load_mask(it.mask, models.image_size) for it in items])
        g = models.score_grad(x)
        metrics = {**image_metrics(y, g.score, g.decision), "pixel_auroc": _maps_pixel_auroc(g.maps, masks)}
        p = models.score_peer(xp)
        pmasks = masks if models.peer_size == models.image_size else \
            np.stack([load_mask(it.mask, models.peer_size) for it in items])
        out = Path(out) if out else Path(run_dir) / "evaluations" / Path(data).name
        ev = RunFolder(out).create()
        res = {"task": self.name, "run": str(run_dir), "data": str(data), "test": metrics,
               "peer": ({**image_metrics(y, p.score, p.decision),
                         "pixel_auroc": _maps_pixel_auroc(p.maps, pmasks, _pixel_stride(models.peer_size))}
                        if p is not None else None)}
        ev.write_metrics(res)
        return metrics

    def predict(self, run_dir: Path, inputs: list[Path], out: Path, **options) -> dict:
        """Score image files: CSV ``file, score, decision, peer_score, peer_decision, map, error``.

        A PNG per image (image, Grad-MobileNet map, PatchCore map) is written to
        ``<out stem>_maps/``; unreadable files are skipped and reported.
        """
        models = AnomalyModels(RunFolder(run_dir).load_model_payload())
        files = expand_inputs(inputs)
        out = Path(out)
        map_dir = out.parent / f"{out.stem}_maps"
        ok, arrays, peer_arrays, skipped = [], [], [], []
        for f, img, err in iter_images(files):
            if err:
                skipped.append((f, err))
                continue
            arrays.append(resize_uint8(img, models.image_size).transpose(2, 0, 1))
            peer_arrays.append(arrays[-1] if models.peer_size == models.image_size
                               else resize_uint8(img, models.peer_size).transpose(2, 0, 1))
            ok.append(f)
        rows = []
        if arrays:
            x = np.stack(arrays)
            g = models.score_grad(x)
            p = models.score_peer(np.stack(peer_arrays))
            pmaps = resize_maps(p.maps, models.image_size) if p else None
            for i, f in enumerate(ok):
                panels = [("Grad-MobileNet |dL/dx|", g.maps[i].numpy())] + ([("PatchCore", pmaps[i].numpy())] if p else [])
                png = map_dir / f"{f.stem}.png"
                fig, axes = plt.subplots(1, 1 + len(panels), figsize=(2.2 * (1 + len(panels)), 5))
                axes[0].imshow(x[i].transpose(1, 2, 0))
                axes[0].set_title(f"{'DEFECTIVE' if g.decision[i] else 'normal'}\nscore {g.score[i]:.3f}", fontsize=8)
                for ax, (name, mp) in zip(axes[1:], panels):
                    ax.imshow(mp, cmap="jet")
                    ax.set_title(name, fontsize=7)
                for ax in axes:
                    ax.set_xticks([])
                    ax.set_yticks([])
                save_figure(fig, png)
                rows.append([str(f), f"{g.score[i]:.6f}", "defective" if g.decision[i] else "normal",
                             f"{p.score[i]:.6f}" if p else "", ("defective" if p.decision[i] else "normal") if p else "",
                             str(png), ""])
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "score", "decision", "peer_score", "peer_decision", "map", "error"])
        w.writerows(rows)
        for f, err in skipped:
            w.writerow([str(f), "", "", "", "", "", err])
        write_text(out, buf.getvalue())
        return {"predicted": len(ok), "skipped": skipped, "out": str(out), "maps": str(map_dir)}


register_task(AnomalyTask())
