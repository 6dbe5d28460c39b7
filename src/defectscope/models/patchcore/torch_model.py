"""PatchCore: a memory bank of locally aware patch features, coreset-subsampled, scored by nearest neighbour.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022:

1. patch features (sec. 3.1): intermediate stage outputs of a pretrained CNN (here EfficientNet-Lite0,
   the one ImageNet backbone on this machine; stages 2 and 4 = strides 8 and 16, 40 + 112 = 152
   channels), each averaged over a ``3 x 3`` neighbourhood, the coarser one upsampled to the finer
   grid, concatenated (:class:`~defectscope.models.anomaly.StageFeatures`);
2. memory bank (sec. 3.2, Alg. 1): the patches of the normal fitting images (a seeded random
   ``patches_per_image`` of each image first, which bounds the fitting memory), reduced by greedy
   k-centre coreset selection on a random projection (:func:`greedy_coreset`) to
   ``coreset_ratio`` of all patches, capped at ``bank_mib`` MiB;
3. scoring (sec. 3.3): every test patch's Euclidean distance to its nearest bank row (one matrix
   product per chunk of patches, inside the exported graph); the image score is the largest
   distance inside ``score_border`` cells, or with ``reweight_neighbours = b`` that distance re-weighted as
   the paper's eq. 7 (:func:`reweighted_score`); the anomaly map
   is the distance grid upsampled to the input and smoothed by a Gaussian (``blur_sigma`` px).
"""

from __future__ import annotations

import math
import resource
import time

import numpy as np
import torch

from defectscope.models.anomaly import (
    AnomalyModel,
    AnomalyOutput,
    FeatureAnomalyArgs,
    StageFeatures,
    inner_cells,
    inner_max,
    register_anomaly_model,
    upsample_map,
)
from pydantic import Field, field_validator


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


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096,
                      return_index: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance of every query to its nearest bank row.

    ``||q - b||^2 = ||q||^2 - 2 q.b + ||b||^2`` by one matrix product per ``chunk`` queries
    (exports to ONNX as MatMul + ReduceMin; the chunk loop depends only on the query count,
    which is fixed by the input size).

    Args:
        queries: ``[B, Q, D]``; bank: ``[M, D]`` with ``M >= 1``.
        return_index: also return the nearest row's index.

    Returns:
        ``[B, Q]`` float32 distances (and ``[B, Q]`` int64 bank row indices with ``return_index``).

    Raises:
        ValueError: an empty bank (the model was not fitted).
    """
    if bank.shape[0] == 0:
        raise ValueError("nearest_distances: the memory bank is empty; fit the model first")
    b2 = (bank * bank).sum(1)
    out, where = [], []
    for i in range(0, queries.shape[1], chunk):
        q = queries[:, i : i + chunk]
        d2 = (q * q).sum(-1, keepdim=True) - 2 * q @ bank.T + b2
        if return_index:  # min with its argmin; without, ReduceMin alone in the exported graph
            d2, j = d2.min(dim=-1)
            where.append(j)
        else:
            d2 = d2.amin(dim=-1)
        out.append(d2.clamp_min(0).sqrt())
    dist = torch.cat(out, dim=1)
    return (dist, torch.cat(where, dim=1)) if return_index else dist


def reweighted_score(dist: torch.Tensor, index: torch.Tensor, queries: torch.Tensor, bank: torch.Tensor,
                     neighbours: int) -> torch.Tensor:
    """PatchCore's image score with the paper's re-weighting (Roth et al., CVPR 2022, eq. 7).

    ``s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*``: ``m_test*`` is the test
    patch with the largest nearest-neighbour distance ``s*``, ``m*`` its nearest bank row and ``N_b(m*)`` the
    ``b = neighbours`` bank rows nearest to ``m*`` (``m*`` itself first). A patch whose nearest normal patch
    lies in a dense part of the bank keeps almost all of ``s*``; one whose neighbourhood in the bank is sparse
    (a rare normal pattern) is scaled down. All in the graph (ArgMax, Gather, TopK, Softmax).

    Args:
        dist: ``[B, Q]`` nearest distances; index: ``[B, Q]`` their bank rows; queries: ``[B, Q, D]`` (the patches
            the image score is taken over, e.g. inside the score border); bank: ``[M, D]``;
            neighbours: ``b >= 2`` (anomalib's default 9; capped at ``M``).

    Returns:
        ``[B]`` image scores, ``<= s*``.

    Raises:
        ValueError: ``neighbours < 2``.
    """
    if neighbours < 2:
        raise ValueError(f"reweighted_score: neighbours must be >= 2, got {neighbours}")
    j = dist.argmax(dim=1, keepdim=True)  # [B, 1]
    s_star = dist.gather(1, j)[:, 0]
    f_star = queries.gather(1, j[:, :, None].expand(-1, 1, queries.shape[-1]))[:, 0]  # [B, D]
    m_star = bank[index.gather(1, j)[:, 0]]  # [B, D]
    d2 = (m_star * m_star).sum(-1, keepdim=True) - 2 * m_star @ bank.T + (bank * bank).sum(1)  # [B, M]
    nb = d2.topk(min(int(neighbours), bank.shape[0]), dim=1, largest=False).indices  # [B, b], m* first
    d_test = (f_star[:, None, :] - bank[nb]).pow(2).sum(-1).clamp_min(0).sqrt()  # [B, b]
    return (1.0 - torch.softmax(d_test, dim=1)[:, 0]) * s_star


class PatchCoreArgs(FeatureAnomalyArgs):
    """Recipe block ``model`` for ``name: patchcore`` (see :class:`PatchCore`)."""

    name: str = "patchcore"
    neighbourhood: int = Field(3, ge=1)
    coreset_ratio: float = Field(0.01, gt=0, le=1)
    bank_mib: float = Field(16.0, gt=0)
    patches_per_image: int = Field(1000, ge=1)
    score_border: int = Field(0, ge=0)
    blur_sigma: float = Field(4.0, ge=0)
    reweight_neighbours: int = Field(0, ge=0)
    seed: int = 0

    @field_validator("reweight_neighbours")
    @classmethod
    def _check_reweight(cls, v: int) -> int:
        if v == 1:
            raise ValueError("reweight_neighbours: 0 (no re-weighting) or >= 2 (the paper's b; anomalib uses 9)")
        return v


@register_anomaly_model
class PatchCore(AnomalyModel):
    """PatchCore on a registry backbone (Roth et al., CVPR 2022; see the module docstring).

    Args:
        backbone, layers, pretrained, weights, neighbourhood: :class:`~defectscope.models.anomaly.StageFeatures`.
        coreset_ratio: bank rows as a share of all fitting patches (PatchCore: 1-10 %).
        bank_mib: cap on the bank's size in MiB (float32 rows of ``D`` values): rows = min(ratio, cap).
        patches_per_image: seeded random patches kept of each fitting image before the coreset
            (bounds the fitting memory at ``N * patches_per_image * D * 4`` bytes).
        score_border: feature cells at each edge left out of the image score (padding effects).
        blur_sigma: Gaussian smoothing of the map, input pixels.
        reweight_neighbours: ``0``: the image score is the largest patch distance; ``b >= 2``: the paper's
            re-weighting of it over the ``b`` bank rows nearest to the patch's neighbour (:func:`reweighted_score`).
        seed: seed of the subsample and the coreset.
        tile, tile_stride: see :class:`~defectscope.models.anomaly.AnomalyModel`.

    Forward: ``[B, 3, H, W]`` in [0, 1] -> ``(pred_score [B], anomaly_map [B, H, W])``.
    """

    name = "patchcore"
    Args = PatchCoreArgs
    fitted_buffers = ("memory_bank",)

    def __init__(self, backbone: str = "efficientnet_lite0", layers: list[int] | tuple[int, ...] = (2, 4),
                 pretrained: bool = True, weights: str | None = None, neighbourhood: int = 3,
                 coreset_ratio: float = 0.01, bank_mib: float = 16.0, patches_per_image: int = 1000,
                 score_border: int = 0, blur_sigma: float = 4.0, seed: int = 0,
                 tile: list[int] | None = None, tile_stride: list[int] | None = None,
                 reweight_neighbours: int = 0) -> None:
        super().__init__(tile, tile_stride)
        self.features = StageFeatures(backbone, layers, pretrained, weights, neighbourhood)
        if score_border < 0:
            raise ValueError(f"patchcore: score_border must be >= 0, got {score_border}")
        if reweight_neighbours < 0 or reweight_neighbours == 1:
            raise ValueError(f"patchcore: reweight_neighbours must be 0 or >= 2, got {reweight_neighbours}")
        self.reweight_neighbours = int(reweight_neighbours)
        self.coreset_ratio, self.bank_mib, self.patches_per_image = coreset_ratio, bank_mib, int(patches_per_image)
        self.score_border, self.blur_sigma, self.seed = int(score_border), float(blur_sigma), int(seed)
        self.register_buffer("memory_bank", torch.zeros(0, self.features.dim))
        self.args.update(backbone=backbone, layers=list(self.features.layers), pretrained=bool(pretrained),
                         weights=weights, neighbourhood=int(neighbourhood), coreset_ratio=float(coreset_ratio),
                         bank_mib=float(bank_mib), patches_per_image=self.patches_per_image,
                         score_border=self.score_border, blur_sigma=self.blur_sigma, seed=self.seed,
                         reweight_neighbours=self.reweight_neighbours)
        self.eval()

    def windows(self, x: np.ndarray, batch_size: int):
        """Float batches of uint8 ``x`` cut into the model's tiles (the whole image when untiled)."""
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).float() / 255.0
            if self.tile is None:
                yield xb
                continue
            from defectscope.models.anomaly import window_starts

            h, w = xb.shape[-2:]
            th, tw = min(self.tile[0], h), min(self.tile[1], w)
            for y in window_starts(h, th, self.tile_stride[0]):
                for c in window_starts(w, tw, self.tile_stride[1]):
                    yield xb[:, :, y : y + th, c : c + tw]

    @torch.no_grad()
    def fit(self, x_fit: np.ndarray, x_cal: np.ndarray | None = None, batch_size: int = 4, **context) -> dict:
        """Fill the memory bank from normal uint8 images ``x_fit [N, 3, H, W]`` (``x_cal`` unused).

        Returns:
            ``patches`` (all fitting patches), ``presampled``, ``memory_bank`` (rows), ``bank_mib``,
            ``feature_dim``, ``grid``, ``coreset_seconds``, ``peak_rss_mib`` (the process's peak
            resident memory after fitting), ``weights``.

        Raises:
            ValueError: no fitting image.
        """
        if len(x_fit) == 0:
            raise ValueError("patchcore: no fitting image")
        self.eval()
        g = torch.Generator().manual_seed(self.seed)
        pool, total, grid = [], 0, None
        for xb in self.windows(x_fit, batch_size):
            e = self.features(xb)
            b, d, h, w = e.shape
            grid = (h, w)
            e = e.flatten(2).transpose(1, 2)  # [B, P, D]
            total += b * h * w
            k = min(self.patches_per_image, h * w)
            for j in range(b):
                pool.append(e[j, torch.randperm(h * w, generator=g)[:k]].clone())
        pool = torch.cat(pool)
        d = pool.shape[1]
        cap = max(1, int(self.bank_mib * 2**20 // (4 * d)))
        size = min(max(1, int(round(self.coreset_ratio * total))), cap, len(pool))
        t0 = time.perf_counter()
        self.memory_bank = pool[greedy_coreset(pool, size, 128, self.seed)].float().clone()
        rows = int(self.memory_bank.shape[0])
        info = {"patches": int(total), "presampled": int(len(pool)), "memory_bank": rows,
                "bank_mib": round(rows * d * 4 / 2**20, 2), "bank_cap_rows": cap, "feature_dim": int(d),
                "grid": list(grid), "coreset_seconds": round(time.perf_counter() - t0, 1),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
                "weights": self.features.weights_source}
        print(f"patchcore: memory bank {rows} rows x {d} = {info['bank_mib']} MiB (cap {self.bank_mib} MiB) from "
              f"{len(pool)} presampled of {total} patches; peak RSS {info['peak_rss_mib']:.0f} MiB", flush=True)
        return info

    def score_tiles(self, x: torch.Tensor) -> AnomalyOutput:
        emb = self.features(x)
        b, d, h, w = emb.shape
        q = emb.flatten(2).transpose(1, 2)  # [B, h * w, D]
        if not self.reweight_neighbours:
            dist = nearest_distances(q, self.memory_bank).view(b, 1, h, w)
            return AnomalyOutput(inner_max(dist, self.score_border), upsample_map(dist, x.shape[-2:], self.blur_sigma))
        dist, idx = nearest_distances(q, self.memory_bank, return_index=True)
        rows, cols = inner_cells(h, w, self.score_border)  # the image score inside the border, as inner_max
        score = reweighted_score(dist.view(b, h, w)[:, rows, cols].flatten(1), idx.view(b, h, w)[:, rows, cols].flatten(1),
                                 q.view(b, h, w, d)[:, rows, cols].flatten(1, 2), self.memory_bank, self.reweight_neighbours)
        return AnomalyOutput(score, upsample_map(dist.view(b, 1, h, w), x.shape[-2:], self.blur_sigma))
