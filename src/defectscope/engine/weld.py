"""Multimodal laser-weld classification task (paper 000, sections 4-5): ``task: weld``, on the pipeline hooks.

What the hooks do (:mod:`defectscope.engine.pipeline` does the splits, folds, run folders):

1. :meth:`WeldTask.load_samples`: read a weld data folder (:mod:`defectscope.data.weld.format`, v1 or
   v2) or simulate one into ``RUN/data`` (``data.simulate``); ``ids`` are the sample ids, ``labels``
   the class indices, ``columns`` the data's group field (e.g. ``batch``) and the per-sample metadata,
   so ``--group-by batch`` keeps a batch in one fold. Data sets under :data:`CV_BELOW` samples are
   cross-validated by default (:meth:`WeldTask.default_folds`), grouped by the data's group field when
   every sample has one (:meth:`WeldTask.default_group_by`).
2. :meth:`WeldTask.fit_model` on the ``train`` part (``val`` selects the checkpoint):
   the seam U-Net (compact, Fig. 7; :class:`~defectscope.models.weld_fusion.lightning_model.SeamUNetModule`)
   when ``segmentation.enabled`` and every sample has a seam mask, else fixed bands; one crop per weld
   (the first flipped vertically, section 4.2), optionally blanked outside the predicted seam
   (``data.segmented``); min-max statistics and Pearson channel selection (eq. 1) on the training
   spectra, balanced over VIS/NIR (wavelengths) or the channel groups (no wavelengths); the weld model
   (:class:`~defectscope.models.weld_fusion.lightning_model.WeldModule`, focal loss eq. 14, AdamW).
3. :meth:`WeldTask.predict_samples` / :meth:`WeldTask.compute_metrics`: probabilities, Table-4 metrics
   and the seam Dice of the predicted masks where true masks exist.
4. :meth:`WeldTask.write_report`: confusion matrix, ROC, correlation heat map with the selected
   channels, class-mean signals, seam masks and crops, cross-attention overlays (Fig. 14); under
   cross-validation the fold table and the pooled figures. Reports on simulated data are marked.

A sample with several images (views) is classified from its first view (``images[0]``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from defectscope.config import TrainConfig
from defectscope.data.weld.format import WeldDataError, WeldDataset, read_weld_dataset
from defectscope.data.weld.prepare import SpectralPrep, crop_welds, fit_spectral_prep
from defectscope.models.training import scale_probs
from defectscope.engine.pipeline import Fitted, Predictions, Samples, TaskHooks
from defectscope.engine.run import RunFolder
from defectscope.engine.tasks import register_task
from defectscope.engine.trainer import fit_lightning, set_threads
from defectscope.evaluation.classification import classification_metrics
from defectscope.evaluation.weld_plots import seam_dice
from defectscope.evaluation.weld_report import write_weld_report
from defectscope.models import create_model
from defectscope.models.weld_fusion.lightning_model import (
    SeamUNetModule,
    WeldModule,
    cached_features,
    predict_masks,
    predict_weld_probs,
    seam_loader,
    weld_loader,
)
from defectscope.models.weld_fusion.torch_model import MODALITIES
from defectscope.recipes.weld import SegmentationConfig, WeldData, WeldModelConfig, WeldRecipe, WeldTrainConfig

#: data sets with fewer samples are cross-validated by default (a single 8:2 split leaves a handful of test samples)
CV_BELOW = 200
#: folds of the default cross-validation (fewer when the smallest class or the number of groups is smaller)
DEFAULT_FOLDS = 5
#: weld models fitted in closed form (logistic regression on fixed features; no epochs, no seam U-Net needed)
CLOSED_FORM = ("weld_signal_stats", "weld_image_probe")
#: a validation part with fewer samples of some class selects checkpoints on noise: fixed schedule instead
MIN_VAL_PER_CLASS = 5


# ------------------------------------------------------------------------------------------ inputs


def model_kwargs(mcfg: WeldModelConfig, num_classes: int, channels: int, seq_len: int, welds: int) -> dict:
    """Arguments of ``create_model(mcfg.name, ...)`` that rebuild the architecture (no weights).

    Only the arguments the model takes (its constructor rejects any other).
    """
    name = mcfg.name
    if name == "weld_fusion":
        return {"num_classes": num_classes, "channels": channels, "seq_len": seq_len, "backbone": mcfg.backbone,
                "fusion": mcfg.fusion, "embedding": mcfg.embedding, "spectral_dim": mcfg.spectral_dim,
                "embed_dim": mcfg.embed_dim, "num_heads": mcfg.num_heads, "num_layers": mcfg.num_layers, "dropout": mcfg.dropout}
    if name == "weld_vision":
        return {"num_classes": num_classes, "backbone": mcfg.backbone, "embed_dim": mcfg.embed_dim,
                "num_heads": mcfg.num_heads, "num_layers": mcfg.num_layers, "dropout": mcfg.dropout}
    if name == "weld_dlinear":
        return {"num_classes": num_classes, "channels": channels, "seq_len": seq_len, "welds": welds,
                "spectral_dim": mcfg.spectral_dim, "dropout": mcfg.dropout}
    if name == "weld_informer":
        return {"num_classes": num_classes, "channels": channels, "seq_len": seq_len, "welds": welds,
                "embed_dim": mcfg.embed_dim, "num_heads": mcfg.num_heads, "num_layers": mcfg.num_layers, "dropout": mcfg.dropout}
    if name == "weld_inverted":
        return {"num_classes": num_classes, "channels": channels, "seq_len": seq_len, "spectral_dim": mcfg.spectral_dim,
                "embed_dim": mcfg.embed_dim, "num_heads": mcfg.num_heads, "num_layers": mcfg.num_layers, "dropout": mcfg.dropout}
    if name == "weld_signal_stats":
        return {"num_classes": num_classes, "channels": channels, "welds": welds, "seq_len": seq_len}
    if name == "weld_image_probe":
        return {"num_classes": num_classes, "welds": welds, "backbone": mcfg.backbone}
    raise ValueError(f"unknown weld model {name!r}")


def build_weld_model(mcfg: WeldModelConfig, kwargs: dict) -> nn.Module:
    """``create_model(mcfg.name, **kwargs)``, with the backbone's weights for models that read images."""
    if "image" in MODALITIES[mcfg.name]:
        return create_model(mcfg.name, **kwargs, pretrained=mcfg.pretrained, weights=mcfg.weights)
    return create_model(mcfg.name, **kwargs)


@dataclass
class WeldPredictor:
    """A trained weld classifier with everything it needs to turn a weld folder into probabilities.

    Attributes:
        model: the weld model (eval mode, fp32).
        unet: the seam U-Net, or ``None`` (fixed bands are cropped).
        prep: the fitted channel selection and min-max statistics.
        seg_size: U-Net input side (px); crop_size: ``(h, w)`` of each weld crop; segmented: blank
            outside the predicted seam; welds: ``W``.
    """

    model: nn.Module
    unet: nn.Module | None
    prep: SpectralPrep
    seg_size: int
    crop_size: tuple[int, int]
    segmented: bool
    welds: int

    def masks(self, images: list[np.ndarray]) -> list[np.ndarray] | None:
        """Predicted seam masks (uint8 ``[H, W]`` per image), ``None`` without a U-Net."""
        return None if self.unet is None else predict_masks(self.unet, images, self.seg_size)

    def crops(self, images: list[np.ndarray], masks: list[np.ndarray] | None) -> np.ndarray:
        """uint8 ``[N, W, 3, h, w]`` weld crops of the images (see :func:`crop_welds`)."""
        return np.stack([crop_welds(im, None if masks is None else masks[i], self.welds, self.crop_size, self.segmented)
                         for i, im in enumerate(images)])

    def predict(self, images: list[np.ndarray], spectra: np.ndarray, with_attention: bool = False) -> dict:
        """``{"probs" [N, K], "masks", "crops", "attn"}`` for first-view images and raw signals ``[N, W, C_all, T]``."""
        masks = self.masks(images)
        crops = self.crops(images, masks)
        out = predict_weld_probs(self.model, crops, self.prep.apply(spectra), with_attention=with_attention)
        probs, attn = out if with_attention else (out, {})
        return {"probs": probs, "masks": masks, "crops": crops, "attn": attn}


def load_weld_data(data: WeldData, run_dir: Path | None) -> WeldDataset:
    """Read ``data.root``, simulating it first when ``data.simulate`` is set (into ``run_dir/data`` without a root).

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


# ------------------------------------------------------------------------------------------ the task


def _unet_train_config(t: WeldTrainConfig, seg: SegmentationConfig) -> TrainConfig:
    """Trainer settings of the seam U-Net: ``segmentation.*`` epochs/batch/lr, the run's ``train.precision``
    (``auto``: bf16 only where native, :mod:`defectscope.machine`), no validation, no logger."""
    return TrainConfig(epochs=seg.epochs, batch_size=seg.batch_size, lr=seg.lr, precision=t.precision,
                       channels_last=False, val_fraction=0.0, early_stopping_patience=0, strategy="auto", devices=1,
                       accelerator=t.accelerator, num_threads=t.num_threads, augment=False, logger=[], progress=t.progress)


def train_seam_unet(images: list[np.ndarray], masks: list[np.ndarray], seg: SegmentationConfig, size: int, seed: int,
                    train_cfg: WeldTrainConfig, run_dir: Path, resume: bool = False) -> tuple[nn.Module, dict]:
    """Train the seam U-Net (:class:`SeamUNetModule`, BCE + Dice, AdamW, one-cycle) on images and binary masks.

    The model is initialised from ``torch.manual_seed(seed)``; batches are one seeded permutation per
    epoch; the trainer runs inside ``torch.random.fork_rng`` so the global random state afterwards is
    that of the seeded initialisation (what follows, e.g. the weld model, does not depend on the
    trainer's internals). Logs and the last checkpoint go to ``run_dir/seam_unet``.

    Returns:
        ``(U-Net in eval mode, fp32, fit info)``.
    """
    torch.manual_seed(seed)
    model = create_model("weld_seam_unet", base=seg.base_channels, depth=seg.depth)
    loader = seam_loader(images, masks, size, seg.batch_size, seed)
    module = SeamUNetModule(model, seg.lr, seg.epochs * len(loader))
    with torch.random.fork_rng(devices=[]):
        info = fit_lightning(module, loader, None, _unet_train_config(train_cfg, seg), Path(run_dir) / "seam_unet", None,
                             resume=resume)
    return module.model.float().eval(), info or {}


class WeldTask(TaskHooks):
    """The ``weld`` task (registered as such): hooks of the shared pipeline."""

    name = "weld"
    recipe = WeldRecipe
    monitor = "val/weighted_f1"
    summary_keys = ("accuracy", "weighted_f1", "macro_auroc", "seam_dice")
    min_val_per_class = MIN_VAL_PER_CLASS
    candidate_names = ("model", "signal_stats", "image_probe")

    def candidate(self, recipe: WeldRecipe, name: str) -> tuple[dict, float, str]:
        """Candidates: ``model`` (the recipe's model), ``signal_stats`` (per-channel statistics of the process
        window of every channel -> logistic regression), ``image_probe`` (logistic regression on the frozen
        backbone's pooled features of the weld crops, fixed bands). The two references fit in seconds."""
        m = recipe.model
        if name == "model":
            what = m.name + (f" ({m.fusion} fusion)" if m.name == "weld_fusion" else "") + ", the recipe's model"
            return {}, (0.05 if m.name in CLOSED_FORM else 1.0), what
        if name == "signal_stats":
            return ({"model.name": "weld_signal_stats", "model.channels": "all", "segmentation.enabled": False}, 0.05,
                    "signal statistics: mean, std, 10th and 90th percentile of every channel over the process window "
                    "-> logistic regression")
        if name == "image_probe":
            return ({"model.name": "weld_image_probe", "segmentation.enabled": False}, 0.1,
                    f"image probe: logistic regression on frozen pooled {m.backbone} features of the weld crops")
        return super().candidate(recipe, name)

    def default_candidates(self, recipe: WeldRecipe, samples: Samples) -> list[str]:
        """The recipe's model and the two closed-form references (seconds each)."""
        if recipe.model.name in CLOSED_FORM:
            return ["model"]
        return ["model", "signal_stats", "image_probe"]

    # -------------------------------------------------------------------------------- data

    def load_samples(self, recipe: WeldRecipe, run_dir: Path | None = None) -> Samples:
        """The weld folder (or the simulated set, written to ``run_dir/data``) as :class:`Samples`.

        ``data`` holds ``{"ds": WeldDataset, "spectra": float32 [N, W, C, T]}``; ``columns`` the data's
        group field (e.g. ``batch``) when every sample has a group, and every metadata key all samples share.
        """
        ds = load_weld_data(recipe.data, run_dir)
        spectra = np.stack([s.spectra for s in ds.samples]).astype(np.float32)
        columns: dict[str, list] = {}
        metas = ds.metadata
        for key in metas[0] if metas else {}:
            if all(key in m for m in metas):
                columns[key] = [m[key] for m in metas]
        if ds.has_groups:
            columns[ds.group_field or "group"] = list(ds.groups)
        where = "RUN/data (simulated)" if recipe.data.simulate is not None and not recipe.data.root else str(ds.root)
        views = ds.views_per_sample
        desc = (f"{where}: {len(ds.samples)} samples, {len(ds.classes)} classes, {len(ds.channels)} channels, "
                f"{ds.welds_per_sample} weld(s) per sample, format v{ds.format_version}"
                + (f", {min(views)}-{max(views)} views per sample (the first is used)" if max(views) > 1 else "")
                + (", synthetic" if ds.synthetic else ""))
        return Samples([s.id for s in ds.samples], ds.labels, list(ds.classes), {"ds": ds, "spectra": spectra},
                       columns, description=desc)

    def default_folds(self, recipe: WeldRecipe, samples: Samples) -> int | None:
        """K-fold cross-validation for data sets under :data:`CV_BELOW` samples: ``min(5, smallest class, groups)``.

        ``None`` (a single split) for larger sets, or when fewer than 2 folds are possible.
        """
        if len(samples) >= CV_BELOW:
            return None
        counts = np.bincount(samples.labels)
        k = min(DEFAULT_FOLDS, int(counts[counts > 0].min()))
        group = self.default_group_by(recipe, samples)
        if group:
            k = min(k, len(set(samples.columns[group])))
        return k if k >= 2 else None

    def default_group_by(self, recipe: WeldRecipe, samples: Samples) -> str | None:
        """The data's group field (e.g. ``batch``) when every sample has a group id, else ``None``."""
        ds = samples.data["ds"]
        return (ds.group_field or "group") if ds.has_groups else None

    # -------------------------------------------------------------------------------- fit

    def _use_unet(self, recipe: WeldRecipe, ds: WeldDataset) -> tuple[bool, str]:
        if not recipe.segmentation.enabled:
            return False, "off (segmentation.enabled=false): fixed bands"
        if not ds.has_masks:
            missing = sum(s.mask is None for s in ds.samples)
            return False, f"off ({missing} of {len(ds.samples)} samples have no seam mask): fixed bands"
        return True, "trained on the training part's masks"

    def fit_model(self, recipe: WeldRecipe, samples: Samples, parts: dict[str, np.ndarray], run: RunFolder) -> Fitted | None:
        t, m, d = recipe.train, recipe.model, recipe.data
        set_threads(t)
        ds: WeldDataset = samples.data["ds"]
        spectra = samples.data["spectra"]
        tr = parts["train"]
        va = parts.get("val", np.zeros(0, int))
        fit_idx = np.concatenate([tr, va])
        if m.name in CLOSED_FORM and "fit" in parts:  # single-split candidate selection: the validation part stays unseen
            fit_idx = np.asarray(parts["fit"])
        use_unet, seam_note = self._use_unet(recipe, ds)
        unet, unet_info, unet_seconds = None, {}, 0.0
        if use_unet:
            t0 = time.perf_counter()
            unet, unet_info = train_seam_unet([ds.samples[i].image for i in tr], [ds.samples[i].mask for i in tr],
                                              recipe.segmentation, d.seg_size, recipe.seed, t, run.path, resume=run.resume)
            unet_seconds = time.perf_counter() - t0
        else:
            print(f"weld: seam U-Net {seam_note}", file=sys.stderr, flush=True)
        prep = fit_spectral_prep(spectra[tr], m.channels, m.num_channels, m.per_band, ds.wavelengths_nm, ds.channel_groups)
        predictor = WeldPredictor(None, unet, prep, d.seg_size, (d.crop_height, d.crop_width), d.segmented, ds.welds_per_sample)
        t0 = time.perf_counter()
        images = [ds.samples[i].image for i in fit_idx]
        crops = predictor.crops(images, predictor.masks(images))
        crops_seconds = time.perf_counter() - t0
        kwargs = model_kwargs(m, len(ds.classes), len(prep.selected), d.seq_len, ds.welds_per_sample)
        model = build_weld_model(m, kwargs)
        weights_source = getattr(getattr(getattr(model, "vision", None), "backbone", None), "weights_source", "n/a (no vision encoder)")
        s = prep.apply(spectra[fit_idx])
        y = samples.labels[fit_idx]
        features_seconds = 0.0
        if m.name in CLOSED_FORM:
            # a logistic regression on fixed features of train + val (no epochs, nothing to select on validation)
            from defectscope.models.linear_probe.torch_model import fit_logistic

            t0 = time.perf_counter()
            with torch.no_grad():
                feats = (model.features(torch.from_numpy(s)) if m.name == "weld_signal_stats"
                         else model.features(torch.from_numpy(crops).float() / 255.0)).double().numpy()
            w_, b_ = fit_logistic(feats, y, len(ds.classes))
            model.set_head(w_, b_)
            weights_source = getattr(getattr(model, "backbone", None), "weights_source", "n/a (closed-form fit on signal statistics)")
            info = {"epochs_run": 0, "best_checkpoint": "none (closed-form fit)", "cut_short": False, "stopped_by": "fit",
                    "train_seconds": round(time.perf_counter() - t0, 1)}
        else:
            module = WeldModule(model, len(ds.classes), t.lr, t.weight_decay, t.loss, t.focal_gamma, t.label_smoothing)
            x = crops
            t0 = time.perf_counter()
            if m.freeze_backbone and hasattr(model, "vision"):
                backbone = model.vision.backbone
                backbone.requires_grad_(False)
                x = cached_features(backbone, crops, precision=t.precision)
            features_seconds = time.perf_counter() - t0
            n_tr = len(tr)
            has_val = len(va) > 0
            info = fit_lightning(module, weld_loader(x[:n_tr], s[:n_tr], y[:n_tr], t.batch_size, True),
                                 weld_loader(x[n_tr:], s[n_tr:], y[n_tr:], t.batch_size, False) if has_val else None,
                                 t, run.path, self.monitor, "max", resume=run.resume)
            if info is None:
                return None
            model = module.model
        model = model.float().eval()
        predictor.model = model
        labels = ds.channel_labels
        info.update({
            "selected_channels": prep.selected,
            "selected_channel_names": [ds.channel_names[i] for i in prep.selected],
            "selected_wavelengths_nm": None if ds.wavelengths_nm is None else [ds.wavelengths_nm[i] for i in prep.selected],
            "seam_unet": seam_note, "unet_train_seconds": round(unet_seconds, 1),
            "crops_seconds": round(crops_seconds, 1), "features_seconds": round(features_seconds, 1),
        })
        ckpt = {
            "model_name": m.name, "model_kwargs": kwargs, "state_dict": model.state_dict(),
            "class_names": list(ds.classes), "recipe": recipe.model_dump(mode="json"),
            "selected_channels": prep.selected, "selected_channel_names": info["selected_channel_names"],
            "selected_wavelengths_nm": info["selected_wavelengths_nm"],
            "minmax_lo": [float(v) for v in prep.lo], "minmax_hi": [float(v) for v in prep.hi],
            "channels": [{"name": c["name"], "unit": c["unit"], "wavelength_nm": c.get("wavelength_nm"), "group": c["group"]}
                         for c in ds.channels],
            "channel_labels": labels, "wavelengths_nm": ds.wavelengths_nm,
            "welds_per_sample": ds.welds_per_sample, "crop_size": [d.crop_height, d.crop_width],
            "unet_kwargs": {"base": recipe.segmentation.base_channels, "depth": recipe.segmentation.depth},
            "unet_state_dict": unet.state_dict() if unet is not None else None,
            "synthetic": ds.synthetic, "weights_source": weights_source,
        }
        return Fitted(predictor, ckpt, info)

    def run_info(self, recipe: WeldRecipe, fitted: Fitted) -> dict:
        m = recipe.model
        return {"model": m.name, "fusion": m.fusion if m.name == "weld_fusion" else None, "embedding": m.embedding,
                "backbone": m.backbone, "weights": fitted.checkpoint["weights_source"], "synthetic": fitted.checkpoint["synthetic"],
                "crop_size": [recipe.data.crop_height, recipe.data.crop_width], "segmented": recipe.data.segmented}

    # -------------------------------------------------------------------------------- predict / metrics

    def predict_samples(self, recipe: WeldRecipe, fitted: Fitted, samples: Samples, idx: np.ndarray) -> Predictions:
        ds: WeldDataset = samples.data["ds"]
        pred: WeldPredictor = fitted.model
        out = pred.predict([ds.samples[i].image for i in idx], samples.data["spectra"][idx], with_attention=True)
        probs = out["probs"]
        names = samples.class_names
        table = {"pred": [names[int(p.argmax())] for p in probs],
                 **{f"prob_{n}": probs[:, c].tolist() for c, n in enumerate(names)}}
        labels = ds.channel_labels
        raw = {**out, "grid": getattr(pred.model, "grid", None), "corr": pred.prep.corr, "selected": pred.prep.selected,
               "selected_labels": [[labels[i] for i in pred.prep.selected]]}
        return Predictions(table, raw)

    def compute_metrics(self, recipe: WeldRecipe, samples: Samples, idx: np.ndarray, preds: Predictions) -> dict:
        """Table-4 classification metrics plus ``seam_dice``: mean Dice of the predicted seam masks
        against the true masks of the evaluated samples (``None`` without a U-Net or true masks)."""
        ds: WeldDataset = samples.data["ds"]
        metrics = classification_metrics(samples.labels[idx], preds.raw["probs"], samples.class_names)
        masks = preds.raw.get("masks")
        metrics["seam_dice"] = None if masks is None else seam_dice(masks, [ds.samples[i].mask for i in idx])
        return metrics

    def pool(self, preds: list[Predictions]) -> Predictions:
        """Concatenate folds: table columns, probabilities and masks; the selected channels of each fold."""
        table = {k: [v for p in preds for v in p.table[k]] for k in preds[0].table}
        masks = None if any(p.raw["masks"] is None for p in preds) else [mk for p in preds for mk in p.raw["masks"]]
        raw = {"probs": np.concatenate([p.raw["probs"] for p in preds]), "masks": masks,
               "selected_labels": [lab for p in preds for lab in p.raw["selected_labels"]]}
        return Predictions(table, raw)

    # -------------------------------------------------------------------------------- report

    def write_report(self, run: RunFolder, recipe: WeldRecipe, samples: Samples, idx: np.ndarray, preds: Predictions,
                     metrics: dict, info: dict) -> None:
        ds: WeldDataset = samples.data["ds"]
        m = recipe.model
        cv = info.pop("crossval", None)
        y = samples.labels[idx]
        title = f"defectscope weld: {m.name} ({m.fusion if m.name == 'weld_fusion' else 'baseline'}) on {ds.root.name}"
        sel = preds.raw["selected_labels"]
        run_kv = {"data": samples.description, **{k: v for k, v in info.items() if k in ("protocol", "samples", "split")},
                  "model": m.name, "fusion": m.fusion, "embedding": f"{m.embedding}, D={m.spectral_dim}",
                  "vision encoder": m.backbone,
                  "crop size (h x w)": f"{recipe.data.crop_height} x {recipe.data.crop_width}, segmented={recipe.data.segmented}",
                  "seam U-Net": info.get("seam_unet", self._use_unet(recipe, ds)[1]),
                  "selected channels": ", ".join(sel[0]) if len(sel) == 1 else
                  "; ".join(f"fold {k + 1}: {', '.join(s)}" for k, s in enumerate(sel)),
                  "seam Dice": metrics.get("seam_dice")}
        if not cv:
            run_kv.update({"epochs run": info.get("epochs_run"), "train seconds": info.get("train_seconds"),
                           "stage seconds": f"seam U-Net {info.get('unet_train_seconds')}, crops {info.get('crops_seconds')}, "
                                            f"frozen features {info.get('features_seconds')}"})
        write_weld_report(run, ds, title, run_kv, metrics, y, idx, preds.raw, info, cv)

    # -------------------------------------------------------------------------------- decisions

    def ok_class_of(self, recipe: WeldRecipe, samples: Samples) -> str | None:
        """The good-weld class: ``baseline`` (paper 000's reference condition) or a class named good / ok."""
        return next((c for c in samples.class_names if c.lower() in ("baseline", "good", "ok", "normal")), None)

    def decision_scores(self, recipe: WeldRecipe, samples: Samples, idx: np.ndarray,
                        preds: Predictions) -> tuple[np.ndarray, np.ndarray] | None:
        """Defective welds (class other than the OK class) and the defect score ``1 - p(OK class)``."""
        ok = self.ok_class_of(recipe, samples)
        if ok is None:
            return None
        k = samples.class_names.index(ok)
        return samples.labels[idx] != k, 1.0 - np.asarray(preds.raw["probs"])[:, k]

    def class_probs(self, preds: Predictions) -> np.ndarray | None:
        return np.asarray(preds.raw["probs"])

    def with_temperature(self, preds: Predictions, temperature: float) -> Predictions:
        return Predictions(preds.table, {**preds.raw, "probs": scale_probs(np.asarray(preds.raw["probs"]), temperature)})


register_task(WeldTask())


def demo_recipe(n_samples: int = 603) -> dict:
    """The recipe of ``defectscope demo`` (same values as ``configs/weld_fusion.yaml``, data simulated, one split).

    Sized for a shared 2-core CPU in <= 15 minutes: 256 px coupons, compact seam U-Net at 128 px for
    4 epochs, weld crops of 48 x 192 px, EfficientNet-Lite0 with ImageNet weights kept frozen (its
    feature maps are computed once), then up to 30 epochs of the fusion and head (5-minute safety cap),
    threads and precision chosen by this machine (``auto``, :mod:`defectscope.machine`). The demo is a
    single stratified 8:2 split at any size (``eval.folds: 1``).
    """
    return {"task": "weld", "seed": 0,
            "data": {"simulate": {"n_samples": n_samples, "seed": 0, "image_size": 256}, "crop_height": 48, "crop_width": 192,
                     "seg_size": 128, "test_fraction": 0.2, "split_seed": 0},
            "segmentation": {"epochs": 4, "batch_size": 8},
            "model": {"name": "weld_fusion", "fusion": "v2s", "embedding": "inverted", "spectral_dim": 96, "embed_dim": 128,
                      "backbone": "efficientnet_lite0", "pretrained": True, "freeze_backbone": True, "num_channels": 4},
            "train": {"epochs": 30, "batch_size": 16, "lr": 2.0e-4, "early_stopping_patience": 6, "max_minutes": 5.0,
                      "augment": False, "channels_last": False},
            "eval": {"folds": 1}}
