"""pgseg: weakly-supervised open-vocabulary semantic segmentation (GroupViT and PGSeg) from image-text pairs.

Public API::

    model = pgseg.load_model(path)                 # official GroupViT / PGSeg .pth, or a pgseg checkpoint; eval mode
    tokens = pgseg.tokenize(["a photo of a cat."])  # LongTensor [N, 77]
    out = model.encode_image(images)               # .image_embeds [B, D], .group_embeds [B, G, D], .group_maps
    text = model.encode_text(tokens)               # [N, D]
    cls = model.class_embeddings(["cat", "dog"])   # [K, D], normalised
    logits = pgseg.slide_logits(model, image, cls, bg_thresh=0.95)
    losses = model.compute_losses(images, tokens)  # {"itc", "npr", ..., "loss"}
    seg = pgseg.Segmenter(model, classes=["cat", "dog"], bg_thresh=0.9)   # PIL / path in, labels out
"""
from .checkpoint import load_model, save_checkpoint
from .config import ConfigError, ModelConfig, TrainConfig, load_config, load_model_config
from .data.text import tokenize
from .eval.inference import slide_logits
from .eval.segmenter import SegmentationResult, Segmenter
from .models.groupseg import GroupSegModel, ImageOutput, build_model
from .mvpseg import PromptSegmenter, StudentSegmenter

__version__ = '0.1.0'
__all__ = ['load_model', 'save_checkpoint', 'build_model', 'tokenize', 'slide_logits', 'load_config',
           'load_model_config', 'ConfigError', 'ModelConfig', 'TrainConfig', 'GroupSegModel', 'ImageOutput',
           'Segmenter', 'PromptSegmenter', 'StudentSegmenter', 'SegmentationResult']
