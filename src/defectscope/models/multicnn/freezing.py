"""Partial freezing of a backbone: the first N stages or layers (paper 003, section 2.4.2).

Paper 003 fine-tunes each CNN with its first layers frozen (34 / 168 / 249 / 126
Keras layers of VGG16 / ResNet-50 / InceptionV3 / Xception). Two units are offered:

- ``stages``: timm's coarse parameter groups of the architecture, in forward order
  (``model.group_matcher(coarse=True)``; group 0 is the stem, then one group per
  stage/block, e.g. 8 groups for EfficientNet-Lite, 5 for ResNet-50).
- ``layers``: leaf modules and modules owning parameters, in definition order
  (convolutions, norms, activations, pooling...), the closest analogue of a Keras layer count. Keras and timm split
  networks differently, so the paper's counts do not transfer one-to-one.

A frozen module keeps its parameters (``requires_grad=False``) *and*, for
normalisation layers, its running statistics: a forward pre-hook puts frozen
batch-norm modules in eval mode on every call, so ``model.train()`` cannot
update them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

FreezeUnit = Literal["stages", "layers"]


@dataclass
class FreezeInfo:
    """What :func:`freeze_first` froze.

    Attributes:
        unit: ``stages`` or ``layers``.
        n: how many units were asked for (and frozen; at most :attr:`available`).
        available: how many units the module has.
        frozen_modules: names of the frozen modules that own parameters, in order.
        frozen_params: number of frozen scalar parameters.
        trainable_params: number of parameters still trainable.
    """

    unit: str
    n: int
    available: int
    frozen_modules: list[str] = field(default_factory=list)
    frozen_params: int = 0
    trainable_params: int = 0

    @property
    def total_params(self) -> int:
        return self.frozen_params + self.trainable_params

    @property
    def frozen_fraction(self) -> float:
        return self.frozen_params / max(1, self.total_params)

    def as_dict(self) -> dict:
        """JSON-ready summary (without the module list)."""
        return {"unit": self.unit, "n": self.n, "available": self.available, "frozen_params": self.frozen_params,
                "trainable_params": self.trainable_params, "total_params": self.total_params,
                "frozen_fraction": round(self.frozen_fraction, 4)}


def _stage_param_names(module: nn.Module) -> list[list[str]]:
    """Parameter names per timm coarse group, in forward order.

    Raises:
        ValueError: the module has no ``group_matcher`` (not a timm model).
    """
    from timm.models import group_parameters

    if not hasattr(module, "group_matcher"):
        raise ValueError(f"{type(module).__name__}: 'stages' freezing needs a timm model with group_matcher(); "
                         "use unit='layers'")
    groups = group_parameters(module, module.group_matcher(coarse=True))
    return [list(groups[k]) for k in sorted(groups)]


def _layer_modules(module: nn.Module) -> list[str]:
    """Names of "layers" in definition order: leaf modules and modules owning parameters directly.

    A fused norm + activation module (timm ``BatchNormAct2d``) thus counts as a layer
    itself (its weights) and its activation child as the next one, like Keras.
    """
    return [n for n, m in module.named_modules()
            if n and (not list(m.children()) or any(True for _ in m.parameters(recurse=False)))]


def count_units(module: nn.Module, unit: FreezeUnit) -> int:
    """How many stages or layers ``module`` has (the largest useful ``n``)."""
    return len(_stage_param_names(module)) if unit == "stages" else len(_layer_modules(module))


def _eval_hook(mod: nn.Module, _inputs) -> None:
    mod.training = False


def freeze_first(module: nn.Module, n: int, unit: FreezeUnit = "stages") -> FreezeInfo:
    """Freeze the first ``n`` stages or layers of ``module`` in place.

    Args:
        module: a timm model (for ``stages``) or any ``nn.Module`` (for ``layers``),
            e.g. ``Backbone.body`` from :func:`defectscope.models.create_backbone`.
        n: number of units to freeze from the input side (0 freezes nothing;
            more than available freezes everything).
        unit: ``stages`` (timm coarse groups, stem first) or ``layers`` (leaf modules).

    Returns:
        :class:`FreezeInfo` with the frozen/trainable parameter counts.

    Raises:
        ValueError: ``n < 0``, unknown ``unit``, or ``stages`` on a non-timm module.
    """
    if n < 0:
        raise ValueError(f"freeze: n must be >= 0, got {n}")
    if unit not in ("stages", "layers"):
        raise ValueError(f"freeze: unit must be 'stages' or 'layers', got {unit!r}")
    modules = dict(module.named_modules())
    if unit == "stages":
        groups = _stage_param_names(module)
        frozen_names = {p for g in groups[:n] for p in g}
        available = len(groups)
        owners = [name for name, m in module.named_modules()
                  if any(True for _ in m.parameters(recurse=False))
                  and all((f"{name}.{pn}" if name else pn) in frozen_names for pn, _ in m.named_parameters(recurse=False))]
    else:
        leaves = _layer_modules(module)
        available = len(leaves)
        owners = leaves[:n]
        frozen_names = {f"{name}.{pn}" for name in owners for pn, _ in modules[name].named_parameters(recurse=False)}
    info = FreezeInfo(unit=unit, n=min(n, available), available=available)
    for name, p in module.named_parameters():
        if name in frozen_names:
            p.requires_grad_(False)
            info.frozen_params += p.numel()
        elif p.requires_grad:
            info.trainable_params += p.numel()
        else:  # frozen before this call
            info.frozen_params += p.numel()
    for name in owners:
        m = modules[name]
        if any(True for _ in m.parameters(recurse=False)):
            info.frozen_modules.append(name)
        if isinstance(m, _BatchNorm) and not getattr(m, "_defectscope_frozen", False):
            m.register_forward_pre_hook(_eval_hook)
            m._defectscope_frozen = True
    return info


def freeze_all(module: nn.Module) -> int:
    """Freeze every parameter and batch-norm statistic of ``module``; returns the frozen parameter count."""
    total = 0
    for p in module.parameters():
        p.requires_grad_(False)
        total += p.numel()
    for m in module.modules():
        if isinstance(m, _BatchNorm) and not getattr(m, "_defectscope_frozen", False):
            m.register_forward_pre_hook(_eval_hook)
            m._defectscope_frozen = True
    return total
