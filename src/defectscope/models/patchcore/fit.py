"""Fitting PatchCore: filling its memory bank from normal images (no gradient training, no Lightning).

PatchCore (Roth et al., CVPR 2022) has no trainable weights: its backbone stays as loaded
(ImageNet weights) and "fitting" is the collection of the normal images' patch features,
reduced to a greedy coreset (:func:`defectscope.models.patchcore.greedy_coreset`). So there is
no LightningModule here; :func:`patchcore_fit` is the whole of it and :func:`patchcore_score`
scores images with the filled model.
"""

from __future__ import annotations

import numpy as np
import torch

from defectscope.models.patchcore.torch_model import PatchCore
from defectscope.models.registry import create_model
from defectscope.models.training import to_float


def patchcore_fit(x_fit: np.ndarray, backbone: str = "efficientnet_lite0", layers: list[int] | tuple[int, ...] = (2, 4),
                  pretrained: bool = True, weights: str | None = None, score_border: int = 0,
                  coreset_ratio: float = 0.01, max_patches: int = 200_000, batch_size: int = 16,
                  seed: int = 0) -> tuple[PatchCore, dict, dict]:
    """Build PatchCore and fill its memory bank from normal uint8 images ``x_fit [N, 3, H, W]``.

    All ``N * h * w`` patch features (``h, w`` = the first chosen stage's grid, stride 8) are
    collected; when more than ``max_patches``, a seeded random subset of ``max_patches`` is kept
    before the greedy coreset of ``round(coreset_ratio * N * h * w)`` rows (at least 1) is chosen.

    Args:
        x_fit: normal images only (never a defective one).
        backbone, layers, pretrained, weights, score_border: see :class:`PatchCore`.
        coreset_ratio: memory-bank size as a share of all fitting patches (PatchCore: 1-10 %).
        max_patches: random pre-subsample bound (time of the coreset selection).
        batch_size: images per forward pass.
        seed: seed of the pre-subsample and of the coreset.

    Returns:
        ``(model in eval mode, model_kwargs, info)``: ``model_kwargs`` rebuild the architecture
        with its bank for ``create_model("patchcore", **model_kwargs)`` + ``load_state_dict``
        (``pretrained=False``: the weights come from the state dict); ``info`` holds
        ``patches``, ``presampled``, ``memory_bank``, ``feature_dim``, ``weights``.

    Raises:
        ValueError: no image, or the backbone/layers do not fit (see :class:`PatchCore`).
    """
    if len(x_fit) == 0:
        raise ValueError("patchcore_fit: no fitting image")
    arch = {"backbone": backbone, "layers": [int(i) for i in layers], "score_border": int(score_border)}
    model = create_model("patchcore", **arch, pretrained=pretrained, weights=weights)
    embs = []
    for i in range(0, len(x_fit), batch_size):
        e = model.embed(to_float(torch.from_numpy(x_fit[i : i + batch_size])))
        embs.append(e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]))
    patches = torch.cat(embs)
    total = len(patches)
    g = torch.Generator().manual_seed(seed)
    if total > max_patches:
        patches = patches[torch.randperm(total, generator=g)[:max_patches]]
    size = max(1, int(round(coreset_ratio * total)))
    model.fit(patches, size, seed=seed)
    bank = int(model.memory_bank.shape[0])
    kwargs = {**arch, "bank_size": bank, "pretrained": False}
    info = {"patches": total, "presampled": int(len(patches)), "memory_bank": bank,
            "feature_dim": int(patches.shape[1]), "weights": model.backbone.weights_source}
    return model.eval(), kwargs, info


@torch.no_grad()
def patchcore_score(model: PatchCore, x: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, torch.Tensor]:
    """Image scores ``[N]`` (float32, max nearest-patch distance) and anomaly maps ``[N, H, W]`` of uint8 images."""
    s, m = [], []
    for i in range(0, len(x), batch_size):
        a, b = model(to_float(torch.from_numpy(x[i : i + batch_size])))
        s.append(a)
        m.append(b)
    if not s:
        return np.zeros(0, dtype=np.float32), torch.zeros(0, *x.shape[-2:])
    return torch.cat(s).numpy(), torch.cat(m)
