"""Task registry: one entry per kind of job (classification, weld fusion, anomaly, ...).

A task knows its recipe schema and how to ``fit`` (train + evaluate + report),
``evaluate`` a run on other data and ``predict`` files. The CLI dispatches on a
recipe's ``task`` key and on the ``task`` stored in a run's checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from defectscope.config import BaseRecipe


class Task(Protocol):
    """What every task implements."""

    name: str
    recipe: type[BaseRecipe]

    def fit(self, recipe: BaseRecipe, run_dir: Path, source: Path | None = None) -> dict | None:
        """Train, evaluate the held-out split, write the run folder; returns metrics (``None`` on non-zero DDP ranks)."""

    def evaluate(self, run_dir: Path, data: Path, out: Path | None = None) -> dict:
        """Evaluate a trained run on another labelled folder."""

    def predict(self, run_dir: Path, inputs: list[Path], out: Path, **options) -> dict:
        """Predict files; writes ``out`` and returns a summary."""


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task instance to the registry (names are unique)."""
    if task.name in _TASKS:
        raise ValueError(f"task '{task.name}' registered twice")
    _TASKS[task.name] = task
    return task


def _ensure_loaded() -> None:
    import defectscope.engine.classification  # noqa: F401
    import defectscope.engine.segmentation  # noqa: F401
    import defectscope.engine.multicnn  # noqa: F401
    import defectscope.engine.anomaly  # noqa: F401
    import defectscope.engine.weld  # noqa: F401
    import defectscope.engine.detection  # noqa: F401


def get_task(name: str) -> Task:
    """The registered task ``name``.

    Raises:
        KeyError: unknown task (the message lists the known ones).
    """
    _ensure_loaded()
    if name not in _TASKS:
        raise KeyError(f"unknown task '{name}'; known: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def list_tasks() -> list[str]:
    _ensure_loaded()
    return sorted(_TASKS)
