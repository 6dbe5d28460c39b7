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
on; ``calibration_fraction`` of them (a seeded draw, flagged once per image) is kept
out of network training / the memory bank and used to fit the one-class SVM
(Grad-MobileNet) and the decision threshold (PatchCore) on normal images the models
have not seen. The test set is every ``val`` image plus the defective ``train``
images. The file lists are written to ``RUN/split/{fit,calibration,train,test}.txt``
(``train`` = fit + calibration).

Cross-validation (``--folds K``, :func:`defectscope.engine.pipeline.cross_validate`) runs on
the manifest's ``train`` split (``val`` is the data's own test split and is left out):
folds are stratified over good and defective images; fold ``k`` fits on the good images
of the other folds (their calibration-flagged ones fit the SVM / threshold) and predicts
all of its own images, good and defective. Defective images are never fitted on, and
every image is predicted exactly once.

There is no validation part and no checkpoint selection (monitor: none): Grad-MobileNet
is trained for ``train.epochs`` to overfit the normal images and its last weights are
kept, so ``train.val_fraction`` and ``train.early_stopping_patience`` must be 0.

Clustering of defect types (paper 001, section 4.4.2) runs on a separate data
source (KolektorSDD has one defect type), once, in a single-split run: ``neu`` trains
a second Grad-MobileNet on one NEU class held as the normal reference and clusters
held-out images of the other five classes by t-SNE + K-means. New sources (the
simulated welds) register a loader in :data:`CLUSTERING_SOURCES`.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from defectscope.config import BaseRecipe, StrictModel, TrainConfig
from defectscope.data.images import DatasetError, expand_inputs, iter_images, load_stack, resize_uint8
from defectscope.data.kolektor import KolektorItem, anomaly_protocol, load_mask, read_kolektor_manifest
from defectscope.data.mvtec import load_item_mask
from defectscope.data.splits import write_file_list
from defectscope.engine.crossval import flatten_scalars
from defectscope.engine.pipeline import Fitted, Predictions, Samples, TaskHooks, crossval_table, report_sections
from defectscope.engine.run import RunError, RunFolder
from defectscope.engine.tasks import register_task
from defectscope.engine.trainer import fit_lightning, report_training_curves
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
from defectscope.models.grad_mobilenet import GradientFeatureSpec, OneClassScorer, blur_maps, gradient_maps
from defectscope.models.grad_mobilenet.lightning_model import GradMobileNetModule
from defectscope.models.patchcore import patchcore_fit, patchcore_score
from defectscope.utils.io import write_text

# ---------------------------------------------------------------- recipe


class AnomalyData(StrictModel):
    """KolektorSDD-style data and the protocol.

    Attributes:
        root: folder with ``images/``, ``masks/``, ``manifest.csv`` (``layout: kolektor``), or an
            MVTec AD category folder ``train/good``, ``test/<defect>``, ``ground_truth/<defect>``
            (``layout: mvtec``; good test images have no mask, pixel metrics use the defect masks).
        image_size: ``[H, W]`` the images are resized to. KolektorSDD images are about
            1250 x 500 (H x W, aspect 2.5); ``[384, 160]`` keeps the aspect (2.4) at about
            0.31 of the resolution, both sides multiples of 32 (chosen for the time the
            shared 2-core CPU allows; ``[640, 256]`` is the half-resolution option).
        calibration_fraction: share of the good train images kept out of model fitting
            (one-class SVM / threshold fitted on them); 0 = the paper's setting (the SVM
            is then fitted on the training images themselves).
        max_fit, max_test: keep at most this many fitting / test images of the protocol (quick
            runs and tests; the test subset keeps defective and good images in proportion). They
            act when the images are read, so cross-validation runs on the kept train-split images.
    """

    root: str = "../shared/datasets/kolektorsdd"
    layout: Literal["kolektor", "mvtec"] = "kolektor"
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




class AnomalyTrainConfig(TrainConfig):
    """:class:`TrainConfig` of Grad-MobileNet's network training (PatchCore is not trained).

    No validation part and no early stopping: the network is trained for ``epochs`` to overfit
    the normal images and its last weights are kept (the checkpoint monitor is none), so
    ``val_fraction`` and ``early_stopping_patience`` are 0 and any other value is refused.
    """

    val_fraction: float = 0.0
    early_stopping_patience: int = 0

    @field_validator("val_fraction", "early_stopping_patience")
    @classmethod
    def _no_validation_part(cls, v: float) -> float:
        if v != 0:
            raise ValueError("must be 0 for task 'anomaly': Grad-MobileNet has no validation part or checkpoint "
                             "selection (it is trained to overfit the good images; data.calibration_fraction "
                             "holds good images out for the one-class SVM and the PatchCore threshold)")
        return v


class AnomalyRecipe(BaseRecipe):
    """Recipe of the ``anomaly`` task; no checkpoint selection (monitor: none, the last weights are kept)."""

    task: Literal["anomaly"] = "anomaly"
    data: AnomalyData = AnomalyData()
    model: GradModelConfig = GradModelConfig()
    peer: PeerConfig = PeerConfig()
    clustering: ClusteringConfig = ClusteringConfig()
    train: AnomalyTrainConfig = AnomalyTrainConfig(epochs=8, lr=1e-3, augment=False)


# ---------------------------------------------------------------- training (section 4.1)


def fit_grad_mobilenet(cfg: GradModelConfig, t: TrainConfig, x_fit: np.ndarray,
                       run_dir: Path, resume: bool = False) -> tuple[nn.Module, dict, dict] | None:
    """Train a Grad-MobileNet on normal images ``x_fit`` (uint8 ``[N, 3, H, W]``) toward ``y = target``.

    Uses :func:`defectscope.engine.trainer.fit_lightning` without a validation loader (the last
    weights are kept); logs and Lightning checkpoints go to ``run_dir``.

    Returns:
        ``(model in eval mode, fp32, contiguous; model_kwargs; training info)``, ``None`` on DDP
        ranks other than 0.
    """
    kwargs = {"backbone": cfg.backbone, "num_classes": cfg.num_classes}
    model = create_model("grad_mobilenet", **kwargs, pretrained=cfg.pretrained, weights=cfg.weights)
    module = GradMobileNetModule(model, cfg.target, t.lr, t.weight_decay, t.augment, t.channels_last)
    loader = DataLoader(TensorDataset(torch.from_numpy(x_fit)), batch_size=t.batch_size, shuffle=True,
                        num_workers=0, drop_last=len(x_fit) > t.batch_size)
    info = fit_lightning(module, loader, None, t, run_dir, None, resume=resume)
    if info is None:
        return None
    model = module.model.to(memory_format=torch.contiguous_format).float().eval()
    return model, kwargs, info


def _features(model: nn.Module, x: np.ndarray, cfg: GradModelConfig, progress: bool = False,
              label: str = "gradients") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gradient_maps(model, x, cfg.target, cfg.landmark_low, cfg.landmark_high, cfg.grad_batch_size,
                         progress, label)


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

    The second network trains in a temporary folder (no logs or checkpoints kept in the run);
    the t-SNE figure goes to ``RUN/plots/tsne_clusters.png``.

    Returns:
        metrics: ``cluster_accuracy``, ``nmi``, ``ari`` over the defect classes, the one-class
        SVM's ``image_auroc`` (reference vs the rest), sizes and seconds.

    Raises:
        KeyError: unknown ``clustering.source``.
    """
    c, m = recipe.clustering, recipe.model
    if c.source not in CLUSTERING_SOURCES:
        raise KeyError(f"clustering.source '{c.source}' unknown; known: {', '.join(sorted(CLUSTERING_SOURCES))} "
                       "(the simulated weld set registers 'weld_sim' when it lands)")
    start = time.perf_counter()
    data = CLUSTERING_SOURCES[c.source](c, recipe.seed)
    t = recipe.train.model_copy(update={"epochs": c.epochs, "logger": [], "devices": 1, "strategy": "auto",
                                        "max_minutes": None})
    with tempfile.TemporaryDirectory(prefix="defectscope-clustering-") as tmp:
        model, _, info = fit_grad_mobilenet(m, t, data.fit, Path(tmp))
    gn_fit, lm_fit, _ = _features(model, data.fit, m)
    gn, lm, _ = _features(model, data.eval_x, m)
    spec = GradientFeatureSpec(tuple(m.grid), m.bins).fit_range(gn_fit)
    f_fit, f_eval = spec(gn_fit, lm_fit).numpy(), spec(gn, lm).numpy()
    scorer = OneClassScorer(m.nu, m.gamma).fit(f_fit)
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
            "fit_images": int(len(data.fit)), "train_seconds": info["train_seconds"],
            "seconds": round(time.perf_counter() - start, 1), "description": data.description}


# ---------------------------------------------------------------- samples (the KolektorSDD protocol)




def protocol_items(d: AnomalyData, seed: int) -> tuple[list[KolektorItem], np.ndarray]:
    """The images the task reads, in manifest order, and which good ones are calibration images.

    :func:`defectscope.data.kolektor.anomaly_protocol` draws the calibration images (seed
    ``seed``); ``max_fit`` keeps the first ``max_fit`` fitting and ``max(2, max_fit // 4)``
    calibration images, ``max_test`` a proportional subset of the protocol's test images.

    Returns:
        ``(items, calibration [N] bool)``.

    Raises:
        DatasetError: a bad manifest (named), no good train image or an empty test set.
    """
    if d.layout == "mvtec":
        from defectscope.data.mvtec import mvtec_protocol, read_mvtec

        items = read_mvtec(d.root)
        parts = mvtec_protocol(items, d.calibration_fraction, seed)
    else:
        items = read_kolektor_manifest(d.root)
        parts = anomaly_protocol(items, d.calibration_fraction, seed)
    fit, cal = parts["fit"], parts["calibration"]
    if d.max_fit:
        fit = fit[: d.max_fit]
        cal = cal[: max(2, d.max_fit // 4)] if cal else []
    test = _subset_test(parts["test"], d.max_test, seed)
    keep = {id(it) for it in fit + cal + test}
    kept = [it for it in items if id(it) in keep]
    cal_ids = {id(it) for it in cal}
    return kept, np.array([id(it) in cal_ids for it in kept], dtype=bool)


def _subset_test(items: list[KolektorItem], n: int | None, seed: int) -> list[KolektorItem]:
    if n is None or n >= len(items):
        return items
    rng = np.random.default_rng(seed)
    bad = [it for it in items if it.defective]
    good = [it for it in items if not it.defective]
    nb = max(1, min(len(bad), round(n * len(bad) / len(items))))
    keep = {id(bad[i]) for i in rng.permutation(len(bad))[:nb]} | {id(good[i]) for i in rng.permutation(len(good))[: n - nb]}
    return [it for it in items if id(it) in keep]


def _is_single_split(samples: Samples, parts: dict[str, np.ndarray]) -> bool:
    """A single-split fit covers every sample (train + test); a cross-validation fold never does
    (it leaves out the other folds' defective images and the ``val`` split)."""
    return sum(len(v) for v in parts.values()) == len(samples)


# ---------------------------------------------------------------- the trained pair


@dataclass
class Scored:
    """Everything scored on one image set: scores, decisions, maps (``[N, H, W]``), features."""

    score: np.ndarray
    decision: np.ndarray
    maps: torch.Tensor
    features: np.ndarray | None = None
    p_target: np.ndarray | None = None


class NestedCheckpoint(RunFolder):
    """A model stored inside a run's ``model.ckpt`` payload (the anomaly task's peer), rebuilt by the
    one loader :meth:`RunFolder.load_model` (errors name the run's ``model.ckpt``).

    Args:
        run_dir: the run folder holding ``model.ckpt``.
        payload: the nested ``{"model_name", "model_kwargs", "state_dict", ...}``.
    """

    def __init__(self, run_dir: str | Path, payload: dict) -> None:
        super().__init__(run_dir)
        self._payload = payload

    def load_model_payload(self) -> dict:
        return self._payload


class AnomalyModels:
    """The trained pair: Grad-MobileNet + its one-class SVM, and PatchCore with its threshold.

    Built by ``fit_model`` (the run's own predictions) or by :meth:`load` from a run folder
    (``predict`` / ``evaluate``); both score with the same code, so reloaded scores are the run's.

    Args:
        grad: Grad-MobileNet in eval mode; cfg: its settings; image_size: ``(H, W)`` of its input.
        spec: the fitted feature layout; scorer: the fitted one-class SVM (threshold 0).
        peer: PatchCore in eval mode or ``None``; peer_threshold: its decision threshold;
        peer_size: ``(H, W)`` of its input; peer_batch_size: images per forward pass.
    """

    def __init__(self, grad: nn.Module, cfg: GradModelConfig, image_size: tuple[int, int], spec: GradientFeatureSpec,
                 scorer: OneClassScorer, peer: nn.Module | None = None, peer_threshold: float | None = None,
                 peer_size: tuple[int, int] | None = None, peer_batch_size: int = 16) -> None:
        self.grad, self.cfg, self.image_size, self.spec, self.scorer = grad, cfg, tuple(image_size), spec, scorer
        self.peer, self.peer_threshold = peer, peer_threshold
        self.peer_size = tuple(peer_size or image_size)
        self.peer_batch_size = peer_batch_size

    @classmethod
    def load(cls, run_dir: str | Path) -> "AnomalyModels":
        """Rebuild the pair from ``RUN/model.ckpt`` (tensors and plain data only).

        Raises:
            RunError: missing/unreadable checkpoint, or one that lacks the anomaly task's fields.
        """
        folder = RunFolder(run_dir)
        grad, payload = folder.load_model()
        try:
            cfg = GradModelConfig(**payload["grad_config"])
            fs = payload["feature_spec"]
            spec = GradientFeatureSpec(tuple(fs["grid"]), fs["bins"], tuple(fs["hist_range"]))
            scorer = OneClassScorer.from_state(payload["ocsvm"], str(folder.model_path))
            peer_payload = payload.get("peer")
            peer = NestedCheckpoint(folder.path, peer_payload).load_model()[0] if peer_payload else None
            return cls(grad, cfg, tuple(payload["image_size"]), spec, scorer, peer,
                       peer_payload["threshold"] if peer_payload else None,
                       tuple(peer_payload["image_size"]) if peer_payload else None,
                       int(peer_payload["config"]["batch_size"]) if peer_payload else 16)
        except (KeyError, TypeError, ValueError) as exc:
            raise RunError(f"{folder.model_path}: not an anomaly-task checkpoint of this version ({exc})") from None

    def load_images(self, paths: list) -> tuple[np.ndarray, np.ndarray]:
        """uint8 stacks of image files at Grad-MobileNet's size and at the peer's (the same array if equal)."""
        x = load_stack(paths, self.image_size)
        return x, (x if self.peer_size == self.image_size else load_stack(paths, self.peer_size))

    def score_grad(self, x: np.ndarray, progress: bool = False) -> Scored:
        """Grad-MobileNet on uint8 images ``[N, 3, H, W]``: SVM scores (> 0 defective), blurred maps, features."""
        gn, lm, pt = _features(self.grad, x, self.cfg, progress, "gradients (test)")
        f = self.spec(gn, lm).numpy()
        s = self.scorer.score(f)
        return Scored(s, s > 0, blur_maps(gn, self.cfg.map_blur_sigma), f, pt.numpy())

    def score_peer(self, x: np.ndarray) -> Scored | None:
        """PatchCore scores of uint8 images ``[N, 3, *peer_size]``; maps at ``peer_size``."""
        if self.peer is None:
            return None
        s, m = patchcore_score(self.peer, x, self.peer_batch_size)
        return Scored(s, s > self.peer_threshold, m)


def _maps_pixel_auroc(maps: np.ndarray | torch.Tensor, masks: np.ndarray, stride: int = 2) -> float | None:
    return pixel_auroc(np.asarray(maps)[:, ::stride, ::stride], masks[:, ::stride, ::stride])


def _pixel_stride(size: tuple[int, int]) -> int:
    """Pixel subsampling step of the pixel AUROC: 2 up to 640 rows, more above (bounded memory and time)."""
    return 2 * max(1, size[0] // 640)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Anomaly maps ``[N, h, w]`` resized (area average, or bilinear when enlarging) to ``[N, H, W]``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    mode = "area" if maps.shape[-2] >= size[0] else "bilinear"
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode=mode)[:, 0]



# ---------------------------------------------------------------- report

#: cross-validation table columns (``peer.*``: PatchCore's figures)
CV_KEYS = ["n", "n_defective", "image_auroc", "image_ap", "f1", "pixel_auroc",
           "peer.image_auroc", "peer.image_ap", "peer.f1", "peer.pixel_auroc"]


def write_anomaly_report(run: RunFolder, title: str, info: dict, metrics: dict, samples: Samples, idx: np.ndarray,
                         raw: dict, peer_threshold: float | None, image_size: tuple[int, int],
                         clustering: dict | None = None, crossval: dict | None = None, decisions: dict | None = None) -> None:
    """The report: results table (and fold table), score histograms, overlays against true masks, t-SNE, curves.

    Args:
        metrics: Grad-MobileNet's figures with PatchCore's under ``peer`` (``None`` when off).
        samples, idx: the images scored (positions into ``samples``), in the order of ``raw``.
        raw: :meth:`AnomalyTask.predict_samples`' arrays (``score``, ``decision``, ``maps``,
            ``peer_score``, ``peer_maps`` ...).
        peer_threshold: PatchCore's decision drawn in the histogram (``None``: one per fold).
        crossval: ``{"folds", "mean", "std"}`` of a cross-validation (adds the fold table).
    """
    rep = Report(title)
    rep.kv("Run", info)
    peer = metrics.get("peer")
    if crossval:
        rep.table("Cross-validation: held-out figures per fold (peer.* = PatchCore)", crossval_table(
            {"folds": [flatten_scalars(f) for f in crossval["folds"]], "mean": crossval["mean"], "std": crossval["std"],
             "pooled": flatten_scalars(metrics)}, CV_KEYS))
    rows = [{"method": "Grad-MobileNet + one-class SVM", **{k: v for k, v in metrics.items() if k != "peer"}}]
    if peer:
        rows.append({"method": "PatchCore (peer)", **peer})
    rep.table(("Pooled out-of-fold" if crossval else "Test") + " metrics (defective = positive class)", rows,
              ["method", "image_auroc", "image_ap", "f1", "precision", "recall", "accuracy", "pixel_auroc", "n", "n_defective"])
    y = samples.labels[idx]
    hist_rows = [("Grad-MobileNet (-OCSVM decision)", raw["score"], y, 0.0)]
    if peer:
        hist_rows.append(("PatchCore (max patch distance)", raw["peer_score"], y, peer_threshold))
    plot_score_histograms(hist_rows, run.plots / "score_histograms.png")
    rep.image("plots/score_histograms.png", "Score histograms of good and defective test images; dashed: the decision")
    # overlays: the 4 most and 2 least anomalous defective images by Grad-MobileNet score + 2 good ones
    bad = np.flatnonzero(y == 1)
    good = np.flatnonzero(y == 0)
    pick = list(bad[np.argsort(-raw["score"][bad])][:4]) + list(bad[np.argsort(raw["score"][bad])][:2]) + list(good[:2])
    pos = idx[pick]
    imgs = samples.data["x"][pos].transpose(0, 2, 3, 1)
    maps = [("Grad-MobileNet |dL/dx|", raw["maps"][pick])]
    if peer:
        maps.append(("PatchCore", resize_maps(torch.from_numpy(raw["peer_maps"][pick]), image_size).numpy()))
    titles = [f"{samples.columns['id'][i]} {'defect' if samples.labels[i] else 'good'}" for i in pos]
    plot_overlays(imgs, samples.data["masks"][pos], maps, titles, run.plots / "overlays.png")
    rep.image("plots/overlays.png", "Anomaly maps over the image; true mask outline in red/white "
              "(4 highest- and 2 lowest-scored defective images by Grad-MobileNet, 2 good ones)")
    if clustering is not None:
        rep.kv("Defect-type clustering (t-SNE + K-means, Hungarian-matched)",
               {k: v for k, v in clustering.items() if not isinstance(v, (dict, list))})
        rep.image("plots/tsne_clusters.png", "t-SNE of the gradient features, coloured by cluster and by true label")
    rep.text("Grad-MobileNet needs a backward pass per image (eq. 2), so it cannot be exported to ONNX as a "
             "forward-only graph; PatchCore's feature extractor can.")
    if not crossval:
        report_training_curves(rep, run, "Training loss toward y = 0 (normal images only)")
    report_sections(rep, run, {"decisions": decisions})
    rep.write(run.report_path)


# ---------------------------------------------------------------- the task


class AnomalyTask(TaskHooks):
    """The ``anomaly`` task (registered as such): hooks of the shared pipeline.

    Samples are KolektorSDD images (label defective 0/1); only good images are trainable;
    the manifest's ``val`` split is the data's own test split (single split: tested;
    cross-validation: left out).
    """

    name = "anomaly"
    recipe = AnomalyRecipe
    monitor = ""  # no checkpoint selection: the last weights of the overfit network are kept
    summary_keys = ("image_auroc", "image_ap", "f1", "pixel_auroc")
    predict_options = ()
    default_predict_out = "preds.csv"

    def load_samples(self, recipe: AnomalyRecipe, run_dir: Path | None = None) -> Samples:
        """Every image of :func:`protocol_items`, decoded at ``data.image_size`` (and the peer's size).

        ``data``: ``items``, ``calibration [N] bool``, ``x`` / ``xp`` uint8 ``[N, 3, H, W]`` (Grad-MobileNet's /
        PatchCore's input), ``masks`` / ``pmasks`` bool ``[N, H, W]``.
        """
        d = recipe.data
        items, calibration = protocol_items(d, recipe.seed)
        size = tuple(d.image_size)
        psize = tuple(recipe.peer.image_size or size) if recipe.peer.enabled else size
        paths = [it.image for it in items]
        x = load_stack(paths, size, progress=recipe.train.progress)
        masks = np.stack([load_item_mask(it, size) for it in items])
        if psize == size:
            xp, pmasks = x, masks
        else:
            xp = load_stack(paths, psize, progress=recipe.train.progress)
            pmasks = np.stack([load_item_mask(it, psize) for it in items])
        labels = np.array([int(it.defective) for it in items])
        split = np.array([it.split for it in items])
        held = "test" if d.layout == "mvtec" else "val"
        return Samples([str(p) for p in paths], labels, ["good", "defective"],
                       {"items": items, "calibration": calibration, "x": x, "xp": xp, "masks": masks, "pmasks": pmasks},
                       columns={"id": [it.id for it in items], "split": split.tolist()},
                       test_only=split == held, trainable=labels == 0,
                       description=f"{d.root} ({'MVTec AD layout' if d.layout == 'mvtec' else 'KolektorSDD manifest'}: "
                                   f"{len(items)} images, {int(labels.sum())} defective, {int((split == held).sum())} in {held})")

    def split(self, recipe: AnomalyRecipe, samples: Samples) -> dict[str, np.ndarray]:
        """The protocol's single split: fit on the good ``train`` images; test on ``val`` + the defective ``train`` images."""
        idx = np.arange(len(samples))
        test = samples.test_only | (samples.labels == 1)
        return {"trainval": idx[~test], "test": idx[test]}

    def split_info(self, recipe: AnomalyRecipe) -> dict:
        items, calibration = protocol_items(recipe.data, recipe.seed)
        good_train = np.array([it.split == "train" and not it.defective for it in items])
        test_defective = sum(it.defective for it in items)
        proto = ("MVTec AD protocol (data/mvtec.py mvtec_protocol)" if recipe.data.layout == "mvtec"
                 else "KolektorSDD anomaly protocol (data/kolektor.py anomaly_protocol)")
        return {"protocol": proto, "seed": recipe.seed,
                "calibration_fraction": recipe.data.calibration_fraction,
                "fit": int((good_train & ~calibration).sum()), "calibration": int(calibration.sum()),
                "test_defective": int(test_defective)}

    def fit_model(self, recipe: AnomalyRecipe, samples: Samples, parts: dict[str, np.ndarray],
                  run: RunFolder) -> Fitted | None:
        """Train Grad-MobileNet on the fit images, fit its SVM and PatchCore (bank + threshold).

        ``parts["train"]`` holds good images only; its calibration-flagged images fit the SVM
        (``model.ocsvm_fit_on``) and PatchCore's threshold, the rest train the network and fill
        the memory bank. In a single-split run the clustering study runs too.

        Raises:
            DatasetError: no fitting image left in the training part.
        """
        t, m, p, d = recipe.train, recipe.model, recipe.peer, recipe.data
        train = parts["train"]
        if samples.labels[train].any():
            raise RuntimeError("anomaly: a defective image reached the fitting data")  # the pipeline's trainable rule
        is_cal = samples.data["calibration"][train]
        fit_idx, cal_idx = train[~is_cal], train[is_cal]
        if len(fit_idx) == 0:
            raise DatasetError(f"{d.root}: no good image left to fit on ({len(cal_idx)} calibration images); "
                               "lower data.calibration_fraction or use more images")
        single = _is_single_split(samples, parts)
        start = time.perf_counter()
        size = tuple(d.image_size)
        x = samples.data["x"]
        res = fit_grad_mobilenet(m, t, x[fit_idx], run.path, resume=run.resume)
        if res is None:
            return None
        grad, kwargs, info = res
        for name, pos in (("fit", fit_idx), ("calibration", cal_idx)):
            write_file_list(run.split_dir / f"{name}.txt", [samples.ids[i] for i in pos], ["good"] * len(pos))

        # Grad-MobileNet features and the one-class SVM (section 4.3-4.4.1)
        gn_fit, lm_fit, pt_fit = _features(grad, x[fit_idx], m, t.progress, "gradients (fit)")
        spec = GradientFeatureSpec(tuple(m.grid), m.bins).fit_range(gn_fit)
        feats = {"fit": spec(gn_fit, lm_fit).numpy()}
        del gn_fit
        if len(cal_idx):
            gn_cal, lm_cal, _ = _features(grad, x[cal_idx], m)
            feats["calibration"] = spec(gn_cal, lm_cal).numpy()
        fit_on = m.ocsvm_fit_on
        if not len(cal_idx) or (len(cal_idx) < 2 and fit_on == "calibration"):
            fit_on = "fit"  # an SVM needs two rows
        train_feats = {"fit": feats["fit"], "calibration": feats.get("calibration"),
                       "both": np.concatenate([feats["fit"], feats.get("calibration", feats["fit"][:0])])}[fit_on]
        scorer = OneClassScorer(m.nu, m.gamma).fit(train_feats)
        grad_seconds = time.perf_counter() - start

        # PatchCore (peer): memory bank from the fit images, threshold from the calibration images
        peer = peer_payload = None
        peer_info: dict | None = None
        thr = None
        if p.enabled:
            p0 = time.perf_counter()
            xp = samples.data["xp"]
            psize = tuple(xp.shape[-2:])
            peer, pkw, pinfo = patchcore_fit(xp[fit_idx], p.backbone, p.layers, p.pretrained, p.weights, p.score_border,
                                             p.coreset_ratio, p.max_patches, p.batch_size, recipe.seed)
            ref_scores, _ = patchcore_score(peer, xp[cal_idx] if len(cal_idx) else xp[fit_idx], p.batch_size)
            thr = float(np.quantile(ref_scores, p.threshold_quantile))
            peer_info = {"image_size": list(psize), "threshold": thr,
                         "threshold_from": "calibration" if len(cal_idx) else "fit",
                         **pinfo, "seconds": round(time.perf_counter() - p0, 1)}
            peer_payload = {"model_name": "patchcore", "model_kwargs": pkw, "state_dict": peer.state_dict(),
                            "threshold": thr, "image_size": list(psize), "config": p.model_dump(mode="json")}

        clustering = run_clustering(recipe, run) if single and recipe.clustering.enabled else None
        models = AnomalyModels(grad, m, size, spec, scorer, peer, thr, tuple(samples.data["xp"].shape[-2:]), p.batch_size)
        ckpt = {"model_name": "grad_mobilenet", "model_kwargs": kwargs, "state_dict": grad.state_dict(),
                "image_size": list(size), "grad_config": m.model_dump(mode="json"),
                "feature_spec": {"grid": [int(v) for v in spec.grid], "bins": int(spec.bins),
                                 "hist_range": [float(v) for v in spec.hist_range]},
                "ocsvm": scorer.state_dict(), "normalisation": "inside model: input RGB in [0, 1]",
                "weights_source": grad.backbone.weights_source, "peer": peer_payload}
        test_text = ("every val image + the defective train images" if single
                     else "this fold's images of the train split, good and defective")
        protocol = {"fit": "good images of the training part" + (" minus the calibration draw" if len(cal_idx) else ""),
                    "calibration": f"held-out good images: one-class SVM fit (ocsvm_fit_on={fit_on}) and PatchCore threshold",
                    "test": test_text, "files": "split/fit.txt, split/calibration.txt, split/test.txt",
                    "images": {"fit": int(len(fit_idx)), "calibration": int(len(cal_idx))}, "defective_in_fit": 0}
        info.update({
            "weights": grad.backbone.weights_source,
            "protocol": protocol,
            "grad_fit_seconds": round(grad_seconds, 1),
            "feature": {"dim": spec.dim, "grid": list(spec.grid), "bins": spec.bins, "hist_range": list(spec.hist_range),
                        "layout": "log10 pooled |dL/dx| map (grid cells), histogram of log10 |dL/dx| (shares), landmark"},
            "ocsvm": {"nu": m.nu, "gamma": m.gamma, "gamma_value": scorer.state["gamma"], "fit_on": fit_on,
                      "n_fit": int(len(train_feats)), "support_vectors": int(scorer.state["support_vectors"].shape[0])},
            "p_target_fit_mean": float(pt_fit.mean()),
            "peer_name": p.name if p.enabled else None,
            "peer": peer_info,
            "peer_threshold": thr,
            "clustering": clustering,
        })
        return Fitted(models, ckpt, info)

    def run_info(self, recipe: AnomalyRecipe, fitted: Fitted) -> dict:
        return {"model": "grad_mobilenet", "backbone": recipe.model.backbone, "image_size": list(recipe.data.image_size)}

    def predict_samples(self, recipe: AnomalyRecipe, fitted: Fitted, samples: Samples, idx: np.ndarray) -> Predictions:
        """Scores of both methods; table ``pred`` (good/defective at the SVM boundary), ``image_score``,
        ``peer_pred``, ``peer_score``; ``raw`` the arrays and maps (the peer's at its own size)."""
        models: AnomalyModels = fitted.model
        g = models.score_grad(samples.data["x"][idx], recipe.train.progress)
        table = {"pred": ["defective" if v else "good" for v in g.decision], "image_score": g.score.tolist()}
        raw = {"score": g.score, "decision": g.decision, "maps": g.maps.numpy(), "p_target": g.p_target}
        pr = models.score_peer(samples.data["xp"][idx])
        if pr is not None:
            table.update(peer_pred=["defective" if v else "good" for v in pr.decision], peer_score=pr.score.tolist())
            raw.update(peer_score=pr.score, peer_decision=pr.decision, peer_maps=pr.maps.numpy())
        return Predictions(table, raw)

    def compute_metrics(self, recipe: AnomalyRecipe, samples: Samples, idx: np.ndarray, preds: Predictions) -> dict:
        """Grad-MobileNet's image and pixel figures; PatchCore's under ``peer`` (``None`` when off)."""
        raw, y = preds.raw, samples.labels[idx]
        out = {**image_metrics(y, raw["score"], raw["decision"]),
               "pixel_auroc": _maps_pixel_auroc(raw["maps"], samples.data["masks"][idx])}
        out["peer"] = None
        if "peer_score" in raw:
            psize = tuple(raw["peer_maps"].shape[-2:])
            out["peer"] = {**image_metrics(y, raw["peer_score"], raw["peer_decision"]),
                           "pixel_auroc": _maps_pixel_auroc(raw["peer_maps"], samples.data["pmasks"][idx],
                                                            _pixel_stride(psize))}
        return out

    def decision_scores(self, recipe: AnomalyRecipe, samples: Samples, idx: np.ndarray,
                        preds: Predictions) -> tuple[np.ndarray, np.ndarray]:
        """Defective images and Grad-MobileNet's image anomaly scores (operating points need
        defective images outside the test part: out-of-fold predictions, ``--folds``)."""
        return samples.labels[idx] == 1, np.asarray(preds.table["image_score"], dtype=float)

    def write_report(self, run: RunFolder, recipe: AnomalyRecipe, samples: Samples, idx: np.ndarray,
                     preds: Predictions, metrics: dict, info: dict) -> None:
        """The report; a run's (or fold's) ``metrics.json`` ``peer`` block gets PatchCore's test figures
        beside its fit facts (the layout of ``metrics.json`` before the pipeline)."""
        d, m = recipe.data, recipe.model
        cv = info.get("crossval")
        peer_fit = info.get("peer")
        if cv is None and metrics.get("peer") and isinstance(peer_fit, dict) and run.metrics_path.is_file():
            saved = json.loads(run.metrics_path.read_text())
            saved["peer"] = {**metrics["peer"], **peer_fit}
            run.write_metrics(saved)
        kv = {"data": info.get("data", d.root), "input size (H x W)": f"{d.image_size[0]} x {d.image_size[1]}",
              "trunk": m.backbone, "peer": f"PatchCore on {recipe.peer.backbone}" if recipe.peer.enabled else "off",
              "seed": recipe.seed}
        title = f"defectscope anomaly: Grad-MobileNet vs PatchCore on {Path(d.root).name}"
        if cv:
            kv.update(protocol=info.get("protocol"), images=f"{len(idx)} ({int(samples.labels[idx].sum())} defective), "
                      "each predicted once by the fold that did not fit on it")
            write_anomaly_report(run, title + " (cross-validation)", kv, metrics, samples, idx, preds.raw, None,
                                 tuple(d.image_size), crossval=cv, decisions=info.get("decisions"))
            return
        pr = info.get("protocol", {}).get("images", {})
        kv.update({"trunk weights": info.get("weights", "-"),
                   "fit / calibration / test images": f"{pr.get('fit')} / {pr.get('calibration')} / {len(idx)} "
                                                      f"({int(samples.labels[idx].sum())} defective in test, none in fitting)",
                   "one-class SVM fitted on": info.get("ocsvm", {}).get("fit_on"), "epochs": recipe.train.epochs,
                   "train seconds": info.get("train_seconds")})
        write_anomaly_report(run, title, kv, metrics, samples, idx, preds.raw, info.get("peer_threshold"),
                             tuple(d.image_size), info.get("clustering"))

    def evaluate(self, run_dir: Path, data: Path, out: Path | None = None) -> dict:
        """Score every image of a KolektorSDD-style folder (manifest + masks) with a trained run."""
        models = AnomalyModels.load(run_dir)
        items = read_kolektor_manifest(data)
        x, xp = models.load_images([it.image for it in items])
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

        Raises:
            ConfigError: an option this task does not support (``--save-images``: maps are always written).
        """
        self.check_predict_options(options)
        models = AnomalyModels.load(run_dir)
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
