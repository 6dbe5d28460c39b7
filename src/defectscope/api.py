"""The Python API: train a recipe or a data folder, load a run, predict, evaluate, export.

::

    import defectscope

    run = defectscope.train("configs/neu_baseline.yaml", out="runs/neu", train__epochs=2)
    run.metrics["test"]["weighted_f1"]          # what metrics.json holds
    model = defectscope.load("runs/neu")        # or an exported .onnx file: same answers
    r = model.predict(["scratch.jpg"])[0]       # a Prediction
    r.label, r.scores, r.decision               # class, probabilities, accept / reject
    # segmentation: r.mask (bool [K, H, W]); detection: r.boxes; weld: r.attention

The CLI (:mod:`defectscope.cli`) calls exactly these functions. Every trained run is executed
through one :class:`~defectscope.deploy.predictor.Predictor` (PyTorch on a run folder, ONNX
Runtime on an exported file): ``predict``, ``evaluate``, ``export``, ``benchmark``, ``serve`` and
``inspect`` give the same answers for the same images.

Errors are :class:`~defectscope.errors.DefectscopeError` subclasses naming the file and the field
(``ConfigError`` for a bad recipe or override, ``RunError`` for a run folder that does not load,
``DatasetError`` for bad data, ``DeployError`` for a model file that cannot be executed as asked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from defectscope.deploy.adapters.base import ModelInfo
    from defectscope.deploy.predictor import Predictor
    from defectscope.deploy.results import Prediction


@dataclass
class Run:
    """A trained run folder (written by :func:`train`).

    Attributes:
        path: the run folder.
        result: what training returned (``metrics.json``'s content, or ``crossval.json``'s for a
            K-fold run); read from the folder when the run was opened with :func:`open_run`.
    """

    path: Path
    result: dict | None = None

    @property
    def task(self) -> str:
        """The run's task (``config.yaml``'s ``task``)."""
        from defectscope.engine.run import RunFolder

        return RunFolder(self.path).read_config()["task"]

    @property
    def config(self) -> dict:
        """The resolved recipe (``config.yaml``)."""
        from defectscope.engine.run import RunFolder

        return RunFolder(self.path).read_config()

    @property
    def metrics(self) -> dict:
        """``metrics.json`` (single split) or ``crossval.json`` (K folds)."""
        if self.result is not None:
            return self.result
        for name in ("metrics.json", "crossval.json"):
            f = self.path / name
            if f.is_file():
                return json.loads(f.read_text())
        from defectscope.engine.run import RunError

        raise RunError(f"{self.path}: no metrics.json or crossval.json; is it a finished run folder?")

    def load(self, threads: int | None = None, member: str | None = None) -> "Predictor":
        """:func:`load` of this run (PyTorch)."""
        return load(self.path, threads=threads, member=member)

    def predict(self, images: list, **kwargs) -> list["Prediction"]:
        """``self.load().predict(images)``: typed results, one per image."""
        return self.load().predict(images, **kwargs)

    def evaluate(self, data: str | Path, out: str | Path | None = None) -> dict:
        """:func:`evaluate` of this run on labelled ``data``."""
        return evaluate(self.path, data, out)

    def export(self, out: str | Path, opset: int = 17, member: str | None = None) -> "ModelInfo":
        """:func:`export` of this run to an ONNX file."""
        return export(self.path, out, opset=opset, member=member)


def open_run(path: str | Path) -> Run:
    """A :class:`Run` of an existing run folder.

    Raises:
        RunError: not a run folder (no readable ``config.yaml``).
    """
    run = Run(Path(path))
    run.task  # noqa: B018 - reads config.yaml: a clear error now instead of later
    return run


def overrides_from(kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
    """Keyword overrides to dotted keys: ``train__epochs=2`` -> ``("train.epochs", 2)``
    (a double underscore separates levels; a key may also be given with dots through ``**{"train.epochs": 2}``)."""
    return [(k.replace("__", "."), v) for k, v in kwargs.items()]


def recipe_for_folder(folder: str | Path, task: str | None = None, override: list[str] | None = None,
                      log: Callable[[str], None] | None = None) -> tuple[dict, dict]:
    """A recipe sized to a data folder: layout guess, data check, :func:`~defectscope.engine.autorecipe.size_recipe`.

    Args:
        folder: the data folder. task: the task to train (default: the guess).
        override: ``key.sub=value`` strings applied to the sized recipe.
        log: receives the evidence, the warnings and the choices, one message per call.

    Returns:
        ``(raw recipe, data check result)``.

    Raises:
        DatasetError: a folder whose layout is not recognised or cannot be trained as is.
    """
    from defectscope.config import _set_dotted, parse_overrides
    from defectscope.data.check import check_dataset, warn_on_leaks
    from defectscope.data.layout import guess_layout
    from defectscope.engine.autorecipe import explain, size_recipe

    say = log or (lambda m: None)
    folder = Path(folder)
    guess = guess_layout(folder, task)
    check = check_dataset(folder) if guess.task in ("classification", "segmentation", "detection") else {}
    for line in warn_on_leaks(check) if check else []:
        say(f"warning: {line}")
    d = guess.details
    say(f"{folder}: {guess.task} ({guess.layout} layout); " + "; ".join(guess.evidence))
    args = (guess.task, d["n_images"], d.get("class_counts"), d.get("image_hw"))
    raw = size_recipe(*args, root=d["root"], layout=guess.layout)
    if guess.task in ("segmentation", "detection"):
        layout = raw.get("data", {}).pop("layout", None)
        if guess.task == "segmentation" and layout not in (None, "kolektor"):
            from defectscope.data.images import DatasetError

            raise DatasetError(f"{folder}: segmentation data in the '{layout}' layout needs a manifest.csv "
                               "(id,split,defective) beside images/ and masks/ (see README, Data layouts)")
    for key, value in parse_overrides(override):
        _set_dotted(raw, key, value, f"{folder} (override)")
    say(explain(*args, root=d["root"], layout=guess.layout))
    return raw, check


def train(source: str | Path | dict, out: str | Path, *, folds: int | None = None, group_by: str | None = None,
          overwrite: bool = False, resume: bool = False, task: str | None = None, override: list[str] | None = None,
          log: Callable[[str], None] | None = None, **overrides: Any) -> Run:
    """Train a recipe (YAML file or dict) or a data folder into the run folder ``out``.

    Args:
        source: a recipe file (``configs/*.yaml``), a recipe dict, or a data folder (its layout is
            recognised and a recipe sized to it, see :func:`recipe_for_folder`).
        out: the run folder to write (atomically; see :func:`defectscope.engine.pipeline.train`).
        folds: 1 = one held-out split; K >= 2 = K-fold cross-validation (default: the recipe's).
        group_by: a metadata column or regex on sample ids whose matches share a fold.
        overwrite: replace an existing ``out`` once the new run succeeded.
        resume: continue an interrupted run from its last checkpoints.
        task: with a data folder, the task to train (overrides the guess).
        override: ``key.sub=value`` strings (the CLI's ``-o``).
        log: receives progress messages about a data folder's recipe.
        **overrides: recipe values by key, levels joined by ``__``: ``train__epochs=2``,
            ``data__image_size=128``.

    Returns:
        the :class:`Run` (``.metrics``, ``.path``, ``.load()``); ``None`` on DDP ranks other than 0.

    Raises:
        ConfigError: a bad recipe, override, or ``task`` with a recipe; RunError: ``out`` exists
        (without ``overwrite``) or is not writable; the task's data errors, naming the file.
    """
    import copy

    from defectscope.config import ConfigError, _set_dotted, load_raw, validate
    from defectscope.engine.pipeline import train as run_pipeline
    from defectscope.engine.tasks import get_task
    from defectscope.utils.io import write_json

    check = None
    if isinstance(source, dict):
        raw, where = copy.deepcopy(source), "recipe"
        from defectscope.config import parse_overrides

        for key, value in parse_overrides(override):
            _set_dotted(raw, key, value, f"{where} (override)")
    elif Path(source).is_dir():
        raw, check = recipe_for_folder(source, task, override, log)
        where = str(source)
    else:
        raw, where = load_raw(source, override), str(source)
    if task and not (not isinstance(source, dict) and Path(source).is_dir()):
        raise ConfigError("task= is for data folders; a recipe names its task in its 'task' key")
    for key, value in overrides_from(overrides):
        _set_dotted(raw, key, value, f"{where} (keyword override {key})")
    if "task" not in raw:
        raise ConfigError(f"{where}: missing 'task' key")
    if not isinstance(raw["task"], str):
        raise ConfigError(f"{where}: field 'task': expected a task name (text), got {raw['task']!r}")
    try:
        hooks = get_task(raw["task"])
    except KeyError as exc:
        raise ConfigError(f"{where}: field 'task': {exc.args[0] if exc.args else exc}") from None
    recipe = validate(raw, hooks.recipe, where)
    if check is None:
        check = check_recipe_data(raw, log)
    result = run_pipeline(recipe, out, folds=folds, group_by=group_by, overwrite=overwrite, resume=resume)
    if result is None:
        return None  # type: ignore[return-value]  (a non-zero DDP rank)
    if check:
        write_json(Path(out) / "data_check.json", check)
    return Run(Path(out), result)


#: tasks whose data folder ``train`` checks first (duplicates across classes leak between splits and folds)
CHECKED_TASKS = ("classification", "multicnn", "segmentation", "detection")


def check_recipe_data(raw: dict, log: Callable[[str], None] | None = None) -> dict | None:
    """The data check of a data folder (:func:`defectscope.data.check.check_dataset`) for a recipe:
    check its ``data.root`` and report the loud warnings (duplicates across classes, within a class,
    empty classes, unreadable files) through ``log`` (``print`` when ``None``) as ``warning: ...``.

    Returns the check result (``train`` writes it to ``RUN/data_check.json``), or ``None`` for tasks
    and data the check does not cover (it runs for :data:`CHECKED_TASKS` with a ``data.root`` folder).
    """
    from defectscope.config import resolve_path
    from defectscope.data.check import check_dataset, warn_on_leaks

    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    root = data.get("root")
    if raw.get("task") not in CHECKED_TASKS or not isinstance(root, str) or not resolve_path(root).is_dir():
        return None  # a bad root is reported by the task's own reader, naming the field
    check = check_dataset(resolve_path(root))
    for line in warn_on_leaks(check):
        (log or print)(f"warning: {line}")
    return check


def load(model: str | Path, *, threads: int | None = None, member: str | None = None) -> "Predictor":
    """A predictor of a run folder (PyTorch) or of an ``.onnx`` file from :func:`export` (ONNX Runtime).

    ``predictor.predict(images)`` gives one :class:`~defectscope.deploy.results.Prediction` per
    image (files, encoded bytes or ``uint8 [H, W, 3]`` arrays; weld models also take one signals
    array per image: ``predict(images, spectra)``).

    Args:
        threads: intra-op threads (``None``: the runtime's default).
        member: anomaly runs: optional, the run's own model name (a run holds one anomaly model).

    Raises:
        RunError: a run folder that does not load (missing, unsafe or from an older version: one
            line saying so); DeployError: neither a run folder nor a defectscope ONNX file.
    """
    from defectscope.deploy.predictor import load_predictor

    return load_predictor(model, threads=threads, member=member)


def predict(model: str | Path, inputs: list[str | Path], out: str | Path | None = None, *,
            threads: int | None = None, member: str | None = None, **options: Any) -> dict:
    """Predict files with a run (or an ONNX file) and write the task's output file.

    The files are what the task reads: image files or folders of them; weld data folders for
    ``weld``. The output format is the task's (``default_predict_out``): classification / multicnn /
    weld / anomaly a CSV of classes and probabilities (``preds.csv``), segmentation a run-length
    CSV (``masks.csv``), detection COCO JSON (``boxes.json``).

    Args:
        options: task options, e.g. ``save_images=True`` (segmentation, detection).

    Returns:
        ``{"predicted", "skipped": [(file, reason)], "out", ...}``.

    Raises:
        ConfigError: an option the task does not support; FileNotFoundError: an input path does
        not exist; RunError / DeployError: see :func:`load`.
    """
    from defectscope.utils.io import check_output_path

    p = load(model, threads=threads, member=member)
    out = Path(out) if out is not None else Path(p.adapter.default_predict_out)
    check_output_path(out, "file")
    p.adapter.check_predict_options(options)
    return p.adapter.predict_files(p, [Path(i) for i in inputs], out, **options)


def default_evaluation_out(model: str | Path, data: str | Path) -> Path:
    """Where :func:`evaluate` writes by default: ``RUN/evaluations/<data name>`` (beside an ONNX file:
    ``<file stem>_evaluations/<data name>``)."""
    model, data = Path(model), Path(data)
    name = data.stem if data.is_file() else data.name
    return model / "evaluations" / name if model.is_dir() else model.parent / f"{model.stem}_evaluations" / name


def evaluate(model: str | Path, data: str | Path, out: str | Path | None = None, *, threads: int | None = None,
             member: str | None = None) -> dict:
    """Evaluate a run (or an ONNX file) on labelled data; writes ``metrics.json`` and ``report.html``
    to ``out`` (default :func:`default_evaluation_out`) and returns the metrics.

    Raises:
        DatasetError / BoxFormatError / WeldDataError: the data (named file and field);
        RunError / DeployError: see :func:`load`.
    """
    from defectscope.utils.io import check_output_path

    out = Path(out) if out is not None else default_evaluation_out(model, data)
    check_output_path(out, "dir")
    p = load(model, threads=threads, member=member)
    return p.adapter.evaluate(p, Path(data), out)


def export(run: str | Path, out: str | Path = "model.onnx", *, opset: int = 17, member: str | None = None) -> "ModelInfo":
    """Export a run's model to ONNX (dynamic batch axis; metadata for standalone use by :func:`load`).

    Raises:
        DeployError: the model cannot run in ONNX (the message says why); RunError: see :func:`load`.
    """
    from defectscope.deploy.export import export_onnx
    from defectscope.utils.io import check_output_path

    check_output_path(Path(out), "file")
    return export_onnx(run, out, opset=opset, member=member)


__all__ = ["Run", "default_evaluation_out", "evaluate", "export", "load", "open_run", "predict", "recipe_for_folder",
           "train"]
