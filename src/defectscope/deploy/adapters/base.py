"""The per-task adapter interface that export, predictor, benchmark and service share.

A deployed model is a plain tensor function (named inputs -> named outputs) plus
the knowledge of how to turn a request into its inputs and its outputs into an
answer. That knowledge is task-specific and lives in one :class:`TaskAdapter`
per task (``classification``, ``multicnn``, ``segmentation``, ``detection``, ``anomaly``,
``weld``; a new task joins by registering its own adapter with :func:`register_adapter`).

Everything a runtime needs to use an exported model alone is a :class:`ModelInfo`,
stored in the ONNX file's ``metadata_props`` under ``defectscope.*`` keys (values
are JSON). Keys used by every task:

``defectscope.format``       ``"defectscope-onnx/1"``
``defectscope.task``         task name (selects the adapter)
``defectscope.model_name``   registry name of the model (``multiscale``, ``classifier``, ...)
``defectscope.model_kwargs`` arguments the model was built with
``defectscope.inputs``       ``{name: per-sample shape}``, e.g. ``{"image": [3, 200, 200]}``
``defectscope.outputs``      output names in order, e.g. ``["logits", "probabilities"]``
``defectscope.input_size``   ``[H, W]`` of the image input, pixels
``defectscope.input_format`` how the image input is laid out (``"float32 NCHW RGB in [0, 1]"``)
``defectscope.normalisation`` ``{"inside_model": true, "mean": [...], "std": [...]}``
``defectscope.class_names``  class names in output order
``defectscope.thresholds``   decision thresholds (``{}`` for arg-max classification)
``defectscope.source``       run folder the model came from; ``defectscope.checkpoint_sha256``

Of the weld family (image crops + signals, written by :mod:`defectscope.deploy.adapters.weld`):

``defectscope.spectra_shape``     per-sample raw signals shape ``[W, C, L]`` (welds, channels, samples;
                                  ``[C, L]`` with one weld), ``null`` for image-only weld models
``defectscope.spectral_channels`` the selected channels (index, name, wavelength nm)
``defectscope.spectra_normalisation`` per-channel min-max statistics (applied in preprocessing)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where a PyTorch model is built, never by an ONNX-only process
    from torch import nn

from defectscope.errors import DefectscopeError

ONNX_FORMAT = "defectscope-onnx/1"
META_PREFIX = "defectscope."

class DeployError(DefectscopeError, ValueError):
    """A model file or run cannot be deployed as asked; the message names the file and the field."""

@dataclass
class ModelInfo:
    """What a runtime needs to know about one deployable model.

    Attributes:
        task: task name (selects the :class:`TaskAdapter`).
        model_name: registry name of the model.
        model_kwargs: its constructor arguments.
        inputs: per-sample input shapes by name (without the batch axis).
        outputs: output names in the order the model returns them.
        input_size: ``(H, W)`` of the image input in pixels.
        input_format: layout and range of the image input.
        normalisation: where and how inputs are normalised.
        class_names: output class names (empty for tasks without classes).
        thresholds: decision thresholds by name.
        extra: task-specific fields (e.g. ``spectra_shape``, ``spectral_channels``).
        source: the run folder or file the model came from.
        sha256: SHA-256 of the checkpoint or ONNX file (model identity).
    """

    task: str
    model_name: str
    model_kwargs: dict
    inputs: dict[str, list[int]]
    outputs: list[str]
    input_size: tuple[int, int]
    input_format: str = "float32 NCHW RGB in [0, 1]"
    normalisation: dict = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    thresholds: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    source: str = ""
    sha256: str = ""

    def to_metadata(self) -> dict[str, str]:
        """``defectscope.*`` metadata properties (JSON values) for an ONNX file."""
        d = asdict(self)
        extra = d.pop("extra")
        sha = d.pop("sha256")
        meta = {META_PREFIX + "format": ONNX_FORMAT, META_PREFIX + "checkpoint_sha256": json.dumps(sha)}
        meta.update({META_PREFIX + k: json.dumps(v) for k, v in d.items()})
        meta.update({META_PREFIX + k: json.dumps(v) for k, v in extra.items()})
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str) -> "ModelInfo":
        """Rebuild from ONNX metadata properties.

        Raises:
            DeployError: not a defectscope ONNX file, or a field is missing / not JSON.
        """
        if meta.get(META_PREFIX + "format") != ONNX_FORMAT:
            raise DeployError(f"{where}: not a defectscope ONNX export (metadata 'defectscope.format' is "
                              f"{meta.get(META_PREFIX + 'format')!r}, expected {ONNX_FORMAT!r}); export with 'defectscope export RUN'")
        values: dict[str, Any] = {}
        for k, v in meta.items():
            if k.startswith(META_PREFIX) and k != META_PREFIX + "format":
                try:
                    values[k[len(META_PREFIX):]] = json.loads(v)
                except json.JSONDecodeError as exc:
                    raise DeployError(f"{where}: metadata '{k}' is not JSON ({exc})") from exc
        known = {f for f in cls.__dataclass_fields__ if f not in ("extra", "sha256")}
        missing = sorted({"task", "model_name", "inputs", "outputs", "input_size"} - set(values))
        if missing:
            raise DeployError(f"{where}: metadata lacks {', '.join('defectscope.' + m for m in missing)}")
        args = {k: values.pop(k) for k in list(values) if k in known}
        args["input_size"] = tuple(args["input_size"])
        sha = values.pop("checkpoint_sha256", "")
        return cls(**args, extra=values, sha256=sha)

    def identity(self, backend: str) -> dict:
        """Short JSON identity of the model for responses and logs."""
        return {"task": self.task, "model": self.model_name, "source": Path(self.source).name or self.source,
                "sha256": self.sha256[:16], "backend": backend}

def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

@dataclass
class EvalSet:
    """Labelled held-out inputs for measuring a runtime's quality.

    Attributes:
        inputs: batched model inputs by name, e.g. ``{"image": float32 [N, 3, H, W]}``.
        targets: task-specific targets (class indices ``[N]`` for classification).
        files: the source files, in order.
    """

    inputs: dict[str, np.ndarray]
    targets: np.ndarray
    files: list[Path]

class TaskAdapter:
    """How one task is exported, fed, answered and scored. Subclass and register per task.

    Subclasses set ``task`` and implement the methods that raise ``NotImplementedError``.
    """

    task: str = ""
    #: what the second number of :meth:`compare` measures (a benchmark column title)
    agreement_name: str = "same top-1"

    def load_torch(self, run_dir: Path) -> tuple[nn.Module, ModelInfo]:
        """Rebuild the trained model of a run as an export-ready module.

        Returns:
            ``(module, info)``: ``module(*inputs in info.inputs order)`` returns a tuple of
            tensors in ``info.outputs`` order, in eval mode, fp32.
        """
        raise NotImplementedError

    def load_run(self, run_dir: Path, required: tuple[str, ...] = ()) -> tuple["nn.Module", dict, Path]:
        """The trained model of a run folder, its checkpoint payload and ``model.ckpt``'s path
        (:meth:`~defectscope.engine.run.RunFolder.load_model`: tensors only, no code runs).

        Args:
            run_dir: the run folder.
            required: payload keys :meth:`load_torch` needs.

        Raises:
            DeployError: a required key is missing (names the file, the key and this task).
            RunError: no readable checkpoint.
        """
        from defectscope.engine.run import RunFolder

        rf = RunFolder(run_dir)
        model, payload = rf.load_model()
        for key in required:
            if key not in payload:
                raise DeployError(f"{rf.model_path}: payload has no '{key}'; not a {self.task} checkpoint")
        return model, payload, rf.model_path

    def preprocess(self, info: ModelInfo, image: np.ndarray, spectra: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One request's inputs (no batch axis) from a decoded ``uint8 [H, W, 3]`` image (and spectra).

        Raises:
            DeployError: spectra given to a model without a spectra input, or missing/wrong shape.
        """
        raise NotImplementedError

    def postprocess(self, info: ModelInfo, outputs: dict[str, np.ndarray], image: np.ndarray | None = None) -> dict:
        """A JSON-ready answer from one sample's outputs (no batch axis).

        The answer has at least ``class`` (or ``None``) and ``probabilities`` (or ``{}``)
        and ``overlay_png`` (base64 PNG or ``None``) where the task has a map, mask or boxes.
        """
        raise NotImplementedError

    #: what :meth:`map_image` returns (the file ``inspect --save-maps`` writes per image); ``None``: nothing
    map_kind: str | None = None

    def map_image(self, info: ModelInfo, outputs: dict[str, np.ndarray], image: np.ndarray) -> np.ndarray | None:
        """The task's picture output of one sample as an image to save (``inspect --save-maps``):
        ``uint8 [H, W]`` or ``[H, W, 3]`` at the size of the decoded request ``image`` ``uint8 [H, W, 3]``,
        described by :attr:`map_kind`; ``None`` for tasks without one (classification)."""
        return None

    # ---------------------------------------------------------------- files: ``defectscope predict`` / ``evaluate``

    #: options of ``defectscope predict`` this task supports (e.g. ``save_images``)
    predict_options: tuple[str, ...] = ()
    #: default output file of ``defectscope predict``
    default_predict_out: str = "preds.csv"

    def check_predict_options(self, options: dict) -> None:
        """Refuse ``predict`` options this task does not support (a set option not in :attr:`predict_options`).

        Raises:
            ConfigError: names the option and the task.
        """
        from defectscope.config import ConfigError

        for k, v in options.items():
            if v and k not in self.predict_options:
                raise ConfigError(f"--{k.replace('_', '-')} is not supported by task '{self.task}'")

    def predict_files(self, predictor, inputs: list[Path], out: Path, batch_size: int = 16, **options) -> dict:
        """``defectscope predict``: run ``predictor`` on image files (folders expanded) and write ``out``
        in the task's format (:meth:`write_predictions`); unreadable files are skipped and reported.

        Returns:
            ``{"predicted", "skipped": [(file, reason)], "out", ...}``.

        Raises:
            ConfigError: an option the task does not support; FileNotFoundError: an input path does not exist.
        """
        from defectscope.data.images import expand_inputs, iter_images

        self.check_predict_options(options)
        files = expand_inputs(inputs)
        done: list[Path] = []
        results: list = []
        skipped: list[tuple[Path, str]] = []
        batch: list[tuple[Path, np.ndarray]] = []

        def flush() -> None:
            results.extend(predictor.predict([im for _, im in batch], batch_size=len(batch)))
            done.extend(f for f, _ in batch)
            batch.clear()

        for f, img, err in iter_images(files, self.read_size(predictor)):
            if err:
                skipped.append((f, err))
                continue
            batch.append((f, img))
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
        summary = self.write_predictions(predictor, done, results, skipped, Path(out), **options)
        return {"predicted": len(done), "skipped": skipped, "out": str(out), **summary}

    def read_size(self, predictor) -> tuple[int, int] | None:
        """``(h, w)`` at which :meth:`predict_files` may read files, when the task's preprocessing is a
        plain resize to that size anyway (images above the pixel limit's default are then decoded
        reduced, in bounded memory: :func:`defectscope.data.images.load_image_resized`; smaller ones
        exactly as at full size); ``None``: read at full resolution (masks, boxes, maps in image pixels)."""
        return None

    def write_predictions(self, predictor, files: list[Path], results: list, skipped: list[tuple[Path, str]],
                          out: Path, **options) -> dict:
        """Write the predictions of ``files`` (typed :class:`~defectscope.deploy.results.Prediction`,
        in order) and the skipped files to ``out``; returns extra summary fields."""
        raise NotImplementedError

    def evaluate(self, predictor, data: Path, out: Path) -> dict:
        """``defectscope evaluate``: the metrics of ``predictor`` on the labelled data ``data``; writes
        ``out/metrics.json`` and ``out/report.html``; returns the metrics. Every task implements it."""
        raise NotImplementedError

    def eval_set(self, run_dir: Path, info: ModelInfo, limit: int | None = None, split: str = "test") -> EvalSet:
        """A split of the run (``RUN/split/<split>.txt``; ``test`` = held out) as model inputs and targets.

        ``limit`` keeps that many items spread evenly over the list. Calibration of int8
        quantisation uses ``split="train"``.

        Raises:
            DeployError: the list is missing or names an unknown class / missing file.
        """
        raise NotImplementedError

    def score(self, info: ModelInfo, outputs: dict[str, np.ndarray], targets: np.ndarray) -> tuple[str, float]:
        """``(metric name, value)`` of batched outputs against targets (e.g. accuracy in %)."""
        raise NotImplementedError

    def compare(self, info: ModelInfo, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[float, float | None]:
        """Agreement of one runtime's batched outputs ``got`` with the reference ``ref`` (eager fp32).

        Returns:
            ``(max |difference|`` over every output, share of samples with the same decision
            or ``None`` where the task has no single decision``)``.
        """
        return max(float(np.abs(np.asarray(ref[k], np.float64) - np.asarray(got[k], np.float64)).max()) for k in ref), None

    def onnx_unsupported(self, info: ModelInfo) -> str | None:
        """Why this model cannot run in ONNX (``None`` if it can), e.g. Grad-MobileNet's
        input-gradient features need a backward pass and stay on PyTorch."""
        return None

    def spectra_shape(self, info: ModelInfo) -> tuple[int, ...] | None:
        """Per-sample spectra shape (``(C, L)``, weld: ``(W, C, L)``) for multimodal models, ``None`` for image-only ones."""
        shape = info.extra.get("spectra_shape")
        return tuple(shape) if shape else None

    def example_inputs(self, info: ModelInfo, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs of the right shapes, ``[batch, *shape]`` float32 in [0, 1] (export, benchmark)."""
        rng = np.random.default_rng(seed)
        return {k: rng.random((batch, *shape), dtype=np.float32) for k, shape in info.inputs.items()}

_ADAPTERS: dict[str, TaskAdapter] = {}

def register_adapter(adapter: TaskAdapter) -> TaskAdapter:
    """Add a task adapter (one per task name)."""
    if adapter.task in _ADAPTERS:
        raise ValueError(f"deploy adapter for task '{adapter.task}' registered twice")
    _ADAPTERS[adapter.task] = adapter
    return adapter

#: the module that registers each built-in task's adapter; :func:`get_adapter` imports only the one asked
#: for, so an ONNX Runtime process of a classification model never imports torch (Ray workers start faster)
ADAPTER_MODULES = {task: f"defectscope.deploy.adapters.{task}"
                   for task in ("anomaly", "classification", "detection", "multicnn", "segmentation", "weld")}


def _ensure_loaded(task: str | None = None) -> None:
    """Import the adapter module of ``task`` (``None``: of every built-in task)."""
    import importlib

    for name in ([task] if task is not None else sorted(ADAPTER_MODULES)):
        if name in ADAPTER_MODULES and name not in _ADAPTERS:
            importlib.import_module(ADAPTER_MODULES[name])

# Trained tasks that export / predictor / serve do not handle, and why (shown in the error).
# (none at present: every trained task has an adapter)
UNSUPPORTED_TASKS: dict[str, str] = {}


def get_adapter(task: str) -> TaskAdapter:
    """The adapter of ``task``.

    Raises:
        DeployError: no adapter for that task (the message says why for the known tasks and lists the
            deployable ones).
    """
    _ensure_loaded(task)
    if task not in _ADAPTERS:
        deployable = ", ".join(sorted(set(_ADAPTERS) | set(ADAPTER_MODULES)))
        if task in UNSUPPORTED_TASKS:
            raise DeployError(f"task '{task}' is not supported by export/predictor/serve: {UNSUPPORTED_TASKS[task]}; "
                              f"supported tasks: {deployable}")
        raise DeployError(f"task '{task}' is not supported by export/predictor/serve (no deploy adapter); "
                          f"supported tasks: {deployable}")
    return _ADAPTERS[task]
