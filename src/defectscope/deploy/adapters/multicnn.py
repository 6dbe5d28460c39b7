"""Deploy adapter of the ``multicnn`` task: the fused multi-CNN classifier (paper 003, feature fusion).

The fused model (:class:`defectscope.models.multicnn.FeatureFusionClassifier`) is a classifier
over ``class_names``, so the inputs, the answer and the scores are those of
:class:`~defectscope.deploy.adapters.classification.ClassificationAdapter`: ``image`` float32
``[B, 3, S, S]`` RGB in [0, 1] (``S`` = the payload's ``image_size``, the data's size) ->
``logits``, ``probabilities`` ``[B, K]``; the decision is the arg-max class.

Each member reads the image resized to its own side with antialiased bilinear interpolation
(``F.interpolate(antialias=True)``), which the ONNX exporter cannot translate
(``aten::_upsample_bilinear2d_aa``). Because the input size is fixed, that resize is a fixed
linear map, separable into a row and a column matrix: :func:`resize_matrix` reads both off
PyTorch's own antialiased kernel (by resizing the identity), and the export module applies them
as two matrix products, the same function up to float rounding (about 1e-7). Each member
(``RUN/members/<name>``) is also a ``classification`` run that can be deployed on its own.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from defectscope.deploy.adapters.base import ModelInfo, register_adapter
from defectscope.deploy.adapters.classification import ClassificationAdapter, ClassifierWithProbabilities


def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_out, n_in]`` matrix of PyTorch's antialiased bilinear resize along one axis
    (``align_corners=False``): row ``i`` holds the weights of output pixel ``i``."""
    eye = torch.eye(n_in).view(n_in, 1, 1, n_in)
    out = F.interpolate(eye, size=(1, n_out), mode="bilinear", align_corners=False, antialias=True)
    return out[:, 0, 0, :].T.contiguous()


class FusedExport(nn.Module):
    """The fused classifier with each member's resize as two constant matrix products.

    Args:
        model: a :class:`~defectscope.models.multicnn.FeatureFusionClassifier` (eval mode).
        size: the fixed input side ``S``.

    Forward: ``[B, 3, S, S]`` -> logits ``[B, K]`` (same as ``model``).
    """

    def __init__(self, model: nn.Module, size: int) -> None:
        super().__init__()
        self.model = model
        self.sizes = [int(m["image_size"]) for m in model.members]
        for i, s in enumerate(self.sizes):
            if s != size:
                self.register_buffer(f"resize_{i}", resize_matrix(size, s), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        feats = []
        for i, extractor in enumerate(self.model.extractors):
            x = image
            r = getattr(self, f"resize_{i}", None)
            if r is not None:
                x = torch.matmul(torch.matmul(r, x), r.T)  # rows then columns: [s, S] @ [B, 3, S, S] @ [S, s]
            feats.append(extractor(x).float().mean(dim=(2, 3)))
        return self.model.forward_head(torch.cat(feats, dim=1))


class MultiCNNAdapter(ClassificationAdapter):
    """The fused multi-CNN classifier: arg-max class and per-class probabilities (as classification)."""

    task = "multicnn"

    def load_torch(self, run_dir: Path) -> tuple[nn.Module, ModelInfo]:
        module, info = super().load_torch(run_dir)
        fused = module.model
        info.extra["members"] = [dict(m) for m in fused.members]
        return ClassifierWithProbabilities(FusedExport(fused, info.input_size[0])).eval(), info


register_adapter(MultiCNNAdapter())
