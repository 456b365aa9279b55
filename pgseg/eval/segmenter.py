"""Segment any image with free-text class names: the ``Segmenter`` API behind ``pgseg-segment``.

    seg = pgseg.Segmenter(model, classes=["cat", "dog", "sofa"], bg_thresh=0.9)
    result = seg("photo.jpg")          # path, PIL image or uint8 array
    result.labels                      # [H, W] int: 0 background, k = classes[k - 1]
    result.areas                       # {"cat": 0.21, ...} fraction of the image
    result.overlay().save("photo_seg.png")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from ..data.transforms import to_rgb
from .inference import predict_labels
from .protocols import Protocol, get_protocol
from .templates import get_templates
from .visualize import voc_palette

__all__ = ['Segmenter', 'SegmentationResult', 'load_any_image', 'upright_size', 'segment_image']


def load_any_image(source, draft: bool = True) -> Image.Image:
    """A path, PIL image or uint8 array -> RGB PIL image, upright (EXIF orientation applied), 8-bit.

    With ``draft``, large JPEGs are decoded in draft mode at no less than twice the inference resolution (a reduced
    image: :func:`segment_image` still answers at the full size)."""
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray):
        img = Image.fromarray(source)
    else:
        img = Image.open(source)
        if draft and img.format == 'JPEG' and min(img.size) > 2048:
            img.draft('RGB', (img.width * 1024 // min(img.size), img.height * 1024 // min(img.size)))
    img = ImageOps.exif_transpose(img) or img
    return to_rgb(img)


def upright_size(source) -> tuple[int, int]:
    """(width, height) of the image ``source`` as it is shown: EXIF-upright, at its full size (read from the header
    for a file)."""
    if isinstance(source, np.ndarray):
        return source.shape[1], source.shape[0]
    img = source if isinstance(source, Image.Image) else Image.open(source)
    width, height = img.size
    if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # orientations that turn the image by 90 degrees
        width, height = height, width
    return width, height


def segment_image(source, predict) -> tuple[Image.Image, torch.Tensor]:
    """``predict(image, size)`` on the decoded ``source`` -> (the full-size upright image, labels [H, W] at that
    size): outputs are at the input image's own size whatever the decode (a large JPEG is read reduced)."""
    img = load_any_image(source)
    width, height = upright_size(source)
    labels = predict(img, (height, width))
    if img.size != (width, height):
        img = load_any_image(source, draft=False)
    return img, labels


@dataclass
class SegmentationResult:
    image: Image.Image
    labels: np.ndarray  # [H, W] int64: 0 = background (when used), k = class_names[k]
    class_names: list[str]  # index -> name ('background' first when a background is predicted)
    areas: dict[str, float] = field(default_factory=dict)  # fraction of pixels per present class

    @classmethod
    def from_labels(cls, image: Image.Image, labels: torch.Tensor, class_names: list[str]) -> SegmentationResult:
        """The result of a label map [H, W] over ``class_names``, with each present class's share of the pixels."""
        labels = labels.cpu().numpy()
        counts = np.bincount(labels.ravel(), minlength=len(class_names))
        areas = {n: float(c) / labels.size for n, c in zip(class_names, counts) if c > 0}
        return cls(image=image, labels=labels, class_names=class_names, areas=areas)

    def label_png(self) -> Image.Image:
        png = Image.fromarray(self.labels.astype(np.uint8), mode='P')
        png.putpalette(voc_palette())
        return png

    def overlay(self, alpha: float = 0.55) -> Image.Image:
        """The image with each class coloured and its name written at the centre of its largest area."""
        palette = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)
        base = np.asarray(self.image, dtype=np.float32)
        colour = palette[self.labels.astype(np.uint8)].astype(np.float32)
        mask = (self.labels > 0)[..., None] if self.class_names[0] == 'background' else np.ones_like(base[..., :1])
        out = Image.fromarray((base * (1 - alpha * mask) + colour * alpha * mask).astype(np.uint8))
        draw = ImageDraw.Draw(out)
        for k, name in enumerate(self.class_names):
            if name == 'background' or not (self.labels == k).any():
                continue
            ys, xs = np.nonzero(self.labels == k)
            x, y = int(np.median(xs)), int(np.median(ys))
            box = draw.textbbox((x, y), name)
            draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
            draw.text((x, y), name, fill=(255, 255, 255))
        return out


class Segmenter:
    """Zero-shot segmentation of arbitrary images with the official per-crop rule (``pgseg.slide_logits``).

    ``bg_thresh=None`` segments without a background class (every pixel gets one of ``classes``).
    """

    def __init__(self, model, classes: Sequence[str], bg_thresh: float | None = 0.9, templates: str = 'simple',
                 protocol: Protocol | str = 'pgseg', device: torch.device | str | None = None,
                 autocast_dtype: torch.dtype | None = None):
        names = [c.strip() for c in classes if c and c.strip()]
        if not names:
            raise ValueError('Segmenter needs at least one class name')
        self.model = model.eval()
        self.device = device or next(model.parameters()).device
        self.protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
        self.bg_thresh, self.autocast_dtype = bg_thresh, autocast_dtype
        self.class_names = (['background'] if bg_thresh is not None else []) + names
        self.class_embeds = model.class_embeddings(names, get_templates(templates)).to(self.device)

    @torch.no_grad()
    def __call__(self, image) -> SegmentationResult:
        def predict(img, size):
            return predict_labels(self.model, img, self.class_embeds, self.bg_thresh, self.bg_thresh is not None,
                                  self.protocol, self.device, self.autocast_dtype, size=size)[0]
        img, labels = segment_image(image, predict)
        return SegmentationResult.from_labels(img, labels, self.class_names)
