"""PaDiM: a Gaussian per patch position, scored by the Mahalanobis distance.

Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and
Localization", ICPR 2020 workshops:

1. patch embeddings (sec. 3.1): stage outputs of a pretrained CNN (here EfficientNet-Lite0 with its
   ImageNet weights, :class:`~defectscope.models.anomaly.StageFeatures`), coarser stages upsampled
   to the finest grid and concatenated; a seeded **random subset of ``n_features`` channels** is kept
   (the paper's Rd: random selection works as well as PCA);
2. learning (sec. 3.2, eq. 1): at every grid position ``ij`` a multivariate Gaussian
   ``N(mu_ij, Sigma_ij)`` of the normal images' embeddings, ``Sigma_ij`` the sample covariance
   plus ``eps * I`` (``eps`` = 0.01);
3. inference (sec. 3.3, eq. 2): ``M(x_ij) = sqrt((x_ij - mu_ij)^T Sigma_ij^-1 (x_ij - mu_ij))``;
   the map is ``M`` upsampled to the input and Gaussian-smoothed (``blur_sigma`` px), the image score
   the largest ``M`` inside ``score_border`` cells.

The Gaussians are tied to positions, so every image must come at the size the model was fitted
on (the task resizes to ``data.image_size``; with ``tile`` the positions are those of one window).
Memory of the fitted model: ``h * w * n_features^2 * 4`` bytes (the inverse covariances).
"""

from __future__ import annotations

import resource

import numpy as np
import torch
from pydantic import Field

from defectscope.models.anomaly import (
    AnomalyArgs,
    AnomalyModel,
    AnomalyOutput,
    StageFeatures,
    inner_max,
    register_anomaly_model,
    upsample_map,
)


class PaDiMArgs(AnomalyArgs):
    """Recipe block ``model`` for ``name: padim`` (see :class:`PaDiM`)."""

    name: str = "padim"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None
    layers: list[int] = [2, 4]
    neighbourhood: int = Field(1, ge=1)
    n_features: int = Field(100, ge=1)
    eps: float = Field(0.01, gt=0)
    score_border: int = Field(0, ge=0)
    blur_sigma: float = Field(4.0, ge=0)
    seed: int = 0


@register_anomaly_model
class PaDiM(AnomalyModel):
    """PaDiM (Defard et al., 2020; see the module docstring).

    Args:
        backbone, layers, pretrained, weights, neighbourhood: :class:`~defectscope.models.anomaly.StageFeatures`
            (PaDiM itself uses no local averaging: ``neighbourhood`` 1).
        n_features: random channels kept (all when larger than the embedding).
        eps: ridge added to each covariance's diagonal.
        score_border, blur_sigma: as :class:`~defectscope.models.patchcore.PatchCore`.
        seed: seed of the channel subset.
        tile, tile_stride: see :class:`~defectscope.models.anomaly.AnomalyModel`.

    Forward: ``[B, 3, H, W]`` (the fitted size) in [0, 1] -> ``(pred_score [B], anomaly_map [B, H, W])``.

    Raises:
        ValueError (forward): the feature grid differs from the fitted one.
    """

    name = "padim"
    Args = PaDiMArgs
    fitted_buffers = ("mean", "inv_cov")

    def __init__(self, backbone: str = "efficientnet_lite0", layers: list[int] | tuple[int, ...] = (2, 4),
                 pretrained: bool = True, weights: str | None = None, neighbourhood: int = 1,
                 n_features: int = 100, eps: float = 0.01, score_border: int = 0, blur_sigma: float = 4.0,
                 seed: int = 0, tile: list[int] | None = None, tile_stride: list[int] | None = None) -> None:
        super().__init__(tile, tile_stride)
        self.features = StageFeatures(backbone, layers, pretrained, weights, neighbourhood)
        d = self.features.dim
        k = min(int(n_features), d)
        g = torch.Generator().manual_seed(int(seed))
        self.register_buffer("channels", torch.randperm(d, generator=g)[:k].sort().values)
        self.register_buffer("mean", torch.zeros(0, k))
        self.register_buffer("inv_cov", torch.zeros(0, k, k))
        self.register_buffer("grid", torch.zeros(2, dtype=torch.long))
        self.eps, self.score_border, self.blur_sigma = float(eps), int(score_border), float(blur_sigma)
        self.args.update(backbone=backbone, layers=list(self.features.layers), pretrained=bool(pretrained),
                         weights=weights, neighbourhood=int(neighbourhood), n_features=int(n_features),
                         eps=self.eps, score_border=self.score_border, blur_sigma=self.blur_sigma, seed=int(seed))
        self.eval()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Selected channels ``[B, k, h, w]``."""
        return self.features(x).index_select(1, self.channels)

    @torch.no_grad()
    def fit(self, x_fit: np.ndarray, x_cal: np.ndarray | None = None, batch_size: int = 4, **context) -> dict:
        """Fit the Gaussians from normal uint8 images ``x_fit [N, 3, H, W]`` (``x_cal`` unused).

        Sums and outer-product sums per position are accumulated over batches (float64), so the
        fitting memory is ``h * w * k^2`` doubles whatever ``N``.

        Returns:
            ``images``, ``grid``, ``channels`` (k), ``model_mib``, ``peak_rss_mib``, ``weights``.

        Raises:
            ValueError: fewer than 2 fitting images.
        """
        if len(x_fit) < 2:
            raise ValueError("padim: need at least 2 fitting images for a covariance")
        from defectscope.models.patchcore.torch_model import PatchCore

        n, s1, s2, grid = 0, None, None, None
        for xb in PatchCore.windows(self, x_fit, batch_size):  # the same windows as PatchCore's
            e = self._embed(xb).double()
            b, k, h, w = e.shape
            if s1 is None:
                grid = (h, w)
                s1 = torch.zeros(h * w, k, dtype=torch.float64)
                s2 = torch.zeros(h * w, k, k, dtype=torch.float64)
            t = e.flatten(2).permute(2, 0, 1)  # [P, B, k]
            s1 += t.sum(1)
            s2 += t.transpose(1, 2) @ t
            n += b
        mean = s1 / n
        cov = (s2 - n * mean[:, :, None] * mean[:, None, :]) / (n - 1)
        cov += self.eps * torch.eye(cov.shape[-1], dtype=cov.dtype)
        self.mean = mean.float()
        self.inv_cov = torch.linalg.inv(cov).float()
        self.grid = torch.tensor(grid, dtype=torch.long)
        info = {"images": int(n), "grid": list(grid), "channels": int(self.channels.numel()),
                "model_mib": round(self.inv_cov.numel() * 4 / 2**20, 1),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
                "weights": self.features.weights_source}
        print(f"padim: {grid[0]} x {grid[1]} Gaussians of {info['channels']} channels from {n} windows, "
              f"{info['model_mib']} MiB; peak RSS {info['peak_rss_mib']:.0f} MiB", flush=True)
        return info

    def score_tiles(self, x: torch.Tensor) -> AnomalyOutput:
        e = self._embed(x)
        b, k, h, w = e.shape
        if h * w != self.mean.shape[0]:
            raise ValueError(f"padim: feature grid {h} x {w} of a {tuple(x.shape[-2:])} input differs from the fitted "
                             f"{self.mean.shape[0]} positions; give images at the fitted size")
        t = e.flatten(2).permute(2, 0, 1) - self.mean[:, None, :]  # [P, B, k]
        m2 = (torch.bmm(t, self.inv_cov) * t).sum(-1)  # [P, B]
        dist = m2.clamp_min(0).sqrt().transpose(0, 1).reshape(b, 1, h, w)
        return AnomalyOutput(inner_max(dist, self.score_border), upsample_map(dist, x.shape[-2:], self.blur_sigma))
