"""Task registry: one entry per kind of job (classification, weld fusion, anomaly, ...).

A task is a :class:`~defectscope.engine.pipeline.TaskHooks`: its recipe schema, the hooks the
pipeline trains it with, and ``evaluate`` / ``predict`` for a trained run. The CLI dispatches on a
recipe's ``task`` key and on the ``task`` stored in a run's checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from defectscope.engine.pipeline import TaskHooks


_TASKS: dict[str, "TaskHooks"] = {}


def register_task(task: "TaskHooks") -> "TaskHooks":
    """Add a task instance (a :class:`~defectscope.engine.pipeline.TaskHooks`) to the registry (names are unique)."""
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


def get_task(name: str) -> "TaskHooks":
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
