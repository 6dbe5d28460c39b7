"""U-Net defect segmentation (paper 004, section 2): smp U-Net, ResNet18 or EfficientNet-Lite0 encoder."""

from defectscope.models.unet.torch_model import UNET_ENCODERS, UNetSegmenter, check_input_size

__all__ = ["UNET_ENCODERS", "UNetSegmenter", "check_input_size"]
