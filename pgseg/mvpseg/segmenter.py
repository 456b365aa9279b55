"""Segmentation of any image with learned MVP-SEG prompts (``pgseg.PromptSegmenter``, ``pgseg-segment --prompts``)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..eval.segmenter import SegmentationResult, segment_image
from .inference import SlideSettings, predict_image
from .prompt_file import load_prompt_classifier

__all__ = ['PromptSegmenter']


class PromptSegmenter:
    """Segmentation with learned MVP-SEG prompts (``pgseg-prompt-train``'s ``prompts.pt``): every pixel gets one of
    ``classes`` (no background rule; name a background class such as "background" or "sky" to have one).

        seg = pgseg.PromptSegmenter("runs/mvpseg/prompts.pt", classes=["cat", "dog", "grass"])
    """

    def __init__(self, prompts: str, classes: Sequence[str], checkpoint: str | None = None,
                 device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None,
                 short_side: int | None = None, crop_size: int | None = None, stride: int | None = None):
        names = [c.strip() for c in classes if c and c.strip()]
        if not names:
            raise ValueError('PromptSegmenter needs at least one class name')
        self.device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
        learner, backbone, meta = load_prompt_classifier(prompts, checkpoint)
        self.backbone, self.learner = backbone.to(self.device), learner.to(self.device).eval()
        self.settings = SlideSettings.from_prompts(meta, short_side, crop_size, stride)
        self.class_names, self.autocast_dtype = names, autocast_dtype
        with torch.no_grad():
            self.text = self.learner.class_embeddings(self.backbone, names)

    @torch.no_grad()
    def __call__(self, image) -> SegmentationResult:
        def predict(img, size):
            return predict_image(self.backbone, self.learner, self.text, img, self.settings, self.device,
                                 self.autocast_dtype, size=size)[0]
        img, labels = segment_image(image, predict)
        return SegmentationResult.from_labels(img, labels, self.class_names)
