"""Model registry: ``create_model(name, **kwargs)`` builds any registered method.

Each method folder registers its torch module with :func:`register_model`; the
training wrappers in :mod:`defectscope.engine` only ever call ``create_model``.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from defectscope.errors import UnknownNameError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model class or factory under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model '{name}' registered twice")
        _MODELS[name] = fn
        return fn

    return deco


def _ensure_loaded() -> None:
    # importing the method packages registers them
    import defectscope.models.classifier  # noqa: F401
    import defectscope.models.multiscale  # noqa: F401
    import defectscope.models.unet  # noqa: F401
    import defectscope.models.multicnn  # noqa: F401
    import defectscope.models.grad_mobilenet  # noqa: F401
    import defectscope.models.patchcore  # noqa: F401
    import defectscope.models.weld_fusion  # noqa: F401
    import defectscope.models.box_heads  # noqa: F401
    import defectscope.models.linear_probe  # noqa: F401
    import defectscope.models.signal_stats  # noqa: F401


def list_models() -> list[str]:
    """Registered model names, sorted."""
    _ensure_loaded()
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with its keyword arguments.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    _ensure_loaded()
    if name not in _MODELS:
        raise UnknownNameError(f"unknown model '{name}'; known: {', '.join(sorted(_MODELS))}")
    return _MODELS[name](**kwargs)
