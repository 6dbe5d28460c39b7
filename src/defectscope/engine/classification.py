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

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from defectscope.config import ClassificationData
from defectscope.data.images import load_labelled_samples
from defectscope.engine.pipeline import Fitted, Predictions, Samples, TaskHooks
from defectscope.engine.run import RunFolder
from defectscope.engine.tasks import register_task
from defectscope.engine.trainer import fit_lightning, resolved_precision
from defectscope.evaluation.classification import classification_metrics
from defectscope.evaluation.classification_report import write_classification_report  # noqa: F401 (re-exported)
from defectscope.models import create_model
from defectscope.models.classifier.inference import pooled_features, predict_probs  # noqa: F401 (re-exported)
from defectscope.models.classifier.lightning_model import ImageClassifierModule
from defectscope.models.training import build_loss, random_flips, scale_probs, to_float, to_model_input, warmup_cosine  # noqa: F401
from defectscope.recipes.classification import ClassificationRecipe


def load_labelled(data: ClassificationData, progress: bool = False) -> Samples:
    """Discover the labelled images of ``data.root`` (subset by ``max_per_class``) and decode them.

    A thin wrapper of :func:`defectscope.data.images.load_labelled_samples`.

    Returns:
        :class:`Samples` whose ``data`` is ``{"x": uint8 [N, 3, S, S]}`` (``S = data.image_size``).

    Raises:
        DatasetError / ImageReadError: bad folder or a corrupt image (named).
    """
    d = load_labelled_samples(data.root, data.image_size, data.layout, data.max_per_class, data.split_seed, progress)
    return Samples([str(f) for f in d.files], d.labels, d.class_names, {"x": d.x}, description=d.description)


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> torch.Tensor | None:
    """Inverse-frequency loss weights ``[K]`` (mean 1) for ``mode`` ``on``, or ``auto`` when max/min count > 3.

    Returns ``None`` when balancing is off (or ``auto`` and the counts are within 3x).
    """
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    present = counts[counts > 0]
    if mode == "off" or (mode == "auto" and present.max() <= 3 * present.min()):
        return None
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0)
    return torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32)


def image_loader(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool) -> DataLoader:
    """Batches of ``(uint8 [B, 3, S, S], int64 [B])``; the last partial batch is dropped only when
    shuffling at least four full batches (scarce data keep every image)."""
    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long()), batch_size=batch_size,
                      shuffle=shuffle, num_workers=0, drop_last=shuffle and len(y) >= 4 * batch_size)


def model_kwargs_from(recipe: ClassificationRecipe, num_classes: int) -> dict:
    """Arguments for :func:`create_model` that rebuild the architecture without loading weights."""
    m = recipe.model
    kw = {"backbone": m.backbone, "num_classes": num_classes, "image_size": recipe.data.image_size, "dropout": m.dropout}
    if m.name == "multiscale":
        kw.update(low_res=m.low_res, embed_dim=m.embed_dim, num_heads=m.num_heads, num_layers=m.num_layers)
    return kw


OK_NAMES = ("good", "ok", "normal", "pass", "no_defect")
#: sliding-window size and false-alarm rate per window of the stored drift reference
DRIFT_WINDOW, DRIFT_ALPHA = 32, 0.001


def frozen_features(samples: Samples, backbone: str, pretrained: bool, weights: str | None) -> tuple[nn.Module, np.ndarray]:
    """``(backbone, pooled features float64 [N, C])`` of every sample's image through the frozen backbone,
    computed once per run and backbone (cached in ``samples.data``) and shared by the linear-probe
    candidate and the linear-probe reference of every fold: features of a frozen ImageNet backbone do
    not depend on the labels, so computing them for all images at once leaks nothing between folds."""
    from defectscope.models.backbones import create_backbone
    from defectscope.models.linear_probe.torch_model import extract_features

    cache = samples.data.setdefault("frozen_features", {})
    key = (backbone, bool(pretrained), weights)
    if key not in cache:
        bb = create_backbone(backbone, pretrained=pretrained, weights=weights)
        cache[key] = (bb, extract_features(bb, samples.data["x"]))
    return cache[key]


def fit_probe_cached(samples: Samples, seen: np.ndarray, backbone: str, pretrained: bool, weights: str | None,
                     image_size: int) -> "LinearProbeClassifier":
    """The linear probe fitted on the cached frozen features of ``seen`` (:func:`frozen_features`, :func:`fit_logistic`)."""
    from defectscope.models.linear_probe.torch_model import LinearProbeClassifier, fit_logistic

    bb, feats = frozen_features(samples, backbone, pretrained, weights)
    w, b = fit_logistic(feats[seen], samples.labels[seen], len(samples.class_names))
    return LinearProbeClassifier(bb, w.shape[0], w, b, image_size=image_size)


def probe_probs_cached(probe: nn.Module, samples: Samples, idx: np.ndarray) -> np.ndarray | None:
    """Probabilities ``[n, K]`` of a linear probe from the cached features of ``idx`` (``None``: no cache for its backbone)."""
    for (name, _, _), (bb, feats) in samples.data.get("frozen_features", {}).items():
        if getattr(probe, "backbone", None) is bb:
            z = feats[idx] @ probe.head.weight.detach().double().numpy().T + probe.head.bias.detach().double().numpy()
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    return None


def drift_reference(model: nn.Module, x_ref: np.ndarray, seed: int, max_images: int = 600) -> dict | None:
    """The drift alarm of a trained classifier (:class:`~defectscope.evaluation.drift.DriftAlarm`, MMD
    with resampling-calibrated thresholds, Bonferroni over two channels): the pooled backbone
    features and the :func:`~defectscope.evaluation.drift.image_statistics` of at most ``max_images``
    uint8 images ``[N, 3, S, S]`` the model was not fitted on (the validation part), as plain lists
    for ``model.ckpt``; ``None`` when there are fewer than ``2 * DRIFT_WINDOW`` images or the model
    has no ``backbone``."""
    from defectscope.evaluation.drift import DriftAlarm, image_statistics

    if not hasattr(model, "backbone") or len(x_ref) < 2 * DRIFT_WINDOW:
        return None
    pick = np.sort(np.random.default_rng(seed).permutation(len(x_ref))[:max_images])
    feats = pooled_features(model, x_ref[pick])
    return DriftAlarm.fit(feats, image_statistics(x_ref[pick]), window=DRIFT_WINDOW, alpha=DRIFT_ALPHA,
                          seed=seed).to_dict()


def find_ok_class(class_names: list[str], ok_class: str | None) -> str | None:
    """The OK class: ``ok_class`` if given (must be a class), else a class named good / ok / normal.

    Raises:
        ConfigError: ``ok_class`` is not one of ``class_names``.
    """
    from defectscope.config import ConfigError

    if ok_class is not None:
        if ok_class not in class_names:
            raise ConfigError(f"data.ok_class: {ok_class!r} is not a class of the data ({', '.join(class_names)})")
        return ok_class
    return next((c for c in class_names if c.lower() in OK_NAMES), None)


class ClassificationTask(TaskHooks):
    """The ``classification`` task (registered as such): hooks of the shared pipeline."""

    name = "classification"
    recipe = ClassificationRecipe
    monitor = "val/weighted_f1"
    summary_keys = ("accuracy", "weighted_f1", "macro_auroc")

    candidate_names = ("model", "linear_probe", "finetune_small", "linear_probe_lite2")

    def load_samples(self, recipe: ClassificationRecipe, run_dir: Path | None = None) -> Samples:
        return load_labelled(recipe.data, progress=recipe.train.progress)

    def candidate(self, recipe: ClassificationRecipe, name: str) -> tuple[dict, float, str]:
        """Candidates: ``model`` (the recipe as written), ``linear_probe`` (logistic regression on the
        frozen backbone's pooled features; seconds), ``finetune_small`` (the recipe's fine-tuning with
        :func:`~defectscope.models.training.strong_augment`: flips, 90-degree rotations, grey jitter),
        ``linear_probe_lite2`` (the same probe on frozen EfficientNet-Lite2 features, whatever the
        recipe's backbone)."""
        m = recipe.model
        if name == "model":
            what = ("linear probe" if m.name == "linear_probe" else f"fine-tuned {m.name}") + f" ({m.backbone}, the recipe's model)"
            return {}, 0.1 if m.name == "linear_probe" else 1.0, what
        if name == "linear_probe":
            return ({"model.name": "linear_probe"}, 0.1,
                    f"linear probe: logistic regression on frozen pooled {m.backbone} features")
        if name == "linear_probe_lite2":
            # the largest backbone with ImageNet weights here; its pooled features separate some data sets far
            # better than Lite0's (README, "Your own data": KolektorSDD as good / defective)
            return ({"model.name": "linear_probe", "model.backbone": "efficientnet_lite2", "model.pretrained": True,
                     "model.weights": None}, 0.15,
                    "linear probe: logistic regression on frozen pooled efficientnet_lite2 features")
        if name == "finetune_small":
            return ({"train.augment": "strong"} if m.name != "linear_probe" else {"model.name": "classifier", "train.augment": "strong"},
                    1.0, f"fine-tuned {m.name if m.name != 'linear_probe' else 'classifier'} ({m.backbone}) with strong "
                         "augmentation for tiny data: flips, 90-degree rotations, grey-level jitter")
        return super().candidate(recipe, name)

    def default_candidates(self, recipe: ClassificationRecipe, samples: Samples) -> list[str]:
        """The recipe's model and, for a fine-tuned model, the linear probe (its features are computed anyway for the reference)."""
        return ["model"] if recipe.model.name == "linear_probe" else ["model", "linear_probe"]

    def fit_model(self, recipe: ClassificationRecipe, samples: Samples, parts: dict[str, np.ndarray],
                  run: RunFolder) -> Fitted | None:
        m = recipe.model
        x, y = samples.data["x"], samples.labels
        k = len(samples.class_names)
        seen = np.sort(parts["fit"] if "fit" in parts else np.concatenate([parts["train"], parts.get("val", np.zeros(0, int))]))
        if m.name == "linear_probe":
            fitted = self._fit_probe(recipe, samples, seen)
        else:
            fitted = self._fit_network(recipe, samples, parts, run)
        if fitted is not None:
            # the reference comes from images the model was not fitted on (the validation part), so
            # that new in-distribution images are exchangeable with it; training images would look
            # "more typical" to a fine-tuned backbone than any new image and the alarm would fire too often
            val = parts.get("val", np.zeros(0, int))
            ref = drift_reference(fitted.model, x[val], recipe.seed)
            fitted.info["drift_reference"] = (f"validation part, {len(val)} images" if ref is not None else
                                              f"none: the validation part has {len(val)} images, fewer than "
                                              f"{2 * DRIFT_WINDOW} (raise train.val_fraction)")
            if ref is not None:
                fitted.checkpoint["drift_reference"] = ref
        if m.name == "linear_probe":
            return fitted
        if fitted is not None and m.linear_probe_reference:
            import time as _time

            t0 = _time.perf_counter()
            fitted.extras["probe"] = fit_probe_cached(samples, seen, m.backbone, m.pretrained, m.weights,
                                                      recipe.data.image_size)
            fitted.info["linear_probe_seconds"] = round(_time.perf_counter() - t0, 1)
        return fitted

    def _fit_probe(self, recipe: ClassificationRecipe, samples: Samples, seen: np.ndarray) -> Fitted:
        """``model.name: linear_probe``: logistic regression on frozen pooled features of train + val."""
        import time as _time

        m = recipe.model
        t0 = _time.perf_counter()
        probe = fit_probe_cached(samples, seen, m.backbone, m.pretrained, m.weights, recipe.data.image_size)
        info = {"epochs_run": 0, "best_checkpoint": "none (closed-form fit)", "train_seconds": round(_time.perf_counter() - t0, 1),
                "cut_short": False, "stopped_by": "fit"}
        ckpt = {"model_name": "linear_probe", "model_kwargs": probe.model_kwargs(), "state_dict": probe.state_dict(),
                "class_names": samples.class_names, "image_size": recipe.data.image_size,
                "normalisation": "inside model: input RGB in [0, 1]", "weights_source": probe.backbone.weights_source}
        return Fitted(probe, ckpt, info)

    def _fit_network(self, recipe: ClassificationRecipe, samples: Samples, parts: dict[str, np.ndarray],
                     run: RunFolder) -> Fitted | None:
        t, m = recipe.train, recipe.model
        x, y = samples.data["x"], samples.labels
        k = len(samples.class_names)
        kwargs = model_kwargs_from(recipe, k)
        model = create_model(m.name, **kwargs, pretrained=m.pretrained, weights=m.weights)
        weights_source = model.backbone.weights_source
        cw = class_weights(y[parts["train"]], k, t.class_balance)
        module = ImageClassifierModule(model, k, t.lr, t.weight_decay, t.loss, t.focal_gamma, t.label_smoothing,
                                       t.augment, t.channels_last, class_weight=cw)
        tr = parts["train"]
        val = parts.get("val")
        has_val = val is not None and len(val) > 0
        info = fit_lightning(module, image_loader(x[tr], y[tr], t.batch_size, True),
                             image_loader(x[val], y[val], t.batch_size, False) if has_val else None,
                             t, run.path, self.monitor, "max", resume=run.resume)
        if info is None:
            return None
        model = module.model.to(memory_format=torch.contiguous_format).float().eval()
        info.update(precision=resolved_precision(t), channels_last=t.channels_last,
                    class_weights=None if cw is None else [round(float(v), 4) for v in cw])
        ckpt = {"model_name": m.name, "model_kwargs": kwargs, "state_dict": model.state_dict(),
                "class_names": samples.class_names, "image_size": recipe.data.image_size,
                "normalisation": "inside model: input RGB in [0, 1]", "weights_source": weights_source}
        return Fitted(model, ckpt, info)

    def run_info(self, recipe: ClassificationRecipe, fitted: Fitted) -> dict:
        return {"model": recipe.model.name, "backbone": recipe.model.backbone,
                "weights": fitted.checkpoint["weights_source"]}

    def predict_samples(self, recipe, fitted: Fitted, samples: Samples, idx: np.ndarray) -> Predictions:
        probs = probe_probs_cached(fitted.model, samples, idx)
        if probs is None:
            probs = predict_probs(fitted.model, samples.data["x"][idx])
        names = samples.class_names
        table = {"pred": [names[int(p.argmax())] for p in probs],
                 **{f"prob_{n}": probs[:, c].tolist() for c, n in enumerate(names)}}
        extra = {}
        if "probe" in fitted.extras:
            extra["linear_probe"] = probe_probs_cached(fitted.extras["probe"], samples, idx)
            if extra["linear_probe"] is None:
                extra["linear_probe"] = predict_probs(fitted.extras["probe"], samples.data["x"][idx])
            table["linear_probe_pred"] = [names[int(p.argmax())] for p in extra["linear_probe"]]
        return Predictions(table, probs, extra)

    def compute_metrics(self, recipe, samples: Samples, idx: np.ndarray, preds: Predictions) -> dict:
        met = classification_metrics(samples.labels[idx], preds.raw, samples.class_names)
        if "linear_probe" in preds.extra:
            ref = classification_metrics(samples.labels[idx], preds.extra["linear_probe"], samples.class_names)
            met["reference"] = {"linear_probe": {k: ref[k] for k in ("n", "accuracy", "weighted_f1", "macro_f1",
                                                                      "macro_auroc")}}
        return met

    def decision_scores(self, recipe: ClassificationRecipe, samples: Samples, idx: np.ndarray,
                        preds: Predictions) -> tuple[np.ndarray, np.ndarray] | None:
        ok = find_ok_class(samples.class_names, recipe.data.ok_class)
        if ok is None:
            return None
        k = samples.class_names.index(ok)
        return samples.labels[idx] != k, 1.0 - np.asarray(preds.raw)[:, k]

    def class_probs(self, preds: Predictions) -> np.ndarray | None:
        return np.asarray(preds.raw)

    def ok_class_of(self, recipe: ClassificationRecipe, samples: Samples) -> str | None:
        """The OK class of the run (recorded with the decision threshold)."""
        return find_ok_class(samples.class_names, recipe.data.ok_class)

    def with_temperature(self, preds: Predictions, temperature: float) -> Predictions:
        return Predictions(preds.table, scale_probs(np.asarray(preds.raw), temperature))

    def write_report(self, run: RunFolder, recipe: ClassificationRecipe, samples: Samples, idx: np.ndarray,
                     preds: Predictions, metrics: dict, info: dict) -> None:
        write_classification_report(run, f"defectscope {self.name}: {recipe.model.name} on {Path(recipe.data.root).name}",
                                    metrics, samples.labels[idx], preds.raw, samples.class_names,
                                    {"model": recipe.model.name, "backbone": recipe.model.backbone, **info})


register_task(ClassificationTask())
