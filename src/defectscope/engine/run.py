"""The run folder contract, shared by every task.

``defectscope train RECIPE --out RUN`` writes:

- ``RUN/config.yaml``: the resolved recipe (defaults filled in, overrides applied);
- ``RUN/model.ckpt``: a self-contained checkpoint (see :func:`save_model`);
- ``RUN/metrics.json``: ``task``, ``seed``, ``split`` sizes, ``train_seconds`` and ``test`` figures;
- ``RUN/report.html`` with its PNG figures in ``RUN/plots/``;
- ``RUN/split/*.txt``: the file lists of each split;
- ``RUN/logs/``: CSV and TensorBoard logs; ``RUN/checkpoints/``: Lightning's checkpoints.

All files are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from defectscope.utils.io import torch_save, write_json, write_yaml

CHECKPOINT_FORMAT = "defectscope-model/1"


class RunError(ValueError):
    """A run folder is missing or incomplete; the message names the file."""


class RunFolder:
    """Paths and readers/writers of one run folder.

    Args:
        path: the run folder (created on :meth:`create`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

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
        if not self.config_path.is_file():
            raise RunError(f"{self.config_path}: not found; is {self.path} a defectscope run folder?")
        return yaml.safe_load(self.config_path.read_text())

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.metrics_path, metrics)

    def save_model(self, task: str, model_name: str, model_kwargs: dict, state_dict: dict, **extra: Any) -> None:
        """Write ``model.ckpt``: everything needed to rebuild and run the model without the recipe.

        The payload holds ``format``, ``task``, ``model_name``, ``model_kwargs`` (for
        :func:`defectscope.models.create_model`), ``state_dict`` and any ``extra``
        fields (class names, input size, thresholds, selected channels, ...).
        """
        payload = {"format": CHECKPOINT_FORMAT, "task": task, "model_name": model_name,
                   "model_kwargs": model_kwargs, "state_dict": state_dict, **extra}
        torch_save(self.model_path, payload)

    def load_model_payload(self) -> dict:
        """Read ``model.ckpt``.

        Raises:
            RunError: missing file or unknown format.
        """
        if not self.model_path.is_file():
            raise RunError(f"{self.model_path}: not found; train first (defectscope train RECIPE --out {self.path})")
        payload = torch.load(self.model_path, map_location="cpu", weights_only=False)
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise RunError(f"{self.model_path}: not a defectscope checkpoint (format {payload.get('format')!r})")
        return payload

    def load_model(self):
        """Rebuild the trained model of ``model.ckpt``; returns ``(model in eval mode, payload)``.

        The one place that turns a checkpoint into a model: ``create_model(model_name,
        **model_kwargs)`` then ``load_state_dict(state_dict)`` (strict).

        Raises:
            RunError: missing or unreadable checkpoint, unknown model, or weights that do not
                fit the architecture (the message names the file).
        """
        from defectscope.models import create_model

        payload = self.load_model_payload()
        try:
            model = create_model(payload["model_name"], **payload["model_kwargs"])
        except (KeyError, TypeError) as exc:
            raise RunError(f"{self.model_path}: cannot rebuild model {payload.get('model_name')!r} ({exc})") from None
        try:
            model.load_state_dict(payload["state_dict"])
        except RuntimeError as exc:
            raise RunError(f"{self.model_path}: weights do not fit model {payload['model_name']!r} "
                           f"({str(exc).splitlines()[0]})") from None
        return model.eval(), payload

