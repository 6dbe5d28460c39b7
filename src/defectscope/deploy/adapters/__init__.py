"""Per-task deploy adapters (see :mod:`defectscope.deploy.adapters.base`)."""

from defectscope.deploy.adapters.base import (
    DeployError,
    EvalSet,
    ModelInfo,
    TaskAdapter,
    file_sha256,
    get_adapter,
    register_adapter,
)

__all__ = ["DeployError", "EvalSet", "ModelInfo", "TaskAdapter", "file_sha256", "get_adapter", "register_adapter"]
