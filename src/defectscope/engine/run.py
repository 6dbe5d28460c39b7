"""The run folder contract, shared by every task.

``defectscope train RECIPE --out RUN`` writes:

- ``RUN/config.yaml``: the resolved recipe (defaults filled in, overrides applied);
- ``RUN/model.ckpt``: a self-contained checkpoint (see :func:`save_model`), tensors and plain
  data only, read with ``torch.load(..., weights_only=True)``: opening it never runs code;
- ``RUN/metrics.json``: ``task``, ``seed``, ``split`` sizes, ``train_seconds`` and ``test`` figures;
- ``RUN/report.html`` with its PNG figures in ``RUN/plots/``;
- ``RUN/split/*.txt``: the file lists of each split;
- ``RUN/logs/``: CSV and TensorBoard logs; ``RUN/checkpoints/``: Lightning's checkpoints.

All files are written atomically.

Checkpoint safety: :meth:`RunFolder.save_model` stores only tensors and JSON-like values
(``str``, ``int``, ``float``, ``bool``, ``None``, lists, tuples, dicts); NumPy arrays become
tensors, NumPy scalars Python numbers, paths strings, and anything else is refused when saving.
Every checkpoint (``model.ckpt``, Lightning's ``best.ckpt`` through
:func:`load_lightning_state_dict`) is read with ``weights_only=True``, so a file carrying a
pickled object is refused with a :class:`RunError` instead of executing it. Nothing in the
package reads a checkpoint with pickle: run folders written before this rule (the anomaly task
stored a scikit-learn object; model constructors took other arguments) are refused with a
message to train them again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from defectscope.errors import DefectscopeError
from defectscope.utils.io import torch_load_weights_only, torch_save, write_json, write_yaml

CHECKPOINT_FORMAT = "defectscope-model/2"
#: formats :meth:`RunFolder.load_model_payload` reads; ``/1`` files without pickled objects load as they are.
READABLE_FORMATS = ("defectscope-model/1", CHECKPOINT_FORMAT)


class RunError(DefectscopeError, ValueError):
    """A run folder is missing, incomplete, corrupt or unsafe to load; the message names the file."""


def safe_checkpoint_value(value: Any, where: str = "payload") -> Any:
    """Convert ``value`` into what ``torch.load(..., weights_only=True)`` reads back without running code.

    Tensors, ``str``, ``int``, ``float``, ``bool`` and ``None`` are kept; dicts (string or integer
    keys), lists and tuples are converted item by item; NumPy arrays become tensors (numeric
    dtypes only), NumPy scalars Python numbers, :class:`~pathlib.Path` a string.

    Args:
        value: the object to store.
        where: its key path, for the error message (e.g. ``payload['ocsvm']``).

    Raises:
        TypeError: any other object (a scikit-learn estimator, a dataclass, ...); the message
            names the key path. Convert it to arrays first (e.g. ``OneClassScorer.state_dict()``).
    """
    if value is None or isinstance(value, (str, bool, int, float, torch.Tensor)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{where}: NumPy array of dtype {value.dtype} cannot be stored in a checkpoint; "
                            "only numeric arrays can")
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__}; checkpoint keys must be str or int")
            out[k] = safe_checkpoint_value(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        items = [safe_checkpoint_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where}: a {type(value).__module__}.{type(value).__name__} object cannot be stored in a "
                    "checkpoint (loading it would need pickle); store its arrays and settings instead")


def _load_weights_only(path: Path, what: str, convert_hint: str | None) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure turned into a :class:`RunError`
    (:func:`~defectscope.utils.io.torch_load_weights_only`)."""
    if path.is_file() and path.stat().st_size == 0:
        raise RunError(f"{path}: empty file (0 bytes); the {what} is missing its content: train again or restore it")
    hint = (f"If this is a run folder from an older defectscope, {convert_hint}.") if convert_hint else None
    try:
        return torch_load_weights_only(path, what, RunError, hint)
    except RunError as exc:
        if "truncated or corrupt" in str(exc):
            raise RunError(f"{exc}; train again or restore the file") from None
        raise


def load_lightning_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint (e.g. ``RUN/checkpoints/best.ckpt``), read with ``weights_only=True``.

    Lightning stores the module's tensors plus plain loop/callback/optimizer state; none of it
    needs pickle, so the safe loader reads it. Use in place of
    the unsafe full-pickle load of Lightning checkpoints.

    Args:
        path: the ``.ckpt`` file written by Lightning's ``ModelCheckpoint``.

    Returns:
        ``{parameter name: tensor}``, the keys as Lightning wrote them (``model.`` prefixes kept).

    Raises:
        RunError: file missing, empty, corrupt, holding a pickled object, or without ``state_dict``.
    """
    path = Path(path)
    ckpt = _load_weights_only(path, "Lightning checkpoint", None)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise RunError(f"{path}: not a Lightning checkpoint (no 'state_dict' mapping)")
    return ckpt["state_dict"]


class RunFolder:
    """Paths and readers/writers of one run folder.

    Args:
        path: the run folder (created on :meth:`create`).
        resume: the run continues an interrupted one (``defectscope train --resume``): every fit in
            it restarts from its ``checkpoints/last.ckpt`` (tasks pass it to
            :func:`~defectscope.engine.trainer.fit_lightning`).
    """

    def __init__(self, path: str | Path, resume: bool = False) -> None:
        self.path = Path(path)
        self.resume = bool(resume)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def model_path(self) -> Path:
        return self.path / "model.ckpt"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def split_dir(self) -> Path:
        return self.path / "split"

    def create(self) -> "RunFolder":
        self.path.mkdir(parents=True, exist_ok=True)
        self.plots.mkdir(exist_ok=True)
        return self

    def write_config(self, config: dict) -> None:
        write_yaml(self.config_path, config)

    def read_config(self) -> dict:
        """Read ``config.yaml`` (the resolved recipe).

        Raises:
            RunError: missing, empty, not UTF-8, not YAML, not a mapping, or without a ``task``
                string; the message names the file.
        """
        path = self.config_path
        if not path.is_file():
            raise RunError(f"{path}: not found; is {self.path} a defectscope run folder?")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise RunError(f"{path}: not UTF-8 text (byte {exc.start}); the run's config is corrupt") from None
        except yaml.YAMLError as exc:
            raise RunError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:200]}); the run's config is corrupt "
                           "or truncated") from None
        if raw is None:
            raise RunError(f"{path}: empty file; the run's config is missing (train again or restore it)")
        if not isinstance(raw, dict):
            raise RunError(f"{path}: expected a mapping (the resolved recipe), got a {type(raw).__name__}")
        if not isinstance(raw.get("task"), str) or not raw["task"]:
            raise RunError(f"{path}: field 'task' is missing or not a string (got {raw.get('task')!r})")
        return raw

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.metrics_path, metrics)

    def save_model(self, task: str, model_name: str, model_kwargs: dict, state_dict: dict, **extra: Any) -> None:
        """Write ``model.ckpt``: everything needed to rebuild and run the model without the recipe.

        The payload holds ``format``, ``task``, ``model_name``, ``model_kwargs`` (for
        :func:`defectscope.models.create_model`), ``state_dict`` and any ``extra``
        fields (class names, input size, thresholds, selected channels, ...).

        Only tensors and plain data are stored (:func:`safe_checkpoint_value`): NumPy arrays
        come back as tensors, tuples stay tuples.

        Raises:
            TypeError: an ``extra`` value is an object that would need pickle (named by key).
        """
        payload = {"format": CHECKPOINT_FORMAT, "task": task, "model_name": model_name,
                   "model_kwargs": model_kwargs, "state_dict": state_dict, **extra}
        torch_save(self.model_path, safe_checkpoint_value(payload))

    def load_model_payload(self) -> dict:
        """Read ``model.ckpt`` with ``torch.load(..., weights_only=True)``: no code runs.

        Raises:
            RunError: missing, empty, truncated or corrupt file; a file holding a pickled Python
                object (refused; the message says to train an old run folder again);
                an unknown format.
        """
        if not self.model_path.is_file():
            raise RunError(f"{self.model_path}: not found; train first (defectscope train RECIPE --out {self.path})")
        payload = _load_weights_only(self.model_path, "checkpoint", f"train it again with this version "
                                     f"(defectscope train {self.path / 'config.yaml'} --out NEW_RUN)")
        fmt = payload.get("format") if isinstance(payload, dict) else None
        if fmt not in READABLE_FORMATS:
            raise RunError(f"{self.model_path}: not a defectscope checkpoint (format {fmt!r}; "
                           f"expected one of {list(READABLE_FORMATS)})")
        return payload

    def load_model(self):
        """Rebuild the trained model of ``model.ckpt``; returns ``(model in eval mode, payload)``.

        The one place that turns a checkpoint into a model: ``create_model(model_name,
        **model_kwargs)`` then ``load_state_dict(state_dict)`` (strict).

        The stored architecture arguments are checked before anything is built
        (:func:`~defectscope.models.registry.check_model_kwargs`): an impossible one (e.g.
        ``num_classes: -1``) is refused by name instead of failing inside torch.

        Raises:
            RunError: missing or unreadable checkpoint, unknown model, an impossible architecture
                argument (file and field ``model_kwargs.<name>`` named), or weights that do not
                fit the architecture (the message names the file).
        """
        from defectscope.models import create_model
        from defectscope.models.registry import ModelArgumentError

        payload = self.load_model_payload()
        name, kwargs = payload.get("model_name"), payload.get("model_kwargs")
        if not isinstance(name, str) or not isinstance(kwargs, dict):
            raise RunError(f"{self.model_path}: fields 'model_name' (text) and 'model_kwargs' (a mapping) are required; "
                           f"got {type(name).__name__} and {type(kwargs).__name__}")
        try:
            model = create_model(name, **kwargs)
        except ModelArgumentError as exc:
            raise RunError(f"{self.model_path}: field 'model_kwargs.{exc.field}' of model {name!r}: "
                           f"{str(exc).split(': ', 1)[-1]}; the checkpoint is corrupt or was edited: "
                           "train again or restore it") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            first = (str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).splitlines() or [""])[0][:200]
            raise RunError(f"{self.model_path}: cannot rebuild model {name!r} from its field 'model_kwargs' "
                           f"({exc.__class__.__name__}: {first})") from None
        try:
            model.load_state_dict(payload["state_dict"])
        except RuntimeError as exc:
            raise RunError(f"{self.model_path}: weights do not fit model {payload['model_name']!r} "
                           f"({str(exc).splitlines()[0]})") from None
        return model.eval(), payload
