"""PatchCore (Roth et al., CVPR 2022) on a registry backbone: the peer of Grad-MobileNet."""

from defectscope.models.patchcore.torch_model import PatchCore, greedy_coreset, nearest_distances

__all__ = ["PatchCore", "greedy_coreset", "nearest_distances"]
