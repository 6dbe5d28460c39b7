"""Multi-CNN feature fusion (paper 003): partial freezing, feature fusion, late fusion, feature cache."""

from defectscope.models.multicnn.feature_cache import FeatureCache, data_fingerprint, model_fingerprint
from defectscope.models.multicnn.freezing import FreezeInfo, count_units, freeze_all, freeze_first
from defectscope.models.multicnn.torch_model import FeatureFusionClassifier, late_fusion, resize_to

__all__ = ["FeatureCache", "FeatureFusionClassifier", "FreezeInfo", "count_units", "data_fingerprint", "freeze_all",
           "freeze_first", "late_fusion", "model_fingerprint", "resize_to"]
