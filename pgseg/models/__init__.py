"""Model components: grouping block, NPR, encoders, projection heads and the two-tower model."""
from .groupseg import GroupSegModel, ImageOutput, build_model
from .image_encoder import GroupViTImageEncoder
from .text_encoder import TextEncoder

__all__ = ['GroupSegModel', 'ImageOutput', 'build_model', 'GroupViTImageEncoder', 'TextEncoder']
