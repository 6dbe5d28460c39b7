"""The ``multicnn`` task: multi-CNN feature fusion classifier (paper 003), on the shared pipeline.

Recipe (``task: multicnn``)::

    data:    {root: ../shared/datasets/neu-det, image_size: 200, test_fraction: 0.2, split_seed: 0}
    members:                       # fusion order = this order (documented in metrics.json feature_order)
      - {backbone: efficientnet_lite0, pretrained: true, freeze: 3, freeze_unit: stages}
      - {backbone: efficientnet_lite1, pretrained: true, freeze: 3}
    train:   {epochs: 3, batch_size: 16, lr: 1.0e-3, lr_end: 1.0e-4, loss: ce}     # each member
    fusion:  {epochs: 50, batch_size: 40, lr: 1.0e-3, lr_end: 1.0e-4, dropout: 0.5}

Schema: :class:`defectscope.recipes.multicnn.MultiCNNRecipe`; report:
:func:`defectscope.evaluation.multicnn_report.write_multicnn_report`. This module holds the task's hooks.

Protocol (paper 003, sections 2.4 and 3), for the training part the pipeline hands over (the
single split's, or each cross-validation fold's; ``train.val_fraction`` of it is the validation
part):

1. Each member (a registry backbone + global pooling + dropout 0.5 + linear) is
   fine-tuned with its first ``freeze`` stages/layers frozen, RMSprop with the
   learning rate decaying exponentially from ``lr`` to ``lr_end`` over the run,
   cross-entropy, and online augmentation (horizontal/vertical flips, rotation by
   an arbitrary angle, colour change)
   (:class:`~defectscope.models.multicnn.lightning_model.MemberModule`). The checkpoint
   with the best validation weighted F1 (``val/weighted_f1``, max) is kept; each member is
   a complete ``classification`` run folder under ``RUN/members/<name>``.
2. Feature fusion: the fine-tuned extractors are frozen, their pooled features
   (cached on disk, see :mod:`defectscope.models.multicnn.feature_cache`) are
   concatenated in member order and only dropout + linear is trained; the epoch with the
   best validation weighted F1 (ties: lower validation loss) is kept
   (:func:`~defectscope.models.multicnn.lightning_model.train_fusion_head`).
3. Late fusion: the members' softmax probabilities are averaged.

The held-out part is predicted once, after training. ``metrics.json`` ``test`` holds the
fused model's figures, ``test.members`` one entry per single model plus ``late_fusion``, and
``test.comparison`` the Tables 2-3 layout; the top-level ``members`` holds each member's
training facts (freezing, epochs, seconds). With ``--folds K`` the same figures are pooled over
the out-of-fold predictions (``crossval.json`` ``pooled``) and averaged over folds
(``mean`` / ``std``, e.g. ``members.lite0.weighted_f1``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from defectscope.config import ClassifierTrainConfig
from defectscope.data.images import load_labelled_samples
from defectscope.data.splits import write_file_list
from defectscope.engine.pipeline import Fitted, Predictions, Samples, TaskHooks
from defectscope.engine.run import RunFolder
from defectscope.engine.tasks import get_task, register_task
from defectscope.engine.trainer import fit_lightning
from defectscope.evaluation.classification import classification_metrics
from defectscope.evaluation.multicnn_report import write_multicnn_report
from defectscope.models import create_model
from defectscope.models.multicnn import FeatureCache, FeatureFusionClassifier, data_fingerprint, freeze_first, late_fusion
from defectscope.models.multicnn.lightning_model import (
    MemberModule,
    extract_features,
    predict_member_probs,
    train_fusion_head,
)
from defectscope.recipes.multicnn import MemberConfig, MultiCNNRecipe, MultiCNNTrainConfig


@dataclass
class Member:
    """A fine-tuned single model: ``classifier`` in eval mode, its input side, its training facts."""

    model: nn.Module
    size: int
    facts: dict


@dataclass
class MultiCNNModel:
    """What :meth:`MultiCNNTask.fit_model` returns as ``Fitted.model``.

    Attributes:
        fused: the :class:`FeatureFusionClassifier` (frozen fine-tuned extractors + trained head).
        members: the members by name, in fusion order.
        cache: the run's :class:`FeatureCache`.
        cache_stats: ``{"dir", "hits", "misses", "entries"}``, updated by every :meth:`features`
            call (training parts and the predicted part); the same dict is ``Fitted.info["feature_cache"]``.
    """

    fused: FeatureFusionClassifier
    members: dict[str, Member]
    cache: FeatureCache
    cache_stats: dict

    def features(self, files: list[Path], x: np.ndarray, part: str) -> torch.Tensor:
        """Concatenated pooled features ``[N, sum_i C_i]`` (members in order) of uint8 images ``x`` ``[N, 3, S, S]``.

        Read from the cache when the extractor, the ordered ``files`` (their bytes) and the sizes
        match an entry; computed and stored otherwise. ``part`` names the cache files.
        """
        fp = data_fingerprint(files)
        blocks = []
        for i, (key, member) in enumerate(self.members.items()):
            f, hit = self.cache.get_or_compute(
                self.fused.extractors[i], files, self.fused.image_size,
                lambda i=i: extract_features(self.fused, i, x), prefix=f"{key}-{part}", data_fp=fp,
                member_size=member.size)
            blocks.append(f)
            self.cache_stats["entries"].append({"member": key, "split": part, "hit": hit, "shape": list(f.shape)})
        self.cache_stats["hits"], self.cache_stats["misses"] = self.cache.hits, self.cache.misses
        return torch.cat(blocks, dim=1)


def _loader(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool) -> DataLoader:
    """Batches of ``(uint8 [B, 3, S, S], int64 [B])``; a partial last batch is dropped when shuffling more than one batch."""
    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long()), batch_size=batch_size,
                      shuffle=shuffle, num_workers=0, drop_last=shuffle and len(y) > batch_size)


def _row(name: str, kind: str, m: dict) -> dict:
    return {"model": name, "kind": kind, "accuracy": m["accuracy"], "weighted_precision": m["weighted_precision"],
            "weighted_recall": m["weighted_recall"], "weighted_f1": m["weighted_f1"], "macro_auroc": m["macro_auroc"]}


class MultiCNNTask(TaskHooks):
    """The ``multicnn`` task: hooks of the shared pipeline (:mod:`defectscope.engine.pipeline`).

    The saved model (``multicnn_fusion``) keeps the classification checkpoint contract
    (``class_names``, ``image_size``, input RGB in [0, 1]); ``predict`` and ``evaluate`` run it through
    the deploy predictor (:mod:`defectscope.deploy.adapters.multicnn`), as the ``classification`` task.
    """

    name = "multicnn"
    recipe = MultiCNNRecipe
    monitor = "val/weighted_f1"
    summary_keys = ("accuracy", "weighted_f1", "macro_auroc")

    def load_samples(self, recipe: MultiCNNRecipe, run_dir: Path | None = None) -> Samples:
        """The labelled images of ``data.root`` (as in ``classification``); ``data`` holds ``x`` and ``files``."""
        d = recipe.data
        imgs = load_labelled_samples(d.root, d.image_size, d.layout, d.max_per_class, d.split_seed, recipe.train.progress)
        return Samples([str(f) for f in imgs.files], imgs.labels, imgs.class_names, {"x": imgs.x, "files": imgs.files},
                       description=imgs.description)

    def _member_config(self, recipe: MultiCNNRecipe, m: MemberConfig, mt: MultiCNNTrainConfig, size: int) -> dict:
        """The ``classification`` recipe a member run folder records (validated by that task's schema)."""
        train = {f: getattr(mt, f) for f in ClassifierTrainConfig.model_fields if f in MultiCNNTrainConfig.model_fields}
        raw = {"task": "classification", "seed": recipe.seed,
               "data": {**recipe.data.model_dump(mode="json"), "image_size": size},
               "model": {"name": "classifier", "backbone": m.backbone, "pretrained": m.pretrained,
                         "weights": m.weights, "dropout": m.dropout},
               "train": {**train, "class_balance": "off"}}
        return get_task("classification").recipe.model_validate(raw).model_dump(mode="json")

    def _fit_member(self, recipe: MultiCNNRecipe, m: MemberConfig, samples: Samples, parts: dict[str, np.ndarray],
                    run: RunFolder) -> Member:
        """Fine-tune one member on ``parts['train']`` (checkpoint on ``parts['val']``) into ``RUN/members/<name>``.

        The member folder gets its config (a ``classification`` recipe), split lists and
        ``model.ckpt`` here; its ``metrics.json`` and ``report.html`` once the held-out part is
        predicted (:meth:`write_report`).
        """
        t = recipe.train
        x, y, names = samples.data["x"], samples.labels, samples.class_names
        size = m.image_size or recipe.data.image_size
        mt = t.model_copy(update={"epochs": m.epochs or t.epochs, "batch_size": m.batch_size or t.batch_size})
        mrun = RunFolder(run.path / "members" / m.key).create()
        mrun.write_config(self._member_config(recipe, m, mt, size))
        for part, idx in parts.items():
            write_file_list(mrun.split_dir / f"{part}.txt", [samples.ids[i] for i in idx], [names[y[i]] for i in idx])
        L.seed_everything(recipe.seed, workers=True, verbose=False)
        kwargs = {"backbone": m.backbone, "num_classes": len(names), "image_size": size, "dropout": m.dropout}
        model = create_model("classifier", **kwargs, pretrained=m.pretrained, weights=m.weights)
        freeze = freeze_first(model.backbone.body, m.freeze, m.freeze_unit)
        module = MemberModule(model, len(names), size, lr=mt.lr, lr_end=mt.lr_end, rmsprop_alpha=mt.rmsprop_alpha,
                              weight_decay=mt.weight_decay, loss=mt.loss, focal_gamma=mt.focal_gamma,
                              label_smoothing=mt.label_smoothing, augment=mt.augment, augmentation=mt.augmentation,
                              channels_last=mt.channels_last)
        tr, val = parts["train"], parts.get("val")
        has_val = val is not None and len(val) > 0
        info = fit_lightning(module, _loader(x[tr], y[tr], mt.batch_size, True),
                             _loader(x[val], y[val], mt.batch_size, False) if has_val else None,
                             mt, mrun.path, MemberModule.monitor, MemberModule.mode, resume=run.resume)
        model = module.model.to(memory_format=torch.contiguous_format).float().eval()
        weights = model.backbone.weights_source
        mrun.save_model("classification", "classifier", kwargs, model.state_dict(), class_names=names,
                        image_size=size, normalisation="inside model: input RGB in [0, 1]", weights_source=weights)
        facts = {"backbone": m.backbone, "weights": weights, "image_size": size, "freeze": freeze.as_dict(),
                 "frozen": f"first {freeze.n} {freeze.unit}: {freeze.frozen_params:,} of {freeze.total_params:,} parameters",
                 **info}
        return Member(model, size, facts)

    def fit_model(self, recipe: MultiCNNRecipe, samples: Samples, parts: dict[str, np.ndarray],
                  run: RunFolder) -> Fitted:
        """Fine-tune every member, then train the fusion head on their cached features (train / val parts only)."""
        t0 = time.perf_counter()
        x, y, files = samples.data["x"], samples.labels, samples.data["files"]
        members = {m.key: self._fit_member(recipe, m, samples, parts, run) for m in recipe.members}
        member_seconds = time.perf_counter() - t0

        # feature fusion: frozen fine-tuned extractors, cached pooled features, dropout + linear
        spec = [{"name": k, "backbone": m.backbone, "image_size": members[k].size}
                for k, m in zip(members, recipe.members)]
        fusion_kwargs = {"members": spec, "num_classes": len(samples.class_names), "dropout": recipe.fusion.dropout,
                         "image_size": recipe.data.image_size}
        fused = create_model("multicnn_fusion", **fusion_kwargs)
        for i, member in enumerate(members.values()):
            fused.extractors[i].load_state_dict(member.model.backbone.state_dict())
        fused.eval()
        cfg = recipe.fusion
        stats = {"dir": cfg.cache_dir or "feature_cache (in the run folder)", "hits": 0, "misses": 0, "entries": []}
        ens = MultiCNNModel(fused, members, FeatureCache(Path(cfg.cache_dir) if cfg.cache_dir else run.path / "feature_cache"),
                            stats)
        t1 = time.perf_counter()
        fit_parts = [s for s in ("train", "val") if len(parts.get(s, ()))]
        feats = {s: ens.features([files[i] for i in parts[s]], x[parts[s]], s) for s in fit_parts}
        feature_seconds = time.perf_counter() - t1
        t2 = time.perf_counter()
        head_log = train_fusion_head(fused, feats, {s: y[parts[s]] for s in fit_parts}, cfg.epochs, cfg.batch_size,
                                     cfg.lr, cfg.lr_end, recipe.seed)
        fusion_seconds = time.perf_counter() - t2
        checkpoint = {"model_name": "multicnn_fusion", "model_kwargs": fusion_kwargs, "state_dict": fused.state_dict(),
                      "class_names": samples.class_names, "image_size": recipe.data.image_size,
                      "normalisation": "inside model: input RGB in [0, 1]", "feature_order": fused.feature_slices()}
        info = {
            "members_order": list(members),
            "feature_order": [{"member": n, "start": a, "end": b} for n, a, b in fused.feature_slices()],
            "members": {k: m.facts for k, m in members.items()},
            "cut_short": any(m.facts.get("cut_short") for m in members.values()),
            "train_seconds": round(time.perf_counter() - t0, 1),
            "member_seconds": round(member_seconds, 1),
            "feature_seconds": round(feature_seconds, 1),
            "fusion_seconds": round(fusion_seconds, 2),
            "feature_cache": stats,
            "fusion_training": head_log,
        }
        return Fitted(ens, checkpoint, info)

    def run_info(self, recipe: MultiCNNRecipe, fitted: Fitted) -> dict:
        return {"model": "multicnn_fusion"}

    def predict_samples(self, recipe: MultiCNNRecipe, fitted: Fitted, samples: Samples, idx: np.ndarray) -> Predictions:
        """Fused, per-member and late-fusion probabilities of the samples ``idx``.

        Returns:
            ``table``: ``pred`` and ``prob_<class>`` of the fused model, ``pred_<member>`` and
            ``pred_late_fusion``; ``raw``: ``{<member>: [n, K], "feature_fusion": [n, K],
            "late_fusion": [n, K]}`` probabilities.
        """
        ens: MultiCNNModel = fitted.model
        x = samples.data["x"][idx]
        feats = ens.features([samples.data["files"][i] for i in idx], x, "test")
        with torch.no_grad():
            fused = F.softmax(ens.fused.forward_head(feats), dim=1).numpy()
        raw = {k: predict_member_probs(m.model, x, m.size) for k, m in ens.members.items()}
        raw["feature_fusion"] = fused
        raw["late_fusion"] = late_fusion([raw[k] for k in ens.members])
        names = samples.class_names
        table = {"pred": [names[int(c)] for c in fused.argmax(1)],
                 **{f"prob_{n}": fused[:, c].tolist() for c, n in enumerate(names)},
                 **{f"pred_{k}": [names[int(c)] for c in raw[k].argmax(1)] for k in [*ens.members, "late_fusion"]}}
        return Predictions(table, raw)

    def compute_metrics(self, recipe: MultiCNNRecipe, samples: Samples, idx: np.ndarray, preds: Predictions) -> dict:
        """Classification metrics of the fused model, plus ``members`` (each member and ``late_fusion``),
        ``comparison`` (paper 003 Tables 2-3 rows), ``best_single`` and ``fusion_beats_best_single``."""
        y, names, raw = samples.labels[idx], samples.class_names, preds.raw
        keys = [m.key for m in recipe.members]
        fused = classification_metrics(y, raw["feature_fusion"], names)
        members = {k: classification_metrics(y, raw[k], names) for k in [*keys, "late_fusion"]}
        comparison = [_row(k, "single", members[k]) for k in keys]
        comparison += [_row("feature_fusion", "fused", fused), _row("late_fusion", "late", members["late_fusion"])]
        best = max(comparison[: len(keys)], key=lambda r: r["weighted_f1"])
        return {**fused, "members": members, "comparison": comparison, "best_single": best["model"],
                "fusion_beats_best_single": fused["weighted_f1"] >= best["weighted_f1"]}

    def write_report(self, run: RunFolder, recipe: MultiCNNRecipe, samples: Samples, idx: np.ndarray,
                     preds: Predictions, metrics: dict, info: dict) -> None:
        """``report.html`` of the run (or of the cross-validation); completes the member run folders."""
        if "crossval" not in info:
            self._finish_members(run, recipe, samples, idx, preds, metrics, info)
        write_multicnn_report(run, recipe.members, Path(recipe.data.root).name, samples.class_names,
                              samples.labels[idx], preds.raw, metrics, info)

    def _finish_members(self, run: RunFolder, recipe: MultiCNNRecipe, samples: Samples, idx: np.ndarray,
                        preds: Predictions, metrics: dict, info: dict) -> None:
        """Each member folder's ``metrics.json`` and ``report.html`` (the ``classification`` task's report)."""
        cls = get_task("classification")
        for m in recipe.members:
            mrun = RunFolder(run.path / "members" / m.key)
            facts, mm = info["members"][m.key], metrics["members"][m.key]
            mrun.write_metrics({"task": "classification", "member_of": "../..", "model": "classifier",
                                "backbone": m.backbone, "weights": facts["weights"], "seed": recipe.seed,
                                "image_size": facts["image_size"], "freeze": facts["freeze"],
                                "data": info.get("data"), "split": info.get("split"),
                                **{k: facts.get(k) for k in ("epochs_run", "best_checkpoint", "train_seconds",
                                                             "cut_short", "stopped_by")},
                                "test": mm})
            member_recipe = cls.recipe.model_validate(mrun.read_config())
            cls.write_report(mrun, member_recipe, samples, idx, Predictions({}, preds.raw[m.key]), mm,
                             {"member of": "the multicnn run ../..", "data": info.get("data"),
                              "frozen": facts["frozen"], "epochs run": facts.get("epochs_run"),
                              "train seconds": facts.get("train_seconds")})


register_task(MultiCNNTask())
