"""Segmentation of any image with learned MVP-SEG prompts (``pgseg.PromptSegmenter``, ``pgseg-segment --prompts``)
or an MVP-SEG+ student (``pgseg.StudentSegmenter``, ``pgseg-segment --student``)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..eval.segmenter import SegmentationResult, segment_image
from .inference import SlideSettings, predict_image, predict_student
from .prompt_file import load_prompt_classifier
from .student import load_student, retarget_student

__all__ = ['PromptSegmenter', 'StudentSegmenter']


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


class StudentSegmenter:
    """Segmentation with an MVP-SEG+ student (``pgseg-transfer``'s ``student.pt`` or its run directory): every pixel
    gets one of ``classes``; names the student was not trained on are embedded with its teacher's prompts (the file
    it was trained from, or ``prompts``).

        seg = pgseg.StudentSegmenter("runs/mvpseg_plus/student.pt", classes=["cat", "dog", "grass"])
    """

    def __init__(self, student: str, classes: Sequence[str], checkpoint: str | None = None,
                 device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None,
                 short_side: int | None = None, prompts: str | None = None):
        names = [c.strip() for c in classes if c and c.strip()]
        if not names:
            raise ValueError('StudentSegmenter needs at least one class name')
        self.device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
        model, meta = load_student(student)
        self.student = retarget_student(model, meta, names, checkpoint, prompts).to(self.device).eval()
        self.short_side = short_side or meta.get('eval', {}).get('short_side', 512)
        self.long_side = meta.get('eval', {}).get('long_side', 2048)
        self.class_names, self.autocast_dtype = names, autocast_dtype

    @torch.no_grad()
    def __call__(self, image) -> SegmentationResult:
        def predict(img, size):
            return predict_student(self.student, img, self.short_side, self.long_side, self.device,
                                   self.autocast_dtype, size=size)[0]
        img, labels = segment_image(image, predict)
        return SegmentationResult.from_labels(img, labels, self.class_names)
