"""Training helpers shared by every method's Lightning wrapper (neutral: no task, no model).

Dtype conversion of uint8 image batches, random flips, the warm-up + cosine learning-rate
schedule, test-time flip averaging and the classification losses. Each
``models/<method>/lightning_model.py`` imports from here, never from another method or task.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from defectscope.models.layers.losses import FocalLoss


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float32 in [0, 1] (same shape)."""
    return x.float().div_(255.0)


def to_model_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float in [0, 1], in channels_last memory layout when asked."""
    x = to_float(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def random_flips(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent random horizontal and vertical flips (probability 0.5 each) per image of ``[B, C, H, W]``."""
    b = x.shape[0]
    h = torch.rand(b, generator=generator) < 0.5
    v = torch.rand(b, generator=generator) < 0.5
    x = torch.where(h.view(b, 1, 1, 1), x.flip(-1), x)
    return torch.where(v.view(b, 1, 1, 1), x.flip(-2), x)


def strong_augment(x: torch.Tensor, generator: torch.Generator | None = None, grey: float = 0.1) -> torch.Tensor:
    """Augmentation for images with no "up" (radiographs, strip surfaces), per image of float ``[B, C, H, W]`` in [0, 1].

    Random flips (:func:`random_flips`), a rotation by a random multiple of 90 degrees (square
    images only; others keep their orientation), and a grey-level jitter ``x' = a (x - m) + m + b``
    with the image mean ``m``, contrast ``a ~ U(1 - grey, 1 + grey)`` and brightness
    ``b ~ U(-grey, grey)``, clipped to [0, 1] (the same for every channel, so grey stays grey).
    """
    x = random_flips(x, generator)
    b = x.shape[0]
    if x.shape[-1] == x.shape[-2]:
        k = torch.randint(0, 4, (b,), generator=generator)
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        x = torch.stack([torch.rot90(x[i], int(k[i]), dims=(-2, -1)) for i in range(b)])
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
    a = 1 + grey * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
    shift = grey * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - m) * a.to(x.dtype) + m + shift.to(x.dtype)).clamp(0, 1)


def warmup_cosine(opt: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.05):
    """Per-step schedule: linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to 0.

    Args:
        opt: the optimizer whose learning rates are scaled.
        total_steps: number of optimizer steps of the whole run (>= 1 is enforced).
        warmup_fraction: share of the steps spent warming up, in [0, 1).

    Returns:
        A ``LambdaLR`` to be stepped once per optimizer step.
    """
    total = max(1, total_steps)
    warm = max(1, int(warmup_fraction * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def exponential_decay(opt: torch.optim.Optimizer, total_steps: int, lr: float, lr_end: float):
    """Per-step exponential decay of the learning rate from ``lr`` to ``lr_end`` (paper 003, Table 1).

    The factor at step ``s`` is ``(lr_end / lr) ** (min(s, T - 1) / (T - 1))`` with ``T = total_steps``:
    the first step uses ``lr``, the last of the ``T`` steps exactly ``lr_end`` (and any later step too).

    Args:
        opt: the optimizer whose learning rates are scaled (its base rate should be ``lr``).
        total_steps: optimizer steps of the whole run (values < 2 keep ``lr`` for the first step).
        lr, lr_end: initial and final learning rate (> 0).

    Returns:
        A ``LambdaLR`` to be stepped once per optimizer step.
    """
    total = max(1, total_steps - 1)
    ratio = lr_end / lr
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: ratio ** (min(step, total) / total))


def build_loss(kind: str, gamma: float = 2.0, label_smoothing: float = 0.0,
               weight: torch.Tensor | None = None) -> nn.Module:
    """Classification loss over logits ``[B, K]`` and targets ``[B]``.

    Args:
        kind: ``focal`` (paper 000, eq. 14, focusing parameter ``gamma``) or ``ce`` (cross-entropy
            with ``label_smoothing``).
        weight: optional per-class weights ``[K]`` (class-balanced loss).

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "focal":
        return FocalLoss(gamma, weight=weight)
    if kind == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    raise ValueError(f"loss must be 'focal' or 'ce', got {kind!r}")


def flip_variants(x: torch.Tensor) -> list[torch.Tensor]:
    """The four flips of ``[B, C, H, W]``: identity, horizontal, vertical, both (test-time augmentation)."""
    return [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]


def scale_probs(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling of probabilities ``[N, K]``: ``softmax(log p / T)``.

    Equals ``softmax(z / T)`` of the logits ``z`` (``log p`` differs from ``z`` by a per-row
    constant), so a temperature fitted on logits (Guo et al., "On Calibration of Modern Neural
    Networks", 2017) applies to stored probabilities.
    """
    probs = np.asarray(probs)
    if temperature == 1.0 or len(probs) == 0:
        return probs
    z = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def set_linear(layer: "torch.nn.Linear", weight, bias, model_name: str) -> None:
    """Copy a closed-form fit (``weight [K, F]``, ``bias [K]``, e.g. scikit-learn's logistic regression)
    into ``layer``, in place and without gradients.

    Raises:
        ValueError: shapes that do not match the layer's, naming ``model_name``.
    """
    w = torch.as_tensor(np.asarray(weight), dtype=torch.float32)
    b = torch.as_tensor(np.asarray(bias), dtype=torch.float32)
    if tuple(w.shape) != tuple(layer.weight.shape) or tuple(b.shape) != (layer.out_features,):
        raise ValueError(f"{model_name}: head of shape {tuple(w.shape)} / {tuple(b.shape)}, expected "
                         f"{tuple(layer.weight.shape)} / ({layer.out_features},)")
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
