"""Unsupervised inspection task (``task: anomaly``): any registered anomaly model, fitted on normal images only.

The recipe schema is :class:`defectscope.recipes.anomaly.AnomalyRecipe`; the images a run reads are
:func:`defectscope.data.anomaly.protocol_items`; the report is
:func:`defectscope.evaluation.anomaly_report.write_anomaly_report`. This module holds the task's hooks.

The model is chosen by ``model.name`` among :data:`defectscope.models.anomaly.ANOMALY_MODELS`; the
rest of the ``model`` block is validated by that model's own schema (``Args``: unknown keys are
refused). Every model follows the contract of :mod:`defectscope.models.anomaly` (eval forward ->
``pred_score [B]``, ``anomaly_map [B, H, W]``): the run's test predictions call it here; ``predict``,
``evaluate``, ``export``, ``serve``, ``inspect`` and the Python API call it through the Predictor
(:mod:`defectscope.deploy.adapters.anomaly`), on the module rebuilt by the one loader
:func:`load_anomaly_run` (via :func:`defectscope.models.anomaly.load_anomaly_model`).

Protocol (KolektorSDD, :func:`defectscope.data.kolektor.anomaly_protocol`): the good
images of the manifest's ``train`` split are the only images any model is fitted
on; ``calibration_fraction`` of them (a seeded draw, flagged once per image) is kept
out of fitting and sets the decision threshold (``model.threshold_quantile`` of their scores; a
model with a fixed threshold, Grad-MobileNet's one-class SVM at 0, fits its SVM on them). The
test set is every ``val`` image plus the defective ``train`` images. The file lists are written to
``RUN/split/{fit,calibration,train,test}.txt`` (``train`` = fit + calibration).

Cross-validation (``--folds K``, :func:`defectscope.engine.pipeline.cross_validate`) runs on
the manifest's ``train`` split (``val`` is the data's own test split and is left out):
folds are stratified over good and defective images; fold ``k`` fits on the good images
of the other folds and predicts all of its own images, good and defective. Defective
images are never fitted on, and every image is predicted exactly once.

Full resolution: ``data.image_size`` is the size every image is resized to (KolektorSDD's own
size is about 1250 x 500: ``[1248, 512]`` keeps it); the models' features are computed at that
size (fully convolutional), or window by window with ``model.tile`` / ``model.tile_stride``, and the
anomaly map comes back at that size; ``predict`` resizes it to each image's own size.

Clustering of defect types (paper 001, section 4.4.2) runs only when ``clustering.enabled`` is set,
on the source it names (``neu``: a second Grad-MobileNet on one NEU class held as the normal
reference, t-SNE + K-means of the other five), in a single-split run. New sources (the simulated
welds) register a loader in :data:`defectscope.data.clustering.CLUSTERING_SOURCES`.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from defectscope.config import TrainConfig
from defectscope.data.anomaly import protocol_items
from defectscope.data.clustering import CLUSTERING_SOURCES
from defectscope.data.images import DatasetError, load_stack
from defectscope.data.mvtec import load_item_mask
from defectscope.data.splits import write_file_list
from defectscope.engine.crossval import flatten_scalars
from defectscope.engine.pipeline import Fitted, Predictions, Samples, TaskHooks
from defectscope.engine.run import RunError, RunFolder
from defectscope.engine.tasks import register_task
from defectscope.engine.trainer import fit_lightning
from defectscope.evaluation.anomaly import (
    anomaly_metrics,
    clustering_metrics,
    image_metrics,
    pixel_stride,
    plot_tsne,
    tsne_kmeans,
)
from defectscope.evaluation.anomaly_report import write_anomaly_report
from defectscope.models.anomaly import AnomalyModel, anomaly_model_class, load_anomaly_model
from defectscope.models.grad_mobilenet import (
    GradientFeatureSpec,
    GradMobileNet,
    GradMobileNetArgs,
    OneClassScorer,
    log_gradient_features,
    log_gradient_maps,
)
from defectscope.models.grad_mobilenet.lightning_model import GradMobileNetModule
from defectscope.recipes.anomaly import AnomalyRecipe

# ---------------------------------------------------------------- network training (Grad-MobileNet, section 4.1)


def train_grad_net(net: GradMobileNet, x_fit: np.ndarray, t: TrainConfig, target: int, run_dir: Path,
                   resume: bool = False) -> dict | None:
    """Train a Grad-MobileNet network on normal uint8 images ``x_fit [N, 3, H, W]`` toward ``y = target``.

    Uses :func:`defectscope.engine.trainer.fit_lightning` without a validation loader (the last
    weights are kept); logs and Lightning checkpoints go to ``run_dir`` (``resume``: continue from its
    ``checkpoints/last.ckpt``, ``defectscope train --resume``).

    Returns:
        the training info, ``None`` on DDP ranks other than 0.
    """
    module = GradMobileNetModule(net, target, t.lr, t.weight_decay, t.augment, t.channels_last)
    loader = DataLoader(TensorDataset(torch.from_numpy(x_fit)), batch_size=t.batch_size, shuffle=True,
                        num_workers=0, drop_last=len(x_fit) > t.batch_size)
    return fit_lightning(module, loader, None, t, run_dir, None, resume=resume)


def _features(model: nn.Module, x: np.ndarray, cfg: GradMobileNetArgs, progress: bool = False,
              label: str = "gradients") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return log_gradient_maps(model, x, cfg.target, cfg.landmark_low, cfg.landmark_high, cfg.grad_batch_size,
                             progress, label)


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
    c = recipe.clustering
    m = recipe.model if isinstance(recipe.model, GradMobileNetArgs) else GradMobileNetArgs()
    if c.source not in CLUSTERING_SOURCES:
        raise KeyError(f"clustering.source '{c.source}' unknown; known: {', '.join(sorted(CLUSTERING_SOURCES))} "
                       "(the simulated weld set registers 'weld_sim' when it lands)")
    if not c.root:
        raise DatasetError("clustering.root is not set: the clustering study needs its own multi-class data folder "
                           "(e.g. -o clustering.root=../shared/datasets/neu-det)")
    start = time.perf_counter()
    data = CLUSTERING_SOURCES[c.source](c, recipe.seed)
    t = recipe.train.model_copy(update={"epochs": c.epochs, "logger": [], "devices": 1, "strategy": "auto",
                                        "max_minutes": None})
    model = GradMobileNet(m.backbone, m.num_classes, m.pretrained, m.weights)
    with tempfile.TemporaryDirectory(prefix="defectscope-clustering-") as tmp:
        info = train_grad_net(model, data.fit, t, m.target, Path(tmp))
    model = model.to(memory_format=torch.contiguous_format).float().eval()
    gn_fit, lm_fit, _ = _features(model, data.fit, m)
    gn, lm, _ = _features(model, data.eval_x, m)
    spec = GradientFeatureSpec(tuple(m.grid), m.bins).fit_range_log(gn_fit)
    f_fit, f_eval = log_gradient_features(gn_fit, lm_fit, spec).numpy(), log_gradient_features(gn, lm, spec).numpy()
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


def _is_single_split(samples: Samples, parts: dict[str, np.ndarray]) -> bool:
    """A single-split fit covers every sample (train + test); a cross-validation fold never does
    (it leaves out the other folds' defective images and the ``val`` split)."""
    return sum(len(v) for v in parts.values()) == len(samples)


# ---------------------------------------------------------------- the fitted model and its one loader


@dataclass
class AnomalyRun:
    """A fitted anomaly model with its decision: what every execution path of a run scores with.

    Attributes:
        model: the :class:`~defectscope.models.anomaly.AnomalyModel` in eval mode.
        threshold: decision threshold of ``pred_score`` (defective when above).
        image_size: ``(H, W)`` the images are resized to before the model.
        batch_size: images per forward pass.
    """

    model: AnomalyModel
    threshold: float
    image_size: tuple[int, int]
    batch_size: int = 4

    def score(self, x: np.ndarray) -> "Scored":
        """Score uint8 images ``[N, 3, H, W]`` (at :attr:`image_size`) with the model's forward."""
        out = self.model.predict(x, self.batch_size)
        s = out.pred_score.double().numpy()
        return Scored(s, s > self.threshold, out.anomaly_map)


@dataclass
class Scored:
    """Scores ``[N]``, decisions ``[N]`` (``True`` = defective) and anomaly maps ``[N, H, W]`` of one image set."""

    score: np.ndarray
    decision: np.ndarray
    maps: torch.Tensor


def checkpoint_of(run: AnomalyRun, extra: dict | None = None) -> dict:
    """The run's ``model.ckpt`` fields (:meth:`RunFolder.save_model` keywords but ``task``): tensors and plain data."""
    m = run.model
    return {"model_name": m.name, "model_kwargs": dict(m.args), "state_dict": m.state_dict(),
            "threshold": float(run.threshold), "image_size": [int(v) for v in run.image_size],
            "batch_size": int(run.batch_size), "exportable": bool(m.exportable),
            "normalisation": "inside model: input RGB in [0, 1]", **(extra or {})}


def load_anomaly_run(run_dir: str | Path) -> AnomalyRun:
    """The one loader of an anomaly run folder: ``model.ckpt`` (``weights_only``) -> :class:`AnomalyRun`.

    Used by ``predict``, ``evaluate`` and the deploy adapter (``export``, ``serve``, ``inspect``).

    Raises:
        RunError: missing/unreadable checkpoint, one of another task or of an older layout
            (Grad-MobileNet + PatchCore pairs are refused: train them again), or weights that do not fit.
    """
    folder = RunFolder(run_dir)
    payload = folder.load_model_payload()
    if payload.get("task") != "anomaly" or "threshold" not in payload or "image_size" not in payload:
        raise RunError(f"{folder.model_path}: not an anomaly-model checkpoint of this version (fields 'threshold' and "
                       f"'image_size' missing; runs of the older Grad-MobileNet + PatchCore pair must be trained again: "
                       f"defectscope train {folder.config_path} --out NEW_RUN)")
    try:
        model = load_anomaly_model(payload, str(folder.model_path))
    except ValueError as exc:
        raise RunError(str(exc)) from None
    return AnomalyRun(model, float(payload["threshold"]), tuple(int(v) for v in payload["image_size"]),
                      int(payload.get("batch_size", 4)))


# ---------------------------------------------------------------- the task


class AnomalyTask(TaskHooks):
    """The ``anomaly`` task (registered as such): hooks of the shared pipeline.

    Samples are KolektorSDD / MVTec images (label defective 0/1); only good images are trainable;
    the data's own test split (KolektorSDD ``val``, MVTec ``test``) is test-only.
    """

    name = "anomaly"
    recipe = AnomalyRecipe
    monitor = ""  # no checkpoint selection
    summary_keys = ("image_auroc", "f1_max", "pixel_auroc", "aupro")

    def load_samples(self, recipe: AnomalyRecipe, run_dir: Path | None = None) -> Samples:
        """Every image of :func:`protocol_items`, decoded at ``data.image_size``.

        ``data``: ``items``, ``calibration [N] bool``, ``x`` uint8 ``[N, 3, H, W]``, ``masks`` bool ``[N, H, W]``.
        """
        d = recipe.data
        items, calibration = protocol_items(d, recipe.seed)
        size = tuple(d.image_size)
        paths = [it.image for it in items]
        x = load_stack(paths, size, progress=recipe.train.progress)
        masks = np.stack([load_item_mask(it, size) for it in items])
        labels = np.array([int(it.defective) for it in items])
        split = np.array([it.split for it in items])
        held = "test" if d.layout == "mvtec" else "val"
        return Samples([str(p) for p in paths], labels, ["good", "defective"],
                       {"items": items, "calibration": calibration, "x": x, "masks": masks},
                       columns={"id": [it.id for it in items], "split": split.tolist()},
                       test_only=split == held, trainable=labels == 0,
                       description=f"{d.root} ({'MVTec AD layout' if d.layout == 'mvtec' else 'KolektorSDD manifest'}: "
                                   f"{len(items)} images, {int(labels.sum())} defective, {int((split == held).sum())} in {held})")

    def split(self, recipe: AnomalyRecipe, samples: Samples) -> dict[str, np.ndarray]:
        """The protocol's single split: fit on the good ``train`` images; test on the held-out split + the defective ``train`` images."""
        idx = np.arange(len(samples))
        test = samples.test_only | (samples.labels == 1)
        return {"trainval": idx[~test], "test": idx[test]}

    def split_info(self, recipe: AnomalyRecipe) -> dict:
        items, calibration = protocol_items(recipe.data, recipe.seed)
        good_train = np.array([it.split == "train" and not it.defective for it in items])
        proto = ("MVTec AD protocol (data/mvtec.py mvtec_protocol)" if recipe.data.layout == "mvtec"
                 else "KolektorSDD anomaly protocol (data/kolektor.py anomaly_protocol)")
        return {"protocol": proto, "seed": recipe.seed, "calibration_fraction": recipe.data.calibration_fraction,
                "fit": int((good_train & ~calibration).sum()), "calibration": int(calibration.sum()),
                "test_defective": int(sum(it.defective for it in items))}

    def fit_model(self, recipe: AnomalyRecipe, samples: Samples, parts: dict[str, np.ndarray],
                  run: RunFolder) -> Fitted | None:
        """Fit ``model.name`` on the fit images (its own :meth:`~defectscope.models.anomaly.AnomalyModel.fit`)
        and set the decision threshold on the calibration images.

        ``parts["train"]`` holds good images only; its calibration-flagged images are kept out of
        fitting. In a single-split run the clustering study runs when ``clustering.enabled``.

        Raises:
            DatasetError: no fitting image left in the training part.
        """
        d, cfg = recipe.data, recipe.model
        train = parts["train"]
        if samples.labels[train].any():
            raise RuntimeError("anomaly: a defective image reached the fitting data")  # the pipeline's trainable rule
        is_cal = samples.data["calibration"][train]
        fit_idx, cal_idx = train[~is_cal], train[is_cal]
        if len(fit_idx) == 0:
            raise DatasetError(f"{d.root}: no good image left to fit on ({len(cal_idx)} calibration images); "
                               "lower data.calibration_fraction or use more images")
        for name, pos in (("fit", fit_idx), ("calibration", cal_idx)):
            write_file_list(run.split_dir / f"{name}.txt", [samples.ids[i] for i in pos], ["good"] * len(pos))
        single = _is_single_split(samples, parts)
        x = samples.data["x"]
        from defectscope.engine.trainer import set_threads

        set_threads(recipe.train)
        model = anomaly_model_class(cfg.name)(**cfg.module_args())
        trained: dict = {}

        def train_net(net: nn.Module, xf: np.ndarray) -> dict | None:
            res = train_grad_net(net, xf, recipe.train, getattr(cfg, "target", 0), run.path, resume=run.resume)
            trained["done"] = res is not None
            return res

        start = time.perf_counter()
        info = model.fit(x[fit_idx], x[cal_idx] if len(cal_idx) else None, batch_size=cfg.batch_size,
                         train=train_net, progress=recipe.train.progress)
        if trained and not trained["done"]:
            return None  # a DDP rank other than 0
        fit_seconds = time.perf_counter() - start
        model.eval()
        if model.fixed_threshold is not None:
            thr, thr_from = float(model.fixed_threshold), "fixed by the model"
        else:
            ref = x[cal_idx] if len(cal_idx) else x[fit_idx]
            thr = float(np.quantile(model.predict(ref, cfg.batch_size).pred_score.numpy(), cfg.threshold_quantile))
            thr_from = f"quantile {cfg.threshold_quantile:g} of the {'calibration' if len(cal_idx) else 'fit'} images' scores"
        fitted_run = AnomalyRun(model, thr, tuple(d.image_size), cfg.batch_size)
        clustering = run_clustering(recipe, run) if single and recipe.clustering.enabled else None
        test_text = ("every held-out image + the defective train images" if single
                     else "this fold's images of the train split, good and defective")
        protocol = {"fit": "good images of the training part" + (" minus the calibration draw" if len(cal_idx) else ""),
                    "calibration": "held-out good images: the decision threshold" +
                                   (" (Grad-MobileNet: its one-class SVM)" if model.fixed_threshold is not None else ""),
                    "test": test_text, "files": "split/fit.txt, split/calibration.txt, split/test.txt",
                    "images": {"fit": int(len(fit_idx)), "calibration": int(len(cal_idx))}, "defective_in_fit": 0}
        info = {**info, "model": cfg.name, "protocol": protocol, "fit_seconds": round(fit_seconds, 1),
                "threshold": thr, "threshold_from": thr_from, "clustering": clustering,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
        info.setdefault("train_seconds", round(fit_seconds, 1))
        return Fitted(fitted_run, checkpoint_of(fitted_run), info)

    def run_info(self, recipe: AnomalyRecipe, fitted: Fitted) -> dict:
        return {"model": recipe.model.name, "backbone": getattr(recipe.model, "backbone", None),
                "image_size": list(recipe.data.image_size)}

    def predict_samples(self, recipe: AnomalyRecipe, fitted: Fitted, samples: Samples, idx: np.ndarray) -> Predictions:
        """The model's forward on the images: table ``pred`` (good/defective at the threshold), ``image_score``;
        ``raw``: ``score``, ``decision``, ``maps`` (every ``stride``-th pixel), ``seconds_per_image``."""
        run: AnomalyRun = fitted.model
        t0 = time.perf_counter()
        out = run.score(samples.data["x"][idx])
        sec = (time.perf_counter() - t0) / max(1, len(idx))
        st = pixel_stride(run.image_size)
        table = {"pred": ["defective" if v else "good" for v in out.decision], "image_score": out.score.tolist()}
        raw = {"score": out.score, "decision": out.decision, "maps": out.maps[:, ::st, ::st].numpy().copy(),
               "stride": st, "seconds_per_image": sec}
        return Predictions(table, raw)

    def pool(self, preds: list[Predictions]) -> Predictions:
        table = {k: [v for p in preds for v in p.table[k]] for k in preds[0].table}
        raw = {k: np.concatenate([p.raw[k] for p in preds]) for k in ("score", "decision", "maps")}
        raw["stride"] = preds[0].raw["stride"]
        raw["seconds_per_image"] = float(np.mean([p.raw["seconds_per_image"] for p in preds]))
        return Predictions(table, raw)

    def compute_metrics(self, recipe: AnomalyRecipe, samples: Samples, idx: np.ndarray, preds: Predictions) -> dict:
        """Image AUROC / AP / F1-max, F1 at the decision, pixel AUROC and AUPRO (FPR limit 0.3) of the maps."""
        raw, st = preds.raw, preds.raw["stride"]
        masks = samples.data["masks"][idx][:, ::st, ::st]
        out = anomaly_metrics(samples.labels[idx], raw["score"], raw["decision"], raw["maps"], masks)
        out["seconds_per_image"] = round(float(raw["seconds_per_image"]), 4)
        out["pixel_stride"] = int(st)
        return out

    def decision_scores(self, recipe: AnomalyRecipe, samples: Samples, idx: np.ndarray,
                        preds: Predictions) -> tuple[np.ndarray, np.ndarray]:
        """Defective images and the model's image anomaly scores."""
        return samples.labels[idx] == 1, np.asarray(preds.table["image_score"], dtype=float)

    def write_report(self, run: RunFolder, recipe: AnomalyRecipe, samples: Samples, idx: np.ndarray,
                     preds: Predictions, metrics: dict, info: dict) -> None:
        d, m = recipe.data, recipe.model
        cv = info.get("crossval")
        label = {"patchcore": "PatchCore", "padim": "PaDiM", "grad_mobilenet": "Grad-MobileNet + one-class SVM"}.get(
            m.name, m.name)
        kv = {"data": info.get("data", d.root), "input size (H x W)": f"{d.image_size[0]} x {d.image_size[1]}",
              "model": m.name, "backbone": getattr(m, "backbone", "-"),
              "tile / stride": f"{m.tile} / {m.tile_stride}" if m.tile else "whole image", "seed": recipe.seed}
        title = f"defectscope anomaly: {label} on {Path(d.root).name}"
        curves = m.name == "grad_mobilenet"
        images = (samples.labels, samples.data["x"], samples.data["masks"], samples.columns["id"])
        if cv:
            kv.update(protocol=info.get("protocol"), images=f"{len(idx)} ({int(samples.labels[idx].sum())} defective), "
                      "each predicted once by the fold that did not fit on it")
            cv = {"folds": [flatten_scalars(f) for f in cv["folds"]], "mean": cv["mean"], "std": cv["std"],
                  "pooled": flatten_scalars(metrics)}
            write_anomaly_report(run, title + " (cross-validation)", kv, metrics, *images, idx, preds.raw, None, label,
                                 crossval=cv, decisions=info.get("decisions"), curves=curves)
            return
        pr = info.get("protocol", {}).get("images", {})
        kv.update({"weights": info.get("weights", "-"),
                   "fit / calibration / test images": f"{pr.get('fit')} / {pr.get('calibration')} / {len(idx)} "
                                                      f"({int(samples.labels[idx].sum())} defective in test, none in fitting)",
                   "threshold": f"{info.get('threshold')} ({info.get('threshold_from')})",
                   "fit seconds": info.get("fit_seconds")})
        write_anomaly_report(run, title, kv, metrics, *images, idx, preds.raw, info.get("threshold"), label,
                             info.get("clustering"), decisions=info.get("decisions"), curves=curves)


register_task(AnomalyTask())
