"""Box heads of paper 002 (single- and multi-defect) and our set-prediction slots; a torchvision FCOS reference."""

from defectscope.models.box_heads.fcos import LiteFCOS
from defectscope.models.box_heads.losses import SetCriterion, hungarian_match, padded_slot_loss, single_loss
from defectscope.models.box_heads.torch_model import SlotDetector

__all__ = ["LiteFCOS", "SetCriterion", "SlotDetector", "hungarian_match", "padded_slot_loss", "single_loss"]
