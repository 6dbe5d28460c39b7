"""Recipe files: YAML + ``-o key=value`` overrides, validated by pydantic.

A recipe is a YAML mapping with a ``task`` key naming a registered task
(see :mod:`defectscope.engine.tasks`). Each task declares its own schema (a
subclass of :class:`BaseRecipe`); unknown keys are errors, so a typo such as
``train.epoch`` is reported instead of silently ignored.

Example::

    task: classification
    seed: 0
    data: {root: ../shared/datasets/neu-det, image_size: 200}
    model: {name: multiscale, backbone: efficientnet_lite0, pretrained: true}
    train: {epochs: 6, batch_size: 16, lr: 5.0e-4}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from defectscope.errors import DefectscopeError


class ConfigError(DefectscopeError, ValueError):
    """A recipe file or override is malformed; the message names file and field."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are rejected, and so are NaN / infinite
    numbers (``-o train.lr=.inf`` would otherwise train to NaN)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class TrainConfig(StrictModel):
    """Optimisation and Lightning trainer settings shared by every task.

    Attributes:
        epochs: maximum number of epochs.
        batch_size: images per optimisation step (per process under DDP).
        lr: AdamW learning rate (paper 000: 5e-4 for NEU, 2e-4 for welds).
        weight_decay: AdamW weight decay.
        precision: ``auto`` (default: bf16 mixed precision only where this CPU computes bf16
            natively and faster than fp32, fp32 elsewhere; see :mod:`defectscope.machine`), ``32``
            or ``bf16-mixed`` (explicit settings win).
        channels_last: NHWC memory layout for convolutions (faster on this CPU).
        val_fraction: share of the training split held out for early stopping and
            checkpoint selection; the test split is only used once, at the end.
        early_stopping_patience: epochs without improvement of the validation
            weighted F1 before stopping; 0 disables early stopping.
        strategy: Lightning strategy (``auto``, ``ddp`` for multi-process CPU/GPU).
        devices: number of processes/devices.
        accelerator: ``cpu`` (default here), ``gpu`` or ``auto``.
        num_threads: torch intra-op threads per process: ``auto`` (default; also ``0``) = the CPUs
            this process may use (:func:`defectscope.machine.resolve_threads`), or a count.
        max_minutes: wall-clock budget for training; Lightning stops after it.
        augment: random horizontal/vertical flips during training.
        logger: ``csv`` and/or ``tensorboard`` logs inside the run folder.
    """

    epochs: int = Field(6, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    precision: Literal["auto", "32", "bf16-mixed", "32-true"] = "auto"
    channels_last: bool = True
    val_fraction: float = Field(0.1, ge=0, lt=1)
    early_stopping_patience: int = Field(2, ge=0)
    strategy: str = "auto"
    devices: int = Field(1, ge=1)
    accelerator: str = "cpu"
    num_threads: Literal["auto"] | int = "auto"
    max_minutes: float | None = Field(None, gt=0)
    augment: bool = True
    logger: list[Literal["csv", "tensorboard"]] = ["csv", "tensorboard"]
    progress: bool = True

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, v: object) -> object:
        return str(v) if isinstance(v, int) else v

    @field_validator("num_threads", mode="before")
    @classmethod
    def _threads(cls, v: object) -> object:
        if v in (0, "0", None):
            return "auto"
        if isinstance(v, str) and v != "auto":
            try:
                v = int(v)
            except ValueError:
                raise ValueError("expected 'auto' or a thread count >= 1") from None
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError("expected 'auto' or a thread count >= 1")
        return v


class EvalConfig(StrictModel):
    """How a run is evaluated (every task).

    Attributes:
        folds: 1: a single held-out split; K >= 2: stratified K-fold cross-validation
            (paper 000, section 5.1), see :mod:`defectscope.engine.pipeline`.
        group_by: a metadata column or a regular expression on sample ids; samples with the
            same key never span two folds (views of one part, frames of one weld run).
        escape_rate_targets: target escape rates (share of defective parts accepted) for which
            operating points are chosen on the validation part or out-of-fold predictions
            (tasks with an OK-vs-defective decision; see :mod:`defectscope.evaluation.decisions`).
        decision_target: the target whose threshold ``predict`` / ``serve`` / ``inspect`` apply
            (``accept`` / ``reject``); default the first of ``escape_rate_targets``.
        candidates: under cross-validation, the models evaluated on the same folds; the best pooled
            out-of-fold score becomes the run's model (refit on all the data). On a single split, the
            models compared on the same validation part (the best is the run; the test part measures
            it once); ``None`` there: the recipe's model only. Names are the task's
            (``model`` = the recipe's own model; classification also ``linear_probe``,
            ``finetune_small``, ``linear_probe_lite2``; weld ``signal_stats``, ``image_probe``); ``None``: the task's default.
        nested: also select the candidate inside each outer fold (inner cross-validation on its
            training part) and report that unbiased out-of-fold figure beside the selected one.
    """

    folds: int = Field(1, ge=1)
    group_by: str | None = None
    escape_rate_targets: list[float] = [0.05, 0.01, 0.001]
    decision_target: float | None = None
    candidates: list[str] | None = None
    nested: bool = False

    @field_validator("escape_rate_targets")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        if not v or any(not (0 < t < 1) for t in v):
            raise ValueError("every target escape rate must be in (0, 1), e.g. [0.05, 0.01]")
        return v


class ClassifierTrainConfig(TrainConfig):
    """:class:`TrainConfig` plus the classification loss (tasks whose model ends in class logits).

    Attributes:
        loss: ``focal`` (paper 000, eq. 14) or ``ce`` (cross-entropy).
        focal_gamma: focusing parameter lambda of eq. 14.
        label_smoothing: for ``ce`` only.
        class_balance: weight the loss by inverse class frequency (``auto``: on when the largest
            class of the training part has more than 3x the images of the smallest).
    """

    loss: Literal["focal", "ce"] = "focal"
    focal_gamma: float = Field(2.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_balance: Literal["auto", "on", "off"] = "auto"

    @field_validator("class_balance", mode="before")
    @classmethod
    def _balance_bool(cls, v: object) -> object:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class ClassificationData(StrictModel):
    """Where the labelled images are and how they are split (image-classification tasks:
    ``classification``, ``multicnn``).

    Attributes:
        root: data folder (NEU prefix layout or class-per-folder).
        layout: ``auto``, ``prefix`` or ``folder``.
        image_size: side in pixels the images are resized to (square).
        test_fraction: held-out share per class.
        split_seed: seed of the stratified split.
        max_per_class: keep at most this many images per class (small subsets for
            quick runs and tests); chosen with ``split_seed``.
        ok_class: the class of good parts; with it, runs report operating points (threshold
            for a target escape rate on the defect score ``1 - p(ok)``) and ``predict`` adds
            ``accept`` / ``reject``. Default: a class named good / ok / normal, if there is one.
    """

    root: str
    layout: Literal["auto", "prefix", "folder"] = "auto"
    image_size: int = Field(200, ge=16)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    max_per_class: int | None = Field(None, ge=2)
    ok_class: str | None = None


class BaseRecipe(StrictModel):
    """Top-level keys every recipe has; tasks subclass it with ``data`` and ``model``."""

    task: str
    seed: int = 0
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if k not in node or node[k] is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise ConfigError(f"{source}: cannot set '{dotted}': '{k}' is a value, not a section")
        node = node[k]
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are read as YAML (``3``, ``true``, ``[1, 2]``).

    Raises:
        ConfigError: an override has no ``=`` or an empty key.
    """
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.epochs=3")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}': empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from exc
        out.append((key, value))
    return out


def load_raw(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read a recipe file into a dict and apply overrides (no validation yet).

    Raises:
        ConfigError: missing file, not UTF-8 text, invalid YAML, or a top level that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "a recipe is a YAML text file saved as UTF-8 (see configs/)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'task' key at the top level")
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value, f"{path} (override)")
    return raw


def validate(raw: dict, schema: type[BaseRecipe], source: str) -> BaseRecipe:
    """Validate ``raw`` against ``schema``; errors name the source and each bad field.

    Raises:
        ConfigError: one line per invalid field, e.g. ``train.epochs: Input should be >= 1``.
    """
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        lines = []
        task = raw.get("task", "?") if isinstance(raw, dict) else "?"
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                known = _known_keys(schema, err["loc"][:-1])
                lines.append(f"  {loc}: not a setting of task '{task}' (it would do nothing here)"
                             + (f"; known keys: {', '.join(known)}" if known else ""))
                continue
            lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{source}: invalid recipe\n" + "\n".join(lines)) from None


def _known_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) section ``loc`` of ``schema``, for error messages."""
    model: Any = schema
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}))


def resolve_path(value: str | Path, base: Path | None = None) -> Path:
    """Resolve a data path; relative paths are taken from the working directory, then ``base``."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists() or base is None:
        return p
    alt = base / p
    return alt if alt.exists() else p
