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
Memory of the fitted model: ``G * n_features^2 * 4`` bytes (the inverse covariances), ``G`` the number
of Gaussians.

``share: rows`` (our option, not in the paper) ties the Gaussians of a column together: one Gaussian
per feature column, fitted on every row of it. For surfaces whose texture does not change along one
axis (KolektorSDD's commutator strips: the texture runs top to bottom, the image edges are left and
right) it estimates each covariance from ``N * h`` instead of ``N`` patches, which a ``k``-dimensional
covariance needs when ``N`` is a few hundred images. ``share: all`` fits one Gaussian for the whole grid.
"""

from __future__ import annotations

import resource
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from defectscope.models.anomaly import (
    AnomalyModel,
    AnomalyOutput,
    FeatureAnomalyArgs,
    StageFeatures,
    inner_max,
    register_anomaly_model,
    upsample_map,
)


def ledoit_wolf(xc: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariances of centred samples, batched (Ledoit & Wolf, J. Multivar. Anal. 88, 2004).

    For each group ``g`` with centred samples ``x_i`` (``n`` of them, ``k`` values): the sample covariance
    ``S = sum_i x_i x_i^T / n``, the target ``mu I`` with ``mu = tr(S) / k``, and
    ``Sigma = (1 - s) S + s mu I`` with the shrinkage ``s = min(b, d) / d``,
    ``d = ||S - mu I||_F^2``, ``b = sum_i ||x_i x_i^T - S||_F^2 / n^2 = (sum_i ||x_i||^4 - n ||S||_F^2) / n^2``
    (scikit-learn's ``ledoit_wolf`` on centred data; tested equal to it).

    Args:
        xc: ``[G, n, k]`` centred samples (float64 recommended).

    Returns:
        ``[G, k, k]`` shrunk covariances (same dtype).

    Raises:
        ValueError: not a 3-D tensor or fewer than 2 samples.
    """
    if xc.ndim != 3 or xc.shape[1] < 2:
        raise ValueError(f"ledoit_wolf: expected centred samples [G, n >= 2, k], got {tuple(xc.shape)}")
    _, n, k = xc.shape
    s = xc.transpose(1, 2) @ xc / n
    mu = torch.diagonal(s, dim1=1, dim2=2).sum(-1) / k  # [G]
    eye = torch.eye(k, dtype=xc.dtype)
    d2 = ((s - mu[:, None, None] * eye) ** 2).sum((1, 2))
    b2 = ((xc * xc).sum(-1) ** 2).sum(-1) - n * (s * s).sum((1, 2))
    b2 = torch.minimum(b2 / n**2, d2)
    shrink = torch.where(d2 > 0, b2 / d2.clamp_min(1e-300), torch.ones_like(d2))
    return (1 - shrink)[:, None, None] * s + (shrink * mu)[:, None, None] * eye


class PaDiMArgs(FeatureAnomalyArgs):
    """Recipe block ``model`` for ``name: padim`` (see :class:`PaDiM`)."""

    name: str = "padim"
    neighbourhood: int = Field(1, ge=1)
    n_features: int = Field(100, ge=1)
    eps: float = Field(0.01, gt=0)
    covariance: Literal["ridge", "ledoit_wolf"] = "ridge"
    share: Literal["none", "rows", "all"] = "none"
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
        covariance: ``ridge`` (the sample covariance + ``eps I``, the paper) or ``ledoit_wolf`` (the
            Ledoit-Wolf shrunk covariance, :func:`ledoit_wolf`, + ``eps I``): with ``n`` ~ 200 images for
            ``k`` = 100 channels the sample covariance is poorly conditioned, and the shrinkage intensity
            is estimated from the data per Gaussian instead of a fixed ridge.
        share: ``none`` (a Gaussian per position, the paper), ``rows`` (one per column), ``all`` (one).
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
                 n_features: int = 100, eps: float = 0.01, covariance: str = "ridge", share: str = "none", score_border: int = 0,
                 blur_sigma: float = 4.0,
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
        if share not in ("none", "rows", "all"):
            raise ValueError(f"padim: share must be none, rows or all, got {share!r}")
        if covariance not in ("ridge", "ledoit_wolf"):
            raise ValueError(f"padim: covariance must be ridge or ledoit_wolf, got {covariance!r}")
        self.eps, self.share, self.covariance = float(eps), share, covariance
        self.score_border, self.blur_sigma = int(score_border), float(blur_sigma)
        self.args.update(backbone=backbone, layers=list(self.features.layers), pretrained=bool(pretrained),
                         weights=weights, neighbourhood=int(neighbourhood), n_features=int(n_features),
                         eps=self.eps, covariance=covariance, share=share, score_border=self.score_border, blur_sigma=self.blur_sigma, seed=int(seed))
        self.eval()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Selected channels ``[B, k, h, w]``."""
        return self.features(x).index_select(1, self.channels)

    def _groups(self, e: torch.Tensor) -> torch.Tensor:
        """``[B, k, h, w]`` -> ``[G, M, k]``: the samples of each Gaussian (G = h*w, w or 1)."""
        b, k, h, w = e.shape
        if self.share == "rows":
            return e.permute(3, 0, 2, 1).reshape(w, b * h, k)
        if self.share == "all":
            return e.permute(0, 2, 3, 1).reshape(1, b * h * w, k)
        return e.flatten(2).permute(2, 0, 1)

    def _ungroup(self, m: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        """``[G, M]`` distances back to ``[B, 1, h, w]``."""
        if self.share == "rows":
            return m.reshape(w, b, h).permute(1, 2, 0).reshape(b, 1, h, w)
        if self.share == "all":
            return m.reshape(b, 1, h, w)
        return m.transpose(0, 1).reshape(b, 1, h, w)

    @torch.no_grad()
    def fit(self, x_fit: np.ndarray, x_cal: np.ndarray | None = None, batch_size: int = 4, **context) -> dict:
        """Fit the Gaussians from normal uint8 images ``x_fit [N, 3, H, W]`` (``x_cal`` unused).

        ``ridge``: sums and outer-product sums per position are accumulated over batches (float64), so the
        fitting memory is ``h * w * k^2`` doubles whatever ``N``. ``ledoit_wolf`` keeps every fitting
        embedding (``N * h * w * k`` floats, 195 MiB for 190 images at 640 x 256) for the shrinkage estimate.

        Returns:
            ``images``, ``grid``, ``channels`` (k), ``model_mib``, ``peak_rss_mib``, ``weights``.

        Raises:
            ValueError: fewer than 2 fitting images.
        """
        if len(x_fit) < 2:
            raise ValueError("padim: need at least 2 fitting images for a covariance")
        from defectscope.models.patchcore.torch_model import PatchCore

        n, s1, s2, grid, kept = 0, None, None, None, []
        for xb in PatchCore.windows(self, x_fit, batch_size):  # the same windows as PatchCore's
            e = self._embed(xb).double()
            b, k, h, w = e.shape
            t = self._groups(e)  # [G, M, k]
            if s1 is None:
                grid = (h, w)
                s1 = torch.zeros(t.shape[0], k, dtype=torch.float64)
                s2 = torch.zeros(t.shape[0], k, k, dtype=torch.float64)
            s1 += t.sum(1)
            s2 += t.transpose(1, 2) @ t
            n += t.shape[1]
            if self.covariance == "ledoit_wolf":
                kept.append(t.float())
        mean = s1 / n
        if self.covariance == "ledoit_wolf":
            cov = ledoit_wolf(torch.cat(kept, dim=1).double() - mean[:, None])
            del kept
        else:
            cov = (s2 - n * mean[:, :, None] * mean[:, None, :]) / (n - 1)
        cov += self.eps * torch.eye(cov.shape[-1], dtype=cov.dtype)
        self.mean = mean.float()
        self.inv_cov = torch.linalg.inv(cov).float()
        self.grid = torch.tensor(grid, dtype=torch.long)
        info = {"samples_per_gaussian": int(n), "gaussians": int(self.mean.shape[0]), "grid": list(grid),
                "channels": int(self.channels.numel()),
                "model_mib": round(self.inv_cov.numel() * 4 / 2**20, 1),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
                "weights": self.features.weights_source}
        print(f"padim: {info['gaussians']} Gaussians ({self.share} shared, {self.covariance} covariance, grid {grid[0]} x {grid[1]}) of "
              f"{info['channels']} channels from {n} patches each, "
              f"{info['model_mib']} MiB; peak RSS {info['peak_rss_mib']:.0f} MiB", flush=True)
        return info

    def score_tiles(self, x: torch.Tensor) -> AnomalyOutput:
        e = self._embed(x)
        b, k, h, w = e.shape
        if (h, w) != tuple(int(v) for v in self.grid) and self.share != "all":
            raise ValueError(f"padim: feature grid {h} x {w} of a {tuple(x.shape[-2:])} input differs from the fitted "
                             f"{tuple(int(v) for v in self.grid)}; give images at the fitted size")
        t = self._groups(e) - self.mean[:, None, :]  # [G, M, k]
        m2 = (torch.bmm(t, self.inv_cov) * t).sum(-1)  # [G, M]
        dist = self._ungroup(m2.clamp_min(0).sqrt(), b, h, w)
        return AnomalyOutput(inner_max(dist, self.score_border), upsample_map(dist, x.shape[-2:], self.blur_sigma))
