"""PaDiM (Defard et al., 2020) on the anomaly-model contract (:mod:`defectscope.models.anomaly`)."""

from defectscope.models.padim.torch_model import PaDiM, PaDiMArgs, ledoit_wolf

__all__ = ["PaDiM", "PaDiMArgs", "ledoit_wolf"]
