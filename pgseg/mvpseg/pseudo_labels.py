"""MVP-SEG+'s pseudo-labels (docs/mvpseg.md#mvp-seg): the teacher (frozen backbone + learned prompts) and the rule
that turns class scores into training targets for unlabelled pixels.

The rule, MaskCLIP+'s: a pixel with ground truth keeps it; an unlabelled pixel (an unseen class whose label was
suppressed, -1) takes the arg-max of the scores **over the unseen classes only**; ignore (255) stays ignore. Phase
1 takes the scores from the teacher, phase 2 from the student itself. The optional filters (off by default, as in
MaskCLIP+'s zero-shot configs) send an unlabelled pixel to ignore instead:

* ``confidence_threshold``: its chosen class's probability, soft-maxed over the unseen classes, is below this;
* ``presence_threshold``: its chosen class is judged absent from the crop: that class's highest probability over
  the crop's unlabelled pixels is below this (MaskCLIP+'s prompt denoising at image level).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .backbones import DenseBackbone
from .data import IGNORE, UNLABELLED
from .learner import MultiViewPrompts, PixelLogits, refined_log_probs

__all__ = ['pseudo_labels', 'fused_class_embeddings', 'Teacher']


@torch.no_grad()
def pseudo_labels(labels: torch.Tensor, scores: torch.Tensor, unseen: Sequence[int],
                  confidence_threshold: float = 0.0, presence_threshold: float = 0.0) -> torch.Tensor:
    """labels [B, H, W] (class index, -1 unlabelled, 255 ignore); scores [B, C, H, W] over all classes (logits or
    log-probabilities) -> targets [B, H, W] (class index or 255)."""
    if scores.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f'scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ in size')
    index = torch.as_tensor(list(unseen), device=scores.device, dtype=torch.long)
    probs = torch.softmax(scores.float().index_select(1, index), dim=1)  # [B, U, H, W]
    best, choice = probs.max(dim=1)
    target = index[choice]
    keep = torch.ones_like(best, dtype=torch.bool)
    unlabelled = labels == UNLABELLED
    if confidence_threshold > 0:
        keep &= best >= confidence_threshold
    if presence_threshold > 0:
        masked = probs * unlabelled[:, None]  # only the crop's unlabelled pixels count
        present = masked.flatten(2).amax(dim=2) >= presence_threshold  # [B, U]
        keep &= present.gather(1, choice.flatten(1)).view_as(choice)
    out = labels.clone()
    out[unlabelled] = torch.where(keep, target, torch.full_like(target, IGNORE))[unlabelled]
    return out


@torch.no_grad()
def fused_class_embeddings(learner: MultiViewPrompts, backbone: DenseBackbone, names: Sequence[str]) -> torch.Tensor:
    """[C, D]: per class, the sum over the segmentation views of the normalised prompt embeddings (the teacher's
    view fusion as one embedding; the global GPR prompt, index 0, is not a view)."""
    return learner.class_embeddings(backbone, list(names))[1:].sum(dim=0).float()


class Teacher:
    """The frozen MVP-SEG classifier: ``teacher(images01) -> log-probabilities [B, C, H, W]`` over ``names``, at the
    input size (fused views soft-maxed over classes, plus GPR's log presence score when ``gpr``)."""

    def __init__(self, learner: MultiViewPrompts, backbone: DenseBackbone, names: Sequence[str], gpr: bool = True):
        self.learner, self.backbone = learner.eval(), backbone.eval()
        for p in self.learner.parameters():
            p.requires_grad_(False)
        self.gpr = gpr and learner.cfg.gpr
        self.text = learner.class_embeddings(backbone, list(names)).detach()

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        logits = self.learner(self.backbone.dense_features(self.backbone.normalize(images01)), self.text)
        if not self.gpr:
            logits = PixelLogits(fused=logits.fused, presence=None)
        return refined_log_probs(logits, size=tuple(images01.shape[-2:]))
