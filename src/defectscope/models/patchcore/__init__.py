"""PatchCore (Roth et al., CVPR 2022) on a registry backbone: the peer of Grad-MobileNet.

PatchCore has no gradient training (a memory bank of normal patch features): it is fitted by
:func:`patchcore_fit` (``fit.py``), not by a LightningModule.
"""

from defectscope.models.patchcore.fit import patchcore_fit, patchcore_score
from defectscope.models.patchcore.torch_model import PatchCore, greedy_coreset, nearest_distances

__all__ = ["PatchCore", "greedy_coreset", "nearest_distances", "patchcore_fit", "patchcore_score"]
