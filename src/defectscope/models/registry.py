"""Model registry: ``create_model(name, **kwargs)`` builds any registered method.

Each method folder registers its torch module with :func:`register_model`; the
training wrappers in :mod:`defectscope.engine` only ever call ``create_model``.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from typing import Any, Callable

from torch import nn

from defectscope.errors import DefectscopeError, UnknownNameError


class ModelArgumentError(DefectscopeError, ValueError):
    """An architecture argument of :func:`create_model` is impossible (a negative size, a count of
    zero, text where a number belongs, an unknown keyword); the message names the argument.

    Attributes:
        field: the argument's name (e.g. ``num_classes``).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

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
    import defectscope.models.padim  # noqa: F401
    import defectscope.models.student_teacher  # noqa: F401
    import defectscope.models.ensemble  # noqa: F401
    import defectscope.models.weld_fusion  # noqa: F401
    import defectscope.models.box_heads  # noqa: F401
    import defectscope.models.linear_probe  # noqa: F401
    import defectscope.models.signal_stats  # noqa: F401


#: integer arguments that are sizes or counts (at least 1); every other integer argument is at least 0
_POSITIVE = re.compile(r"^(num_classes|num_heads|num_slots|channels|image_size|low_res|seq_len|welds|kernel|depth|base|"
                       r"neighbourhood|head_convs|detections_per_img)$|_dim$|_channels$")
#: largest size or count accepted from a stored checkpoint (a larger one would allocate terabytes)
MAX_SIZE = 1_000_000


def _kind(annotation: Any) -> str | None:
    """``int``, ``ints`` (a tuple/list of int), ``float`` or ``None`` (not checked) for a parameter annotation."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = {p.strip() for p in text.split("|")} - {"None"}
    if parts == {"int"}:
        return "int"
    if parts == {"float"}:
        return "float"
    if parts and all(re.fullmatch(r"(tuple\[int, \.\.\.\]|list\[int\])", p) for p in parts):
        return "ints"
    return None


def check_model_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Check the architecture arguments of model ``name`` before anything is built.

    Against the constructor's signature: every keyword must be a parameter (unless it takes
    ``**kwargs``), every parameter without a default must be given; integer parameters must hold
    integers (not ``bool``), at least 1 for sizes and counts (``num_classes``, ``*_dim``,
    ``*_channels``, ``num_heads``, ``image_size``, ...) and at least 0 otherwise, at most
    :data:`MAX_SIZE`; float parameters must be finite numbers, ``dropout`` in [0, 1).

    Raises:
        UnknownNameError: unknown model ``name``.
        ModelArgumentError: the first impossible argument, named (``field``), with the value found
            and what is expected.
    """
    _ensure_loaded()
    if name not in _MODELS:
        raise UnknownNameError(f"unknown model '{name}'; known: {', '.join(sorted(_MODELS))}")
    try:
        params = inspect.signature(_MODELS[name]).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in kwargs:
        if key not in params and not takes_any:
            raise ModelArgumentError(key, f"{key}: not an argument of model '{name}' "
                                     f"(known: {', '.join(k for k in params if k not in ('self',))})")
    for key, p in params.items():
        if p.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        if key not in kwargs:
            if p.default is inspect.Parameter.empty:
                raise ModelArgumentError(key, f"{key}: missing; model '{name}' needs it")
            continue
        value, kind = kwargs[key], _kind(p.annotation)
        if value is None and p.default is None:
            continue
        if kind in ("int", "ints"):
            values = [value] if kind == "int" else value
            if kind == "ints" and not isinstance(value, (list, tuple)):
                raise ModelArgumentError(key, f"{key}: expected a list of integers, got {value!r}")
            low = 1 if _POSITIVE.search(key) else 0
            for v in values:
                if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                    raise ModelArgumentError(key, f"{key}: expected an integer, got {v!r}")
                if not low <= v <= MAX_SIZE:
                    raise ModelArgumentError(key, f"{key}: {v} is impossible; expected an integer in {low}..{MAX_SIZE}"
                                             + (" (a size or count)" if low else ""))
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ModelArgumentError(key, f"{key}: expected a finite number, got {value!r}")
            if "dropout" in key and not 0 <= value < 1:
                raise ModelArgumentError(key, f"{key}: {value} is impossible; a dropout rate is in [0, 1)")


def list_models() -> list[str]:
    """Registered model names, sorted."""
    _ensure_loaded()
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with its keyword arguments.

    The arguments are checked first (:func:`check_model_kwargs`), so an impossible one is named
    instead of failing deep inside torch.

    Raises:
        KeyError: unknown name (the message lists the known ones).
        ModelArgumentError (a ValueError): an impossible argument, named.
    """
    check_model_kwargs(name, kwargs)
    return _MODELS[name](**kwargs)
