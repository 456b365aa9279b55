"""The training losses, one family a module; :mod:`.objective` turns a model's features into the named, weighted
terms of one training step.

- :mod:`.contrastive`: image-text InfoNCE, GroupViT's multi-label contrastive loss;
- :mod:`.prototype`: PGSeg's prototype contrastive loss with hard-region selection;
- :mod:`.grouping`: pgseg's noun grounding, noun-to-group and group-balance losses;
- :mod:`.common`: float32 inside autocast, the clamped temperature.
"""
from .common import MAX_LOGIT_SCALE, clamp_logit_scale, float32
from .contrastive import contrastive_loss, multi_label_contrastive_loss
from .grouping import group_balance_loss, group_word_loss, noun_grounding_loss
from .prototype import hrs_mask, prototype_contrastive_loss

__all__ = ['MAX_LOGIT_SCALE', 'clamp_logit_scale', 'contrastive_loss', 'multi_label_contrastive_loss',
           'group_balance_loss', 'group_word_loss', 'hrs_mask', 'prototype_contrastive_loss', 'noun_grounding_loss',
           'float32']
