"""The U-Net's inference: test-time flips, sigmoid and the image score, as one export-ready module.

``UNetInference(model, tta, image_score, size)(image)`` -> ``(mask_probabilities [B, K, H, W],
image_score [B])`` for images ``float32 [B, 3, H, W]`` RGB in [0, 1]. It is the only forward of a
trained U-Net: the pipeline's test predictions, ``defectscope predict`` / ``evaluate``, the
service, ``inspect`` and the ONNX graph all run it.

- ``mask_probabilities``: sigmoid of the logits; with ``tta`` the mean over the image and its
  horizontal, vertical and double flips, each flipped back (4 forward passes);
- ``image_score``: the rule of :func:`defectscope.evaluation.segmentation.image_scores`, computed
  in the graph: ``max`` (largest pixel probability), ``blur_max`` (largest value after a Gaussian
  blur, sigma 2 px, truncated at 4 sigma, edge pixels repeated: scipy's
  ``gaussian_filter(mode="nearest")`` as two 1-D convolutions) or ``top_mean`` (mean of the top
  0.1 % pixel probabilities, maximum over classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: image-score rules (the same names as :data:`defectscope.evaluation.segmentation.IMAGE_SCORE_METHODS`)
IMAGE_SCORE_METHODS = ("max", "blur_max", "top_mean")

#: ``image_scores`` defaults (evaluation/segmentation.py): blur sigma in map pixels, top-mean share
BLUR_SIGMA = 2.0
BLUR_TRUNCATE = 4.0
TOP_FRACTION = 0.001


def gaussian_kernel1d(sigma: float, truncate: float = BLUR_TRUNCATE) -> torch.Tensor:
    """scipy's 1-D Gaussian weights ``exp(-x^2 / (2 sigma^2))``, normalised, ``x`` in
    ``[-r, r]`` with ``r = int(truncate * sigma + 0.5)`` (``scipy.ndimage.gaussian_filter``); ``[2r + 1]``."""
    r = int(truncate * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * x**2 / sigma**2)
    return (w / w.sum()).float()


class UNetInference(nn.Module):
    """U-Net -> ``(mask_probabilities [B, K, H, W], image_score [B])`` (see the module docstring).

    Args:
        model: the trained U-Net, images ``[B, 3, H, W]`` in [0, 1] -> logits ``[B, K, H, W]``.
        tta: average over the four flips.
        image_score: ``max``, ``blur_max`` or ``top_mean``.
        size: ``(H, W)`` of the input (fixes ``k`` of ``top_mean``).

    Raises:
        ValueError: unknown ``image_score`` rule.
    """

    def __init__(self, model: nn.Module, tta: bool, image_score: str, size: tuple[int, int]) -> None:
        super().__init__()
        if image_score not in IMAGE_SCORE_METHODS:
            raise ValueError(f"image_score rule {image_score!r} unknown; expected one of {IMAGE_SCORE_METHODS}")
        self.model, self.tta, self.rule = model, bool(tta), image_score
        self.register_buffer("kernel", gaussian_kernel1d(BLUR_SIGMA), persistent=False)
        self.top_k = max(1, int(round(TOP_FRACTION * size[0] * size[1])))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        flips = ((), (3,), (2,), (2, 3)) if self.tta else ((),)
        total = None
        for dims in flips:
            p = torch.sigmoid(self.model(x.flip(dims) if dims else x).float())
            p = p.flip(dims) if dims else p
            total = p if total is None else total + p
        return total / len(flips)

    def blur(self, p: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur of ``[B, K, H, W]`` with repeated edge pixels (scipy ``mode="nearest"``)."""
        b, k, h, w = p.shape
        r = (self.kernel.numel() - 1) // 2
        z = p.reshape(b * k, 1, h, w)
        z = F.conv2d(F.pad(z, (0, 0, r, r), mode="replicate"), self.kernel.view(1, 1, -1, 1))
        z = F.conv2d(F.pad(z, (r, r, 0, 0), mode="replicate"), self.kernel.view(1, 1, 1, -1))
        return z.reshape(b, k, h, w)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probabilities(image)
        if self.rule == "top_mean":
            score = p.flatten(2).topk(self.top_k, dim=2).values.mean(dim=2).amax(dim=1)
        else:
            q = self.blur(p) if self.rule == "blur_max" else p
            score = q.flatten(1).amax(dim=1)
        return p, score


@torch.no_grad()
def predict_unet(module: "UNetInference", x, batch_size: int = 8):
    """``(mask_probabilities float32 [N, K, H, W], image_score float32 [N])`` of ``uint8 [N, 3, H, W]``
    images (NumPy or tensor) through :class:`UNetInference` in batches (fp32, eval mode)."""
    import numpy as np

    module.eval()
    x = torch.as_tensor(x)
    probs, scores = [], []
    for i in range(0, len(x), batch_size):
        p, s = module(x[i : i + batch_size].float() / 255.0)
        probs.append(p)
        scores.append(s)
    if not probs:
        return np.zeros((0, 1, *x.shape[2:]), np.float32), np.zeros(0, np.float32)
    return torch.cat(probs).numpy(), torch.cat(scores).numpy()
