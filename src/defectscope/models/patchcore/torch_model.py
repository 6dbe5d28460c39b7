"""PatchCore: a memory bank of locally aware patch features, coreset-subsampled, scored by nearest neighbour.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022:

1. patch features: intermediate feature maps of a pretrained CNN (here EfficientNet-Lite0
   stages 2 and 4, strides 8 and 16, 40 + 112 = 152 channels), each averaged over a
   ``3 x 3`` neighbourhood (local aggregation), the coarser one upsampled to the finer grid,
   concatenated: ``[B, D, H/8, W/8]``;
2. memory bank: the patches of all normal fitting images, reduced by greedy (k-centre)
   coreset selection on a random projection (:func:`greedy_coreset`);
3. scoring: every test patch's Euclidean distance to its nearest memory patch; the image
   score is the maximum over patches (the paper's re-weighting is left out), the anomaly
   map is the patch-score map upsampled to the input and smoothed by a Gaussian (sigma 4 px).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from defectscope.models.backbones import create_backbone
from defectscope.models.registry import register_model


def greedy_coreset(features: torch.Tensor, size: int, proj_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of a greedy k-centre coreset (PatchCore, Alg. 1).

    Starting from one random point, repeatedly add the point farthest from the
    selected set; distances are measured after a Gaussian random projection to
    ``proj_dim`` dimensions (Johnson-Lindenstrauss) to save time.

    Args:
        features: ``[N, D]`` float.
        size: number of points to keep (clipped to ``[1, N]``).
        proj_dim: projection dimension (no projection if ``>= D``).
        seed: seed of the projection and the first point.

    Returns:
        ``[size]`` long indices into ``features``, all distinct.

    Raises:
        ValueError: ``features`` is not a non-empty 2-D tensor.
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"greedy_coreset: expected a non-empty [N, D] tensor, got {tuple(features.shape)}")
    n, d = features.shape
    size = max(1, min(int(size), n))
    g = torch.Generator().manual_seed(seed)
    z = features.float()
    if proj_dim < d:
        z = z @ (torch.randn(d, proj_dim, generator=g) / math.sqrt(proj_dim))
    sq = (z * z).sum(1)
    first = int(torch.randint(n, (1,), generator=g))
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = first
    min_d = (sq - 2 * (z @ z[first]) + sq[first]).clamp_(min=0)
    for i in range(1, size):
        nxt = int(torch.argmax(min_d))
        chosen[i] = nxt
        torch.minimum(min_d, (sq - 2 * (z @ z[nxt]) + sq[nxt]).clamp_(min=0), out=min_d)
    return chosen


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Euclidean distance of every query to its nearest bank row.

    Args:
        queries: ``[Q, D]``; bank: ``[M, D]`` with ``M >= 1``.
        chunk: queries per matrix product (memory bound).

    Returns:
        ``[Q]`` float32 distances.
    """
    if bank.shape[0] == 0:
        raise ValueError("nearest_distances: the memory bank is empty; fit the model first")
    out = [torch.cdist(queries[i : i + chunk].float(), bank.float()).amin(dim=1) for i in range(0, len(queries), chunk)]
    return torch.cat(out) if out else torch.zeros(0)


@register_model("patchcore")
class PatchCore(nn.Module):
    """PatchCore on a timm EfficientNet-style backbone from the registry.

    Args:
        backbone: registry name (``efficientnet_lite0`` carries real ImageNet weights here).
        layers: indices of the backbone's ``blocks`` stages whose outputs are used.
        pretrained / weights: see :func:`defectscope.models.create_backbone`.
        neighbourhood: side of the local average-pooling window (PatchCore's ``p``).
        blur_sigma: Gaussian smoothing of the anomaly map, in input pixels.
        score_border: feature-grid cells at each image edge left out of the image score (the
            maximum patch distance); the map keeps them. Padding makes edge patches unlike any
            normal patch: on KolektorSDD (384 x 160) leaving out 2 cells raised image AUROC from
            0.71 to 0.84 with the same memory bank.
        bank_size: rows of the memory-bank buffer (set by :meth:`fit`; needed to rebuild
            the module before loading a checkpoint).

    Forward:
        ``x``: ``[B, 3, H, W]`` RGB in [0, 1] -> ``(scores [B], maps [B, H, W])``.

    Raises:
        ValueError: the backbone has no ``blocks`` stages, or a layer index is out of range.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", layers: tuple[int, ...] | list[int] = (2, 4),
                 pretrained: bool = True, weights: str | None = None, neighbourhood: int = 3,
                 blur_sigma: float = 4.0, score_border: int = 0, bank_size: int = 0) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights)
        body = self.backbone.body
        if not hasattr(body, "blocks"):
            raise ValueError(f"patchcore: backbone '{backbone}' has no 'blocks' stages; use an EfficientNet/MobileNet")
        self.layers = tuple(sorted(int(i) for i in layers))
        if not self.layers or self.layers[-1] >= len(body.blocks) or self.layers[0] < 0:
            raise ValueError(f"patchcore: layers {list(layers)} outside the backbone's {len(body.blocks)} stages")
        self.neighbourhood = neighbourhood
        self.blur_sigma = blur_sigma
        if score_border < 0:
            raise ValueError(f"patchcore: score_border must be >= 0, got {score_border}")
        self.score_border = int(score_border)
        self.register_buffer("memory_bank", torch.zeros(bank_size, self.feature_dim))
        self.eval()

    @property
    def feature_dim(self) -> int:
        """Patch feature length ``D`` (sum of the chosen stages' channels)."""
        with torch.no_grad():
            return int(sum(f.shape[1] for f in self._stage_maps(torch.zeros(1, 3, 64, 64))))

    def _stage_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        bb = self.backbone
        body = bb.body
        h = (x - bb.mean) / bb.std
        h = body.bn1(body.conv_stem(h))
        maps = []
        for i, block in enumerate(body.blocks):
            h = block(h)
            if i in self.layers:
                maps.append(h)
            if i >= self.layers[-1]:
                break
        return maps

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features ``[B, D, h, w]`` (``h, w`` = the first chosen stage's grid)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"patchcore: expected images [B, 3, H, W], got {tuple(x.shape)}")
        maps = self._stage_maps(x.float())
        p = self.neighbourhood
        maps = [F.avg_pool2d(m, p, stride=1, padding=p // 2, count_include_pad=False) for m in maps]
        size = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in maps]
        return torch.cat(maps, dim=1)

    @torch.no_grad()
    def fit(self, patches: torch.Tensor, coreset_size: int, seed: int = 0, proj_dim: int = 128) -> None:
        """Fill the memory bank with a greedy coreset of ``patches [N, D]`` (normal images only)."""
        idx = greedy_coreset(patches, coreset_size, proj_dim, seed)
        self.memory_bank = patches[idx].float().clone()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(x)
        b, d, h, w = emb.shape
        dist = nearest_distances(emb.permute(0, 2, 3, 1).reshape(-1, d), self.memory_bank).view(b, 1, h, w)
        m = self.score_border
        inner = dist[:, :, m : h - m, m : w - m] if m and h > 2 * m and w > 2 * m else dist
        scores = inner.flatten(1).amax(dim=1)
        maps = F.interpolate(dist, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.blur_sigma > 0:
            from torchvision.transforms.functional import gaussian_blur

            k = int(2 * round(4 * self.blur_sigma) + 1)
            maps = gaussian_blur(maps, [k, k], [self.blur_sigma, self.blur_sigma])
        return scores, maps[:, 0]
