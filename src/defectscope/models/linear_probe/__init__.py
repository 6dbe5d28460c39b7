"""Linear probe: logistic regression on a frozen backbone's pooled features (the small-data reference)."""

from defectscope.models.linear_probe.torch_model import (
    LinearProbeClassifier,
    WeldImageProbe,
    extract_features,
    fit_linear_probe,
    fit_logistic,
    train_linear_probe,
)

__all__ = ["LinearProbeClassifier", "WeldImageProbe", "extract_features", "fit_linear_probe", "fit_logistic", "train_linear_probe"]
