"""One training pipeline for every task, with k-fold cross-validation built in.

::

    recipe ──> task.load_samples ──> split (or K folds) ──> task.fit_model(train, val)
          ──> task.predict_samples(test) ──> task.compute_metrics ──> model.ckpt, metrics.json,
              report.html (task.write_report) ──> [folds] crossval.json, oof_predictions.csv

A task (``engine/<task>.py``) supplies only its hooks (:class:`TaskHooks`): how to read its
samples, how to fit its method (the method's own Lightning wrapper lives in
``models/<method>/lightning_model.py``), how to predict a subset, its metrics, its report
sections and its prediction writer for files. Everything else is here, once:

- **single split**: the task's split (stratified ``data.test_fraction`` by default, or the split
  the data define, e.g. KolektorSDD's manifest), then a stratified ``train.val_fraction`` of the
  training part for checkpoint selection; the test part is read once, after training. With
  several ``eval.candidates`` (as ``train FOLDER`` sizes them) every candidate is fitted on the same
  training part and compared on the same validation part; the best is the run (:func:`select_on_split`),
  the others stay in ``RUN/candidates/<name>``; the test part is read by no choice.
- **K folds** (``--folds K`` / ``eval.folds: K``): stratified K-fold on the samples (grouped with
  ``--group-by``); fold k trains on the other folds (its validation part taken from them) and
  predicts fold k. ``RUN/folds/<k>/`` is a normal run folder; ``RUN/crossval.json`` holds the
  per-fold metrics, their ``mean`` / ``std`` and the ``pooled`` metrics of all out-of-fold
  predictions; ``RUN/oof_predictions.csv`` one row per sample. Samples the data mark as test
  only (a source's own test split) are left out of cross-validation; samples that may not be
  trained on (defective images of an anomaly task) are only ever predicted.
- **atomic run folders**: a run is written into ``.<name>.partial`` beside ``--out`` and moved into
  place only when it succeeded; an existing run is refused unless ``overwrite`` is set, and then
  replaced only on success. Only rank 0 of a multi-process (DDP) run writes.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from defectscope.config import BaseRecipe, ConfigError
from defectscope.data.splits import stratified_split, write_file_list
from defectscope.engine.crossval import cv_folds, groups_from, mean_std, validation_split
from defectscope.engine.run import RunError, RunFolder
from defectscope.evaluation.run_report import crossval_table, report_sections, selection_section  # noqa: F401 (re-exported)
from defectscope.utils.io import write_json, write_text


@dataclass
class Samples:
    """A task's labelled data, addressed by position ``0 .. N-1``.

    Attributes:
        ids: ``N`` sample identities (file paths or sample ids), written to split lists and
            ``oof_predictions.csv``.
        labels: ``[N]`` int, the stratification label (class index; defective 0/1).
        class_names: name of each label value (``labels`` index into it).
        data: the task's own payload (items, arrays); the pipeline never reads it.
        columns: optional metadata columns (name -> ``N`` values) usable by ``--group-by``.
        test_only: optional ``[N]`` bool, samples of a test split the data define themselves
            (e.g. KolektorSDD's manifest ``val``): the single-split run tests on them,
            cross-validation leaves them out.
        trainable: optional ``[N]`` bool, samples that may be trained on (anomaly: good images
            only); the others are only predicted (they still count in the stratification).
        description: one line describing the data (report and metrics).
    """

    ids: list[str]
    labels: np.ndarray
    class_names: list[str]
    data: Any = None
    columns: dict[str, list] = field(default_factory=dict)
    test_only: np.ndarray | None = None
    trainable: np.ndarray | None = None
    description: str = ""

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Fitted:
    """A trained model as returned by :meth:`TaskHooks.fit_model`.

    Attributes:
        model: the trained model (``nn.Module`` in eval mode, or the task's own object).
        checkpoint: keyword arguments of :meth:`RunFolder.save_model` except ``task``:
            ``model_name``, ``model_kwargs``, ``state_dict`` and the task's extras.
        info: facts for ``metrics.json`` (``epochs_run``, ``best_checkpoint``,
            ``train_seconds``, ``cut_short`` ...).
        extras: anything else the task's own hooks need later (e.g. a reference model).
    """

    model: Any
    checkpoint: dict
    info: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)


@dataclass
class Predictions:
    """Out-of-sample predictions of a subset, in the order of the positions predicted.

    Attributes:
        table: columns for ``oof_predictions.csv`` (``pred`` and the task's scores), each a
            list with one entry per predicted sample.
        raw: the task's full outputs (probabilities, masks, boxes) for its metrics and report.
        extra: further per-sample arrays (first axis = samples), e.g. a reference model's
            probabilities; pooled by concatenation.
    """

    table: dict[str, list]
    raw: Any = None
    extra: dict = field(default_factory=dict)


class TaskHooks:
    """What a task implements to plug into the pipeline (subclass it; register the instance).

    Class attributes:
        name: task name used in recipes (``task: <name>``) and checkpoints.
        recipe: the task's pydantic recipe schema.
        monitor: what selects the checkpoint / stops early (stated in the schema docs).

    Hooks (``parts`` maps ``train`` / ``val`` / ``test`` to sorted position arrays); every hook the
    pipeline calls is a method of this class (a default where a task may leave it out):
        load_samples(recipe, run_dir) -> Samples     (``run_dir``: the staged run folder, where data
                                            the recipe generates, e.g. a simulated set, go; most tasks ignore it)
        default_folds(recipe, samples) -> int | None     (optional: folds when neither ``--folds``
                                            nor ``eval.folds`` is given; default ``None``: the recipe's)
        default_group_by(recipe, samples) -> str | None  (optional: a ``columns`` name to group by
                                            when neither ``--group-by`` nor ``eval.group_by`` is given)
        split(recipe, samples), split_info(recipe)       (optional: the single split and how it was made)
        fit_model(recipe, samples, parts, run) -> Fitted | None  (``None`` on DDP ranks > 0; ``run.resume``
                                            goes to :func:`~defectscope.engine.trainer.fit_lightning`;
                                            ``parts['fit']``, when present, is what a closed-form fit (no
                                            epochs, nothing selected on validation) may be fitted on, default
                                            train + val: single-split candidate selection keeps val unseen)
        predict_samples(recipe, fitted, samples, idx) -> Predictions
        compute_metrics(recipe, samples, idx, preds) -> dict
        pool(preds_list) -> Predictions     (default: concatenates columns and raw arrays)
        decision_scores(recipe, samples, idx, preds), class_probs(preds), with_temperature(preds, T),
        ok_class_of(recipe, samples)        (optional: operating points and calibration, :func:`decide`)
        run_info(recipe, fitted) -> dict    (optional: facts for ``metrics.json``)
        write_report(run, recipe, samples, idx, preds, metrics, info) -> None
        summary_keys -> metric names printed by the CLI

    A trained run is executed (``predict``, ``evaluate``, ``serve``, ...) by the deploy predictor
    (:mod:`defectscope.deploy.predictor`, through the task's adapter), not by these hooks.
    """

    name: str = ""
    recipe: type[BaseRecipe] = BaseRecipe
    monitor: str = ""
    summary_keys: tuple[str, ...] = ("accuracy", "weighted_f1")
    #: pooled out-of-fold metric that selects among candidates (higher is better; ties -> the cheaper)
    selection_metric: str = "accuracy"
    #: a validation part holding fewer samples than this of some class is dropped (fixed schedule,
    #: last weights): checkpoint selection / early stopping on 1-2 samples per class selects on noise
    min_val_per_class: int = 0

    def candidate(self, recipe: BaseRecipe, name: str) -> tuple[dict, float, str]:
        """Candidate ``name`` of a cross-validated run: ``(overrides, cost, description)``.

        ``overrides`` maps dotted recipe keys to values (applied to ``recipe``); ``cost`` ranks the
        candidates by compute (ties of the selection metric go to the cheaper). ``model`` is the
        recipe as written; tasks add their own (references, variants for tiny data).

        Raises:
            ConfigError: ``name`` is not a candidate of this task (the message lists them).
        """
        if name == "model":
            return {}, 1.0, "the recipe's model"
        raise ConfigError(f"eval.candidates: {name!r} is not a candidate of task '{self.name}'; known: "
                          f"{', '.join(self.candidate_names)}")

    #: the names :meth:`candidate` knows
    candidate_names: tuple[str, ...] = ("model",)

    def default_candidates(self, recipe: BaseRecipe, samples: "Samples") -> list[str]:
        """Candidates of a cross-validated run when ``eval.candidates`` is not set (default: the recipe's model only)."""
        return ["model"]


    def load_samples(self, recipe: BaseRecipe, run_dir: Path | None = None) -> Samples:  # pragma: no cover - interface
        """The task's samples of ``recipe.data``. ``run_dir``: the (staged) run folder, for tasks that
        write generated data into the run (weld's simulated set); the others ignore it."""
        raise NotImplementedError

    def default_folds(self, recipe: BaseRecipe, samples: Samples) -> int | None:
        """Folds to use when neither ``--folds`` nor the recipe's ``eval.folds`` is set (``None``: ``eval.folds``' default).

        A task overrides it to cross-validate small data sets by default.
        """
        return None

    def default_group_by(self, recipe: BaseRecipe, samples: Samples) -> str | None:
        """A ``samples.columns`` name to group by when neither ``--group-by`` nor ``eval.group_by`` is set (``None``: no groups)."""
        return None

    def split(self, recipe: BaseRecipe, samples: Samples) -> dict[str, np.ndarray]:
        """Single-split test part: the data's own test split, else stratified ``data.test_fraction``."""
        idx = np.arange(len(samples))
        if samples.test_only is not None and samples.test_only.any():
            return {"trainval": idx[~samples.test_only], "test": idx[samples.test_only]}
        data = getattr(recipe, "data", None)
        fraction = getattr(data, "test_fraction", 0.2)
        seed = getattr(data, "split_seed", 0)
        a, b = stratified_split(samples.labels, fraction, seed, samples.class_names,
                                str(getattr(data, "root", None) or samples.description or "") or None)
        return {"trainval": a, "test": b}

    def split_info(self, recipe: BaseRecipe) -> dict:
        """How the single split was made, for ``metrics.json`` ``split`` (beside the part sizes)."""
        data = getattr(recipe, "data", None)
        return {"seed": getattr(data, "split_seed", None), "test_fraction": getattr(data, "test_fraction", None)}

    def fit_model(self, recipe: BaseRecipe, samples: Samples, parts: dict[str, np.ndarray],
                  run: RunFolder) -> Fitted | None:  # pragma: no cover - interface
        raise NotImplementedError

    def predict_samples(self, recipe: BaseRecipe, fitted: Fitted, samples: Samples,
                        idx: np.ndarray) -> Predictions:  # pragma: no cover - interface
        raise NotImplementedError

    def compute_metrics(self, recipe: BaseRecipe, samples: Samples, idx: np.ndarray,
                        preds: Predictions) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def pool(self, preds: list[Predictions]) -> Predictions:
        """Concatenate predictions of several folds (columns, and ``raw`` arrays or lists)."""
        table = {k: [v for p in preds for v in p.table[k]] for k in preds[0].table}
        raws = [p.raw for p in preds]
        if all(isinstance(r, np.ndarray) for r in raws):
            raw = np.concatenate(raws)
        elif all(isinstance(r, list) for r in raws):
            raw = [v for r in raws for v in r]
        elif all(isinstance(r, dict) for r in raws):
            raw = {k: (np.concatenate([r[k] for r in raws]) if isinstance(raws[0][k], np.ndarray)
                       else [v for r in raws for v in r[k]]) for k in raws[0]}
        else:
            raw = raws
        extra = {k: np.concatenate([p.extra[k] for p in preds]) for k in preds[0].extra}
        return Predictions(table, raw, extra)

    def write_report(self, run: RunFolder, recipe: BaseRecipe, samples: Samples, idx: np.ndarray,
                     preds: Predictions, metrics: dict, info: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def decision_scores(self, recipe: BaseRecipe, samples: Samples, idx: np.ndarray,
                        preds: Predictions) -> tuple[np.ndarray, np.ndarray] | None:
        """``(is_defective bool [n], score float [n])`` of predicted samples for the OK-vs-defective
        decision (higher score = more likely defective), or ``None`` for tasks without one."""
        return None

    def class_probs(self, preds: Predictions) -> np.ndarray | None:
        """Class probabilities ``[n, K]`` of the predictions for calibration, or ``None``."""
        return None

    def ok_class_of(self, recipe: BaseRecipe, samples: Samples) -> str | None:
        """The class name meaning "no defect" of a classifier's run, stored with the decision threshold
        (``defect_score = 1 - p(OK class)``); ``None`` for tasks whose decision score is not a class
        probability (segmentation, detection, anomaly)."""
        return None

    def with_temperature(self, preds: Predictions, temperature: float) -> Predictions:
        """The predictions with temperature-scaled class probabilities (default: unchanged)."""
        return preds

    def run_info(self, recipe: BaseRecipe, fitted: Fitted) -> dict:
        """Task facts for ``metrics.json`` beside the pipeline's (model name, backbone, weights)."""
        return {}


def is_rank_zero() -> bool:
    """True in a single process and in rank 0 of a multi-process (DDP) run (Lightning's env vars)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 and int(os.environ.get("NODE_RANK", "0") or 0) == 0


class StagedRun:
    """Write a run into ``.<name>.partial`` beside ``out``; move it into place on success.

    Args:
        out: the run folder to produce.
        overwrite: replace an existing ``out`` (only once the new run succeeded).

    Raises:
        RunError: ``out`` exists and ``overwrite`` is false, ``out`` is a file, or its parent
            folder cannot be written.
    """

    def __init__(self, out: Path, overwrite: bool = False, resume: bool = False) -> None:
        self.out = Path(out)
        self.stage = self.out.parent / f".{self.out.name}.partial"
        self.resume = resume
        if resume and not self.stage.is_dir():
            raise RunError(f"{self.out}: nothing to resume (no interrupted run at {self.stage})"
                           + ("; the run is complete" if self.out.is_dir() else ""))
        if self.out.exists() and not self.out.is_dir():
            raise RunError(f"{self.out}: exists and is a file, not a run folder; choose another --out")
        if self.out.exists() and any(self.out.iterdir()) and not overwrite:
            raise RunError(f"{self.out}: exists; pass --overwrite to replace it (the old run is kept until the new one succeeds)")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"{self.out.parent}: cannot create the folder for --out ({exc.strerror})") from None
        if not os.access(self.out.parent, os.W_OK):
            raise RunError(f"{self.out.parent}: not writable; choose another --out")

    def __enter__(self) -> Path:
        if is_rank_zero() and not self.resume:
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage.mkdir(parents=True)
        return self.stage

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not is_rank_zero():
            return False
        if exc_type is not None:
            if exc_type in (KeyboardInterrupt, SystemExit) and any(self.stage.rglob("last*.ckpt")):
                print(f"interrupted: the partial run is kept at {self.stage}; continue it with --resume", flush=True)
                return False
            shutil.rmtree(self.stage, ignore_errors=True)
            return False
        old = self.out.parent / f".{self.out.name}.old"
        if self.out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
        os.replace(self.stage, self.out)
        shutil.rmtree(old, ignore_errors=True)
        return False


def _write_parts(run: RunFolder, samples: Samples, parts: dict[str, np.ndarray]) -> None:
    for k, idx in parts.items():
        if k == "fit":  # a subset of train (single-split candidate selection), not a part of its own
            continue
        write_file_list(run.split_dir / f"{k}.txt", [samples.ids[i] for i in idx],
                        [samples.class_names[samples.labels[i]] for i in idx])


def _with_validation(recipe: BaseRecipe, samples: Samples, trainval: np.ndarray, test: np.ndarray,
                     groups: np.ndarray | None, untrainable_to_test: bool = True,
                     min_val_per_class: int = 0) -> dict[str, np.ndarray]:
    """``train`` / ``val`` / ``test`` parts: ``val`` is a stratified share of the trainable ``trainval``.

    Samples of ``trainval`` that may not be trained on go to ``test`` (single split) or are
    dropped (``untrainable_to_test=False``: cross-validation predicts them in their own fold).
    A validation part with fewer than ``min_val_per_class`` samples of some class of ``trainval``
    is not made: the fit runs its fixed schedule and keeps the last weights (a note is printed).
    """
    if samples.trainable is not None:
        if untrainable_to_test:
            test = np.sort(np.concatenate([test, trainval[~samples.trainable[trainval]]]))
        trainval = trainval[samples.trainable[trainval]]
    fraction = recipe.train.val_fraction
    if fraction <= 0:
        return {"train": trainval, "test": test}
    a, b = validation_split(samples.labels[trainval], fraction, recipe.seed,
                            None if groups is None else groups[trainval])
    if min_val_per_class:
        present = np.unique(samples.labels[trainval])
        fewest = min(int((samples.labels[trainval[b]] == c).sum()) for c in present)
        if fewest < min_val_per_class:
            print(f"validation part of {len(b)} samples holds only {fewest} of some class (fewer than "
                  f"{min_val_per_class}): no validation part, the fixed schedule runs and the last weights are kept",
                  flush=True)
            return {"train": trainval, "test": test}
    return {"train": trainval[a], "val": trainval[b], "test": test}


def _fit_part(task: TaskHooks, recipe: BaseRecipe, samples: Samples, parts: dict[str, np.ndarray],
              run: RunFolder, extra: dict | None = None, score_val: bool = False,
              defer_report: bool = False) -> tuple[dict, Predictions, Any] | None:
    """Fit on ``parts``, evaluate ``parts['test']``, write a complete run folder.

    Args:
        score_val: also predict the validation part and put its metrics in the result's ``val``
            (single-split candidate selection compares the candidates on it).
        defer_report: do not write ``report.html`` yet; the third element of the result writes it
            when called with extra report facts (e.g. ``{"selection": ...}``).

    Returns:
        ``(metrics.json content, test predictions, write_report(extra_info: dict | None, at: RunFolder | None) -> None)``
        (``at``: the run folder's new place, when it was moved);
        ``None`` on DDP ranks > 0.
    """
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    if is_rank_zero():
        run.create()
        run.write_config(recipe.model_dump(mode="json"))
        _write_parts(run, samples, parts)
    start = time.perf_counter()
    fitted = task.fit_model(recipe, samples, parts, run)
    if fitted is None or not is_rank_zero():
        return None
    fit_seconds = time.perf_counter() - start
    env = run_environment(recipe)
    test = parts["test"]
    t0 = time.perf_counter()
    preds = task.predict_samples(recipe, fitted, samples, test)
    infer_seconds = time.perf_counter() - t0
    metrics = task.compute_metrics(recipe, samples, test, preds)
    val_metrics = None
    if score_val and len(parts.get("val", [])):
        val = parts["val"]
        val_metrics = task.compute_metrics(recipe, samples, val, task.predict_samples(recipe, fitted, samples, val))
    dec = decide(task, recipe, samples, parts, fitted, preds)
    metrics = {**metrics, **dec.metrics}
    run.save_model(task.name, **{**fitted.checkpoint, **dec.checkpoint})
    sizes = {k: int(len(v)) for k, v in parts.items() if k != "fit"}
    result = {
        "task": task.name,
        **task.run_info(recipe, fitted),
        "seed": recipe.seed,
        "data": samples.description,
        "split": {**(extra or {}).get("split", {}), **sizes},
        **fitted.info,
        "train_seconds": fitted.info.get("train_seconds", round(fit_seconds, 1)),
        "test_inference_seconds": round(infer_seconds, 2),
        "environment": env,
        **({"val": val_metrics} if val_metrics is not None else {}),
        "test": metrics,
    }
    result.update({k: v for k, v in (extra or {}).items() if k != "split"})
    run.write_metrics(result)
    info = {"data": samples.description, "split": result["split"], **fitted.info, "environment": env}
    if dec.report:
        info["decisions"] = dec.report

    def write_report(more: dict | None = None, at: RunFolder | None = None) -> None:
        where = at or run
        task.write_report(where, recipe, samples, test, preds, metrics, {**info, **(more or {})})
        add_machine_section(where.report_path, env)

    if not defer_report:
        write_report()
    return result, preds, write_report


def add_machine_section(report_path: Path, env: dict) -> None:
    """Append the "Machine" table (:func:`run_environment`) to a task's written report, so every
    task's report names the CPU, precision and threads its figures were measured with."""
    from defectscope.evaluation.report import append_kv

    if Path(report_path).is_file():
        append_kv(report_path, "Machine (a figure is comparable only with its machine beside it)",
                  {k: (", ".join(v) if isinstance(v, list) else v) for k, v in env.items()})


def run_environment(recipe: BaseRecipe) -> dict:
    """The machine record of a run (:func:`defectscope.machine.environment`) with the recipe's
    precision as resolved on this machine and torch's current thread count."""
    from defectscope.machine import environment, resolve_precision

    t = getattr(recipe, "train", None)
    prec = resolve_precision(getattr(t, "precision", "auto"), getattr(t, "accelerator", "cpu"))
    return environment(prec)


@dataclass
class Decisions:
    """What calibration and operating points add to a run (:func:`decide`); nothing is changed in place.

    Attributes:
        metrics: keys for ``metrics.json``'s ``test`` (``calibration``, ``operating_points``,
            ``operating_points_note``).
        checkpoint: keys for ``model.ckpt`` (``temperature``, ``decision``: the threshold predict
            and serve use, with the run's ``ok_class`` where the task has one).
        report: what the report's "Decisions" section draws (``None``: no section).
    """

    metrics: dict = field(default_factory=dict)
    checkpoint: dict = field(default_factory=dict)
    report: dict | None = None


def decide(task: TaskHooks, recipe: BaseRecipe, samples: Samples, parts: dict[str, np.ndarray], fitted: Fitted,
           preds: Predictions) -> Decisions:
    """Calibration (temperature on the validation part) and operating points (chosen on validation).

    Never reads the test part to choose anything: the test predictions only re-measure. Returns
    the additions to the metrics, the checkpoint and the report (:class:`Decisions`); the caller
    applies them.
    """
    from defectscope.evaluation.calibration import calibrate, logits_from_probs

    res = Decisions()
    val = parts.get("val")
    test = parts["test"]
    has_dec = task.decision_scores(recipe, samples, test, preds) is not None
    probs = task.class_probs(preds)
    if not has_dec and probs is None:
        return res
    if val is None or len(val) == 0:
        res.metrics["operating_points_note"] = ("no validation part (train.val_fraction = 0): thresholds and calibration "
                                                "need one, or use --folds for out-of-fold operating points")
        return res
    val_preds = task.predict_samples(recipe, fitted, samples, val)
    out: dict = {"chosen_on": "validation"}
    res.report = out
    vprobs = task.class_probs(val_preds)
    if probs is not None and vprobs is not None:
        cal = calibrate(logits_from_probs(vprobs), samples.labels[val], logits_from_probs(probs), samples.labels[test])
        res.metrics["calibration"] = cal
        res.checkpoint["temperature"] = float(cal["temperature"])
        out.update(calibration=cal, probs_before=probs, y_true=samples.labels[test])
        val_preds = task.with_temperature(val_preds, cal["temperature"])
        preds_t = task.with_temperature(preds, cal["temperature"])
        out["probs_after"] = task.class_probs(preds_t)
    else:
        preds_t = preds
    vd = task.decision_scores(recipe, samples, val, val_preds)
    td = task.decision_scores(recipe, samples, test, preds_t)
    if vd is None or td is None:
        return res
    ev = getattr(recipe, "eval", None)
    targets = list(ev.escape_rate_targets) if ev else [0.05, 0.01, 0.001]
    if not vd[0].any() or vd[0].all():
        res.metrics["operating_points_note"] = "the validation part holds only one kind (good or defective): no operating points"
        return res
    from defectscope.evaluation.decisions import operating_points

    points = operating_points(vd[1], vd[0], targets, test_scores=td[1], test_defective=td[0])
    res.metrics["operating_points"] = points
    chosen = (ev.decision_target if ev and ev.decision_target else targets[0])
    point = min(points, key=lambda p: abs(p["target_escape_rate"] - chosen))
    decision = {k: point[k] for k in ("target_escape_rate", "threshold", "escape_rate_upper_95", "false_call_rate",
                                      "n_defective_used")}
    ok = task.ok_class_of(recipe, samples)
    if ok is not None:
        decision["ok_class"] = ok
    res.checkpoint["decision"] = decision
    out.update(points=points, val=vd, test=td)
    return res


def train(recipe: BaseRecipe, out: str | Path, folds: int | None = None, group_by: str | None = None,
          overwrite: bool = False, task: TaskHooks | None = None, resume: bool = False) -> dict | None:
    """Train a recipe into the run folder ``out``: single split, or K-fold cross-validation.

    Args:
        recipe: a validated recipe (its ``task`` names a registered task).
        out: run folder; written atomically (see :class:`StagedRun`).
        folds: ``None``: the recipe's ``eval.folds``; 1: single split; K >= 2: K-fold CV.
        group_by: ``None``: the recipe's ``eval.group_by``; else a metadata column or a regex on
            sample ids whose matches share a fold (views of one part, frames of one run).
        overwrite: replace an existing run folder once the new run has succeeded.
        task: the task hooks (default: the registered task of ``recipe.task``).
        resume: continue an interrupted run (killed, out of memory, Ctrl-C) from the partial
            folder ``.<name>.partial``: every fit restarts from its ``checkpoints/last.ckpt``
            (saved at each epoch end, so at most the interrupted epoch is lost); finished fits
            stop at once. Give the same recipe, folds and groups as the interrupted run.

    Returns:
        ``metrics.json``'s content (single split) or ``crossval.json``'s (folds); ``None`` on
        DDP ranks other than 0.

    Raises:
        RunError: ``out`` exists (without ``overwrite``) or is not writable.
        ConfigError: folds / group settings that do not fit the data.
        The task's data errors (DatasetError, WeldDataError, ...), naming the file.
    """
    from defectscope.engine.tasks import get_task

    task = task or get_task(recipe.task)
    ev = getattr(recipe, "eval", None)
    folds_given = folds is not None or (ev is not None and "folds" in ev.model_fields_set)
    group_given = group_by is not None or (ev is not None and "group_by" in ev.model_fields_set)
    folds = int(folds if folds is not None else (ev.folds if ev else 1))
    group_by = group_by if group_by is not None else (ev.group_by if ev else None)
    if folds < 1:
        raise ConfigError(f"--folds must be >= 1, got {folds}")
    with StagedRun(Path(out), overwrite, resume) as stage:
        samples = task.load_samples(recipe, run_dir=stage)
        if not folds_given:
            k = task.default_folds(recipe, samples)
            if k is not None and k != folds:
                folds = int(k)
                print(f"{task.name}: {len(samples)} samples: {folds}-fold cross-validation by default "
                      f"(--folds 1 or eval.folds: 1 for a single split)", flush=True)
        if not group_given:
            g = task.default_group_by(recipe, samples)
            if g:
                group_by = g
                print(f"{task.name}: grouped by the data's {g!r} field ({len(set(map(str, samples.columns[g])))} groups): "
                      f"a group never spans two folds, nor train and validation (--group-by '' to ungroup)", flush=True)
        if folds < 1:
            raise ConfigError(f"folds must be >= 1, got {folds}")
        if ev is not None:  # the config.yaml written to the run states the folds and groups used: it re-runs the same
            recipe = recipe.model_copy(update={"eval": ev.model_copy(update={"folds": folds, "group_by": group_by or None})})
        groups = groups_from(group_by, samples.ids, samples.columns)
        if folds == 1:
            split = task.split(recipe, samples)
            parts = _with_validation(recipe, samples, split["trainval"], split["test"], groups,
                                     min_val_per_class=task.min_val_per_class)
            extra = {"split": task.split_info(recipe)}
            ev = getattr(recipe, "eval", None)
            cands = candidates_of(task, recipe, samples, single_split=True) if ev is not None and ev.candidates else []
            if len(cands) > 1 and not len(parts.get("val", [])):
                keep = next((c for c in cands if c.name == "model"), cands[0])
                note = (f"eval.candidates ({', '.join(c.name for c in cands)}) not compared: this single split has no "
                        "validation part (train.val_fraction = 0, or too few samples per class), and the test part "
                        f"must not choose; '{keep.name}' is trained (--folds K compares them on folds)")
                print(f"warning: {note}", flush=True)
                extra["selection_note"] = note
                cands = [keep]
            if ev is not None and ev.nested:
                print("--nested: a single split selects on its validation part and measures on a test part no choice "
                      "read, so its test figure is already unbiased (nested selection is for --folds K)", flush=True)
            if len(cands) > 1:
                return select_on_split(task, recipe, cands, samples, parts, Path(stage), extra, resume)
            res = _fit_part(task, cands[0].recipe if cands else recipe, samples, parts, RunFolder(stage, resume), extra)
            if res is not None and cands:
                RunFolder(stage).write_config(recipe.model_dump(mode="json"))  # the recipe as given re-runs the same
            return None if res is None else res[0]
        return cross_validate(task, recipe, samples, Path(stage), folds, groups, group_by, resume=resume)


@dataclass
class Candidate:
    """One model evaluated on the folds of a cross-validated run.

    Attributes:
        name: the task's candidate name (``model`` = the recipe's own model).
        recipe: the recipe with the candidate's overrides applied (validated).
        cost: compute rank (ties of the selection metric go to the lower).
        description: one line for the report.
        overrides: the dotted keys it changes.
    """

    name: str
    recipe: BaseRecipe
    cost: float
    description: str
    overrides: dict = field(default_factory=dict)


def candidates_of(task: TaskHooks, recipe: BaseRecipe, samples: Samples, single_split: bool = False) -> list[Candidate]:
    """The candidates of a run: ``eval.candidates``, else the task's default (cross-validation) or the
    recipe's model alone (``single_split``: a hand-written single-split recipe trains its model as
    written; listing ``eval.candidates`` opts in, as ``train FOLDER``'s sized recipes do).

    Raises:
        ConfigError: an unknown candidate name, or overrides the task's schema refuses.
    """
    from defectscope.config import _set_dotted, validate

    ev = getattr(recipe, "eval", None)
    if ev is not None and ev.candidates:
        names = list(ev.candidates)
    else:
        names = ["model"] if single_split else task.default_candidates(recipe, samples)
    out, seen = [], set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        overrides, cost, text = task.candidate(recipe, name)
        raw = recipe.model_dump(mode="json")
        for key, value in overrides.items():
            _set_dotted(raw, key, value, f"candidate {name!r}")
        out.append(Candidate(name, validate(raw, type(recipe), f"candidate {name!r}"), float(cost), text, dict(overrides)))
    return out


def _run_folds(task: TaskHooks, recipe: BaseRecipe, samples: Samples, out: Path, assign: np.ndarray,
               pool_idx: np.ndarray, groups: np.ndarray | None, group_by: str | None, label: str = "",
               resume: bool = False, reports: bool = True) -> dict | None:
    """Fit and predict every fold of ``assign`` (fold ``k`` in ``out/folds/<k+1>``); ``None`` on DDP ranks > 0.

    ``reports=False``: no ``report.html`` per fold (the nested inner fits, whose folders are discarded).

    Returns ``{"fold_metrics", "fold_preds", "order", "fold_of", "idx", "pooled_preds", "pooled",
    "mean", "std"}``.
    """
    folds = int(assign.max()) + 1
    fold_metrics, fold_preds, order, fold_of = [], [], [], []
    for k in range(folds):
        test = np.sort(pool_idx[assign == k])
        trainval = np.sort(pool_idx[assign != k])
        parts = _with_validation(recipe, samples, trainval, test, groups, untrainable_to_test=False,
                                 min_val_per_class=task.min_val_per_class)
        print(f"{label + ': ' if label else ''}fold {k + 1}/{folds}: train {len(parts['train'])}, "
              f"val {len(parts.get('val', []))}, test {len(parts['test'])}", flush=True)
        res = _fit_part(task, recipe, samples, parts, RunFolder(out / "folds" / str(k + 1), resume),
                        {"split": {"fold": k + 1, "folds": folds, "cv_seed": recipe.seed, "group_by": group_by}},
                        defer_report=not reports)
        if res is None:
            return None
        fold_metrics.append(res[0]["test"])
        fold_preds.append(res[1])
        order.append(parts["test"])
        fold_of += [k + 1] * len(parts["test"])
    idx = np.concatenate(order)
    pooled_preds = task.pool(fold_preds)
    pooled = task.compute_metrics(recipe, samples, idx, pooled_preds)
    mean, std = mean_std(fold_metrics)
    return {"fold_metrics": fold_metrics, "fold_preds": fold_preds, "order": order, "fold_of": fold_of, "idx": idx,
            "pooled_preds": pooled_preds, "pooled": pooled, "mean": mean, "std": std}


def _score(metrics: dict, key: str) -> float:
    v = metrics.get(key)
    return float(v) if isinstance(v, (int, float)) and v is not None and np.isfinite(v) else float("-inf")


def choose_candidate(cands: list[Candidate], pooled: dict[str, dict], key: str,
                     where: str = "pooled out-of-fold") -> tuple[Candidate, str]:
    """The candidate with the best ``key`` in ``pooled`` (each candidate's pooled out-of-fold metrics, or
    its validation metrics on a single split; higher is better); ties go to the lower cost, then to
    the earlier in the list. Returns ``(candidate, why)`` (one sentence; ``where`` names the figure)."""
    best = max(range(len(cands)), key=lambda i: (round(_score(pooled[cands[i].name], key), 9), -cands[i].cost, -i))
    c = cands[best]
    top = _score(pooled[c.name], key)
    tied = [o.name for o in cands if o is not c and round(_score(pooled[o.name], key), 9) == round(top, 9)]
    why = f"highest {where} {key} ({top:.4f})"
    if tied:
        why += f", tied with {', '.join(tied)} and cheaper or listed first"
    others = [f"{o.name} {_score(pooled[o.name], key):.4f}" for o in cands if o is not c]
    if others:
        why += f"; the others: {', '.join(others)}"
    return c, why


SELECTION_NOTE = ("The candidate was chosen on the same folds that give its figure, so the selected figure is "
                  "optimistic (the best of several noisy estimates); `--nested` (eval.nested: true) selects inside "
                  "each outer fold and reports an unbiased figure beside it.")


SPLIT_SELECTION_NOTE = ("The candidate was chosen on the validation part, so its validation figure is optimistic (the "
                        "best of several noisy estimates; fine-tuned candidates also chose their checkpoint on it). The "
                        "test part was read by no choice: the chosen model's test figure is the estimate. Closed-form "
                        "candidates (probes, statistics) were fitted on the training part only, so the validation part "
                        "is unseen by every candidate's weights.")


def select_on_split(task: TaskHooks, recipe: BaseRecipe, cands: list[Candidate], samples: Samples,
                    parts: dict[str, np.ndarray], out: Path, extra: dict, resume: bool = False) -> dict | None:
    """Single split with several candidates: every candidate fitted on the same training part, compared on
    the same validation part, the best one delivered; the test part is read by no choice.

    Each candidate is a normal run folder ``out/candidates/<name>`` (fitted on ``parts['train']``;
    closed-form fits get ``parts['fit'] = parts['train']`` so that they never see the validation part
    that compares them; fine-tuning keeps its checkpoint selection / early stopping on it). The
    candidate with the best validation :attr:`TaskHooks.selection_metric` (ties: the cheaper,
    :func:`choose_candidate`) is moved to ``out`` itself (``model.ckpt``, ``metrics.json``, its
    report); ``out/config.yaml`` is ``recipe`` as given (re-running it repeats the selection).
    ``metrics.json`` adds ``selection_metric``, ``selected_on``, ``candidates`` (each one's
    validation figures), ``chosen``, ``chosen_because`` and ``selection_note``; its ``test`` is the
    chosen model's (every candidate's folder measures its own test figures too; no choice reads them).

    Returns:
        the chosen run's ``metrics.json`` content; ``None`` on DDP ranks > 0.
    """
    key = task.selection_metric
    fits: dict[str, tuple] = {}
    fit_parts = {**parts, "fit": parts["train"]}
    print(f"{len(cands)} candidates on the same split (train {len(parts['train'])}, val {len(parts['val'])}, "
          f"test {len(parts['test'])}), compared on the validation part", flush=True)
    for c in cands:
        print(f"candidate {c.name}: {c.description}", flush=True)
        res = _fit_part(task, c.recipe, samples, fit_parts, RunFolder(out / "candidates" / c.name, resume), extra,
                        score_val=True, defer_report=True)
        if res is None:
            return None
        fits[c.name] = res
    chosen, why = choose_candidate(cands, {n: r[0].get("val", {}) for n, r in fits.items()}, key,
                                   where=f"validation ({len(parts['val'])} samples)")
    print(f"chosen: {chosen.name} ({why})", flush=True)
    table = {c.name: {"description": c.description, "cost": c.cost, "overrides": c.overrides,
                      "val": _summary(fits[c.name][0].get("val", {})),
                      "run": "." if c is chosen else f"candidates/{c.name}"} for c in cands}
    for c in cands:
        if c is not chosen:
            fits[c.name][2]()
    src = out / "candidates" / chosen.name
    for entry in src.iterdir():
        os.replace(entry, out / entry.name)
    src.rmdir()
    run = RunFolder(out)
    run.write_config(recipe.model_dump(mode="json"))
    result, _, write_report = fits[chosen.name]
    result = {**result, "selection_metric": key,
              "selected_on": f"validation part ({len(parts['val'])} samples); the test part was read by no choice",
              "candidates": table, "chosen": chosen.name, "chosen_because": why, "selection_note": SPLIT_SELECTION_NOTE}
    run.write_metrics(result)
    fitted_on = (f"fitted on the training part ({len(parts['train'])} samples)"
                 + ("" if result.get("stopped_by") == "fit" else ", its checkpoint chosen on the validation part"))
    write_report({"selection": {"candidates": table, "chosen": chosen.name, "why": why, "key": key, "on": "validation",
                                "note": SPLIT_SELECTION_NOTE, "test": _summary(result["test"]),
                                "model": {"what": f"'{chosen.name}' {fitted_on}; its test figures are the estimate"}}},
                 at=run)
    return result


def _nested(task: TaskHooks, cands: list[Candidate], samples: Samples, assign: np.ndarray, pool_idx: np.ndarray,
            groups: np.ndarray | None, evals: dict[str, dict], key: str, seed: int) -> dict | None:
    """Nested cross-validation: inside each outer fold, the candidates are compared by an inner
    stratified (grouped) cross-validation of the outer training part; the outer fold is predicted by
    the candidate that won there (its outer-fold fit is the one of the flat evaluation, same data).

    Returns ``{"pooled", "mean", "std", "chosen_per_fold", "inner_folds", "inner"}`` or ``None`` (DDP).
    The inner fits run in a temporary folder that is removed.
    """
    import tempfile

    folds = int(assign.max()) + 1
    chosen, inner_scores, inner_k = [], [], []
    with tempfile.TemporaryDirectory(prefix="defectscope-nested-") as tmp:
        for k in range(folds):
            trainval = np.sort(pool_idx[assign != k])
            tv = trainval if samples.trainable is None else trainval[samples.trainable[trainval]]
            y = samples.labels[tv]
            g = None if groups is None else groups[tv]
            counts = np.bincount(y)
            ki = min(folds, int(counts[counts > 0].min()), len(set(g)) if g is not None else len(tv))
            if ki < 2:
                raise ConfigError(f"--nested: outer fold {k + 1} leaves too few samples of some class for an inner "
                                  "cross-validation (at least 2 per class needed)")
            inner = cv_folds(y, ki, g, seed, class_names=samples.class_names, source=f"outer fold {k + 1}")
            pooled = {}
            for c in cands:
                res = _run_folds(task, c.recipe, samples, Path(tmp) / str(k + 1) / c.name, inner, tv, groups, None,
                                 label=f"nested {k + 1}/{folds} {c.name}", reports=False)
                if res is None:
                    return None
                pooled[c.name] = res["pooled"]
                shutil.rmtree(Path(tmp) / str(k + 1) / c.name, ignore_errors=True)
            win, _ = choose_candidate(cands, pooled, key)
            chosen.append(win.name)
            inner_k.append(ki)
            inner_scores.append({n: _score(p, key) for n, p in pooled.items()})
    preds = [evals[chosen[k]]["fold_preds"][k] for k in range(folds)]
    idx = np.concatenate([evals[chosen[k]]["order"][k] for k in range(folds)])
    pooled_preds = task.pool(preds)
    recipe = next(c.recipe for c in cands if c.name == chosen[0])
    pooled = task.compute_metrics(recipe, samples, idx, pooled_preds)
    mean, std = mean_std([evals[chosen[k]]["fold_metrics"][k] for k in range(folds)])
    return {"pooled": _summary(pooled), "mean": mean, "std": std, "chosen_per_fold": chosen, "inner_folds": inner_k,
            "inner_pooled_" + key: inner_scores}


def _summary(metrics: dict) -> dict:
    """The scalar headline metrics of a metrics dict (for the candidate table)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _refit(task: TaskHooks, chosen: Candidate, samples: Samples, pool_idx: np.ndarray, groups: np.ndarray | None,
           out: Path, ev: dict, resume: bool = False) -> dict | None:
    """Fit the chosen candidate on all trainable samples of the cross-validation (same procedure as each
    fold: the same fixed schedule, or the same validation share) and save ``out/model.ckpt``.

    The temperature and the OK-vs-defective threshold stored with it are fitted on the pooled
    out-of-fold predictions (the refit model has no held-out part of its own). Returns facts for
    ``crossval.json`` ``model``; ``None`` on DDP ranks > 0.
    """
    from defectscope.evaluation.calibration import calibrate, logits_from_probs

    recipe = chosen.recipe
    parts = _with_validation(recipe, samples, pool_idx, np.zeros(0, dtype=int), groups, untrainable_to_test=False,
                             min_val_per_class=task.min_val_per_class)
    print(f"refit {chosen.name} on all {len(parts['train']) + len(parts.get('val', []))} trainable samples "
          f"(train {len(parts['train'])}, val {len(parts.get('val', []))})", flush=True)
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    run = RunFolder(out, resume).create()
    _write_parts(run, samples, {k: v for k, v in parts.items() if k != "test"})
    start = time.perf_counter()
    fitted = task.fit_model(recipe, samples, parts, run)
    if fitted is None or not is_rank_zero():
        return None
    seconds = time.perf_counter() - start
    notes = []
    preds = ev["pooled_preds"]
    probs = task.class_probs(preds)
    if probs is not None:
        y = samples.labels[ev["idx"]]
        try:
            cal = calibrate(logits_from_probs(probs), y)
            fitted.checkpoint["temperature"] = float(cal["temperature"])
            preds = task.with_temperature(preds, cal["temperature"])  # thresholds apply to the scaled scores
            notes.append(f"temperature {cal['temperature']:.3f} fitted on the pooled out-of-fold probabilities")
        except ValueError as exc:
            notes.append(f"no temperature ({exc})")
    evc = getattr(recipe, "eval", None)
    targets = list(evc.escape_rate_targets) if evc else [0.05, 0.01, 0.001]
    dec = task.decision_scores(recipe, samples, ev["idx"], preds)
    points = None
    if dec is not None and dec[0].any() and not dec[0].all():
        from defectscope.evaluation.decisions import operating_points

        points = operating_points(dec[1], dec[0], targets)
    if points:
        target = evc.decision_target if evc and evc.decision_target else targets[0]
        point = min(points, key=lambda p: abs(p["target_escape_rate"] - target))
        fitted.checkpoint["decision"] = {k: point[k] for k in ("target_escape_rate", "threshold", "escape_rate_upper_95",
                                                               "false_call_rate", "n_defective_used")}
        ok = getattr(task, "ok_class_of", lambda r, s: None)(recipe, samples)
        if ok is not None:
            fitted.checkpoint["decision"]["ok_class"] = ok
        notes.append(f"decision threshold for escape rate {point['target_escape_rate']} chosen on the pooled "
                     "out-of-fold scores")
    run.save_model(task.name, **fitted.checkpoint)
    return {"file": "model.ckpt", "candidate": chosen.name,
            "what": (f"'{chosen.name}' refit on all {len(parts['train']) + len(parts.get('val', []))} trainable samples "
                     "with the same procedure as each fold; its expected performance is the pooled out-of-fold "
                     "estimate of that candidate (the refit itself has no held-out data)"),
            "samples": {k: int(len(v)) for k, v in parts.items() if k != "test"},
            "train_seconds": round(seconds, 1), "notes": notes,
            **{k: fitted.info[k] for k in ("epochs_run", "stopped_by", "cut_short") if k in fitted.info},
            **task.run_info(recipe, fitted)}


def cross_validate(task: TaskHooks, recipe: BaseRecipe, samples: Samples, out: Path, folds: int,
                   groups: np.ndarray | None = None, group_by: str | None = None, resume: bool = False) -> dict | None:
    """Stratified K-fold cross-validation of ``recipe``'s candidates on ``samples``, then the chosen one refit.

    Samples marked ``test_only`` are left out. Every candidate (:func:`candidates_of`: ``eval.candidates``
    or the task's default, e.g. the recipe's model, a linear probe, a variant for tiny data) is
    evaluated on the same folds: fold ``k`` trains on the other folds' trainable samples (validation
    part taken from them) and predicts every sample of fold ``k``. The candidate with the best pooled
    out-of-fold :attr:`TaskHooks.selection_metric` (ties: the cheaper) is chosen; its fold runs are
    ``out/folds/<k>`` (normal run folders; the others' under ``out/candidates/<name>/folds/<k>``).
    Then the chosen candidate is **refit on all trainable samples** with the same procedure and
    saved as ``out/model.ckpt`` (a normal run model: predict, evaluate, export, serve, inspect load
    it); its figure is the pooled out-of-fold estimate. With ``eval.nested`` the selection is also
    repeated inside each outer fold (:func:`_nested`) for an unbiased figure.

    Returns:
        ``{"folds": [...], "mean": {...}, "std": {...}, "pooled": {...}, "n", "k", "candidates",
        "chosen", "model", ...}``, also written to ``out/crossval.json``; ``out/oof_predictions.csv``
        holds one row per sample (``file, fold, true, pred`` and the task's score columns) of the
        chosen candidate.

    Raises:
        ConfigError: too few samples of a class (named, with the largest K that works) or too few
            groups for ``folds`` folds; an unknown candidate.
    """
    pool_idx = np.arange(len(samples))
    if samples.test_only is not None:
        pool_idx = pool_idx[~samples.test_only]
    labels = samples.labels[pool_idx]
    assign = cv_folds(labels, folds, None if groups is None else groups[pool_idx], recipe.seed,
                      class_names=samples.class_names,
                      source=str(getattr(getattr(recipe, "data", None), "root", None) or samples.description or "the data"))
    cands = candidates_of(task, recipe, samples)
    key = task.selection_metric
    evals: dict[str, dict] = {}
    for c in cands:
        where = out if len(cands) == 1 else out / "candidates" / c.name
        if len(cands) > 1:
            print(f"candidate {c.name}: {c.description}", flush=True)
        res = _run_folds(task, c.recipe, samples, where, assign, pool_idx, groups, group_by,
                         label=c.name if len(cands) > 1 else "", resume=resume)
        if res is None:
            return None
        evals[c.name] = res
    chosen, why = choose_candidate(cands, {n: e["pooled"] for n, e in evals.items()}, key)
    if len(cands) > 1:
        os.replace(out / "candidates" / chosen.name / "folds", out / "folds")
        shutil.rmtree(out / "candidates" / chosen.name, ignore_errors=True)
        print(f"chosen: {chosen.name} ({why})", flush=True)
    ev = evals[chosen.name]
    idx, pooled_preds, pooled = ev["idx"], ev["pooled_preds"], ev["pooled"]
    fold_metrics, mean, std = ev["fold_metrics"], ev["mean"], ev["std"]
    decisions = None
    dec = task.decision_scores(chosen.recipe, samples, idx, pooled_preds)
    if dec is not None and dec[0].any() and not dec[0].all():
        from defectscope.evaluation.decisions import operating_points

        evc = getattr(recipe, "eval", None)
        points = operating_points(dec[1], dec[0], list(evc.escape_rate_targets) if evc else [0.05, 0.01, 0.001])
        pooled["operating_points"] = points
        decisions = {"points": points, "val": dec, "test": (None, None), "chosen_on": "out-of-fold predictions"}
    nested = None
    evc = getattr(recipe, "eval", None)
    if evc is not None and evc.nested:
        if len(cands) < 2:
            print("--nested: a single candidate, nothing is selected: the out-of-fold figure is already unbiased", flush=True)
        else:
            nested = _nested(task, cands, samples, assign, pool_idx, groups, evals, key, recipe.seed)
            if nested is None:
                return None
    model = _refit(task, chosen, samples, pool_idx, groups, out, ev, resume)
    if model is None:
        return None
    table = {c.name: {"description": c.description, "cost": c.cost, "overrides": c.overrides,
                      "pooled": _summary(evals[c.name]["pooled"]),
                      "mean": {k: v for k, v in evals[c.name]["mean"].items() if "." not in k},
                      "std": {k: v for k, v in evals[c.name]["std"].items() if "." not in k},
                      "folds": "folds" if c is chosen else f"candidates/{c.name}/folds"} for c in cands}
    result = {
        "task": task.name,
        "k": folds,
        "n": int(len(idx)),
        "seed": recipe.seed,
        "group_by": group_by,
        "data": samples.description,
        "folds": fold_metrics,
        "mean": mean,
        "std": std,
        "pooled": pooled,
        "selection_metric": key,
        "candidates": table,
        "chosen": chosen.name,
        "chosen_because": why,
        "selection_note": SELECTION_NOTE if len(cands) > 1 else "a single candidate: nothing was selected on these folds",
        "model": model,
        "environment": run_environment(recipe),
    }
    if nested is not None:
        result["nested"] = nested
    run = RunFolder(out).create()
    run.write_config(recipe.model_dump(mode="json"))
    write_json(out / "crossval.json", result)
    _write_oof(out / "oof_predictions.csv", samples, idx, ev["fold_of"], pooled_preds)
    info = {"data": samples.description, "protocol": f"stratified {folds}-fold cross-validation, seed {recipe.seed}"
            + (f", grouped by {group_by!r}" if group_by else ""), "samples": len(idx)}
    selection = {"candidates": table, "chosen": chosen.name, "why": why, "key": key, "model": model,
                 "note": result["selection_note"], "nested": nested}
    task.write_report(run, chosen.recipe, samples, idx, pooled_preds, pooled,
                      {**info, "environment": result["environment"],
                       "crossval": {"folds": fold_metrics, "mean": mean, "std": std, "pooled": pooled},
                       "selection": selection, **({"decisions": decisions} if decisions else {})})
    add_machine_section(run.report_path, result["environment"])
    return result


def _write_oof(path: Path, samples: Samples, idx: np.ndarray, fold_of: list[int], preds: Predictions) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = list(preds.table)
    w.writerow(["file", "fold", "true", *cols])
    for j, i in enumerate(idx):
        w.writerow([samples.ids[i], fold_of[j], samples.class_names[samples.labels[i]],
                    *[_cell(preds.table[c][j]) for c in cols]])
    write_text(path, buf.getvalue())


def _cell(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    return str(v)


def fit_seconds(start: float) -> float:
    """Seconds since ``start`` (``time.perf_counter()``), rounded to 0.1."""
    return round(time.perf_counter() - start, 1)
