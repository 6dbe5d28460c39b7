"""Models: the backbone registry and one folder per method.

Two-line API::

    from defectscope.models import create_backbone, create_model
    net = create_model("multiscale", backbone="efficientnet_lite0", num_classes=6, pretrained=True)
"""

from defectscope.models.backbones import Backbone, BackboneSpec, create_backbone, list_backbones
from defectscope.models.registry import create_model, list_models, register_model

__all__ = [
    "Backbone",
    "BackboneSpec",
    "create_backbone",
    "list_backbones",
    "create_model",
    "list_models",
    "register_model",
]
