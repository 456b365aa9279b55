"""Model components: grouping block, NPR, encoders, projection heads and the two-tower model."""
from .image_encoder import GroupViTImageEncoder
from .model import GroupSegModel, ImageOutput, build_model
from .text_encoder import TextEncoder

__all__ = ['GroupSegModel', 'ImageOutput', 'build_model', 'GroupViTImageEncoder', 'TextEncoder']
