"""PatchCore (Roth et al., CVPR 2022) on the anomaly-model contract (:mod:`defectscope.models.anomaly`).

No gradient training: :meth:`PatchCore.fit` fills the memory bank from normal images.
"""

from defectscope.models.patchcore.torch_model import (
    PatchCore,
    PatchCoreArgs,
    greedy_coreset,
    nearest_distances,
    reweighted_score,
)

__all__ = ["PatchCore", "PatchCoreArgs", "greedy_coreset", "nearest_distances", "reweighted_score"]
