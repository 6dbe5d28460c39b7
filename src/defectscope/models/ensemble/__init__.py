"""An ensemble of anomaly models with calibration-standardised scores and maps, on the anomaly-model contract."""

from defectscope.models.ensemble.torch_model import Ensemble, EnsembleArgs

__all__ = ["Ensemble", "EnsembleArgs"]
