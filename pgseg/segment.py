"""Segment any image with free-text class names: the ``Segmenter`` API and the ``pgseg-segment`` command.

    seg = pgseg.Segmenter(model, classes=["cat", "dog", "sofa"], bg_thresh=0.9)
    result = seg("photo.jpg")          # path, PIL image or uint8 array
    result.labels                      # [H, W] int: 0 background, k = classes[k - 1]
    result.areas                       # {"cat": 0.21, ...} fraction of the image
    result.overlay().save("photo_seg.png")

    pgseg-segment photo.jpg other.png --classes "cat,dog,sofa" --checkpoint X --out runs/segment
    pgseg-segment photo.jpg --classes "cat,dog,grass" --prompts runs/mvpseg/prompts.pt    # learned MVP-SEG prompts
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from .data.synthetic_writers import voc_palette
from .data.transforms import to_rgb
from .eval.inference import predict_labels
from .eval.protocols import Protocol, get_protocol
from .precision import bf16_flag_dtype
from .prompts import get_templates

__all__ = ['Segmenter', 'PromptSegmenter', 'SegmentationResult', 'load_any_image', 'main']

def load_any_image(source) -> Image.Image:
    """A path, PIL image or uint8 array -> RGB PIL image, upright (EXIF orientation applied), 8-bit.

    Large JPEGs are decoded in draft mode at no less than twice the inference resolution."""
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray):
        img = Image.fromarray(source)
    else:
        img = Image.open(source)
        if img.format == 'JPEG' and min(img.size) > 2048:
            img.draft('RGB', (img.width * 1024 // min(img.size), img.height * 1024 // min(img.size)))
    img = ImageOps.exif_transpose(img) or img
    return to_rgb(img)


@dataclass
class SegmentationResult:
    image: Image.Image
    labels: np.ndarray  # [H, W] int64: 0 = background (when used), k = class_names[k]
    class_names: list[str]  # index -> name ('background' first when a background is predicted)
    areas: dict[str, float] = field(default_factory=dict)  # fraction of pixels per present class

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
        img = load_any_image(image)
        labels, _ = predict_labels(self.model, img, self.class_embeds, self.bg_thresh, self.bg_thresh is not None,
                                   self.protocol, self.device, self.autocast_dtype)
        labels = labels.cpu().numpy()
        counts = np.bincount(labels.ravel(), minlength=len(self.class_names))
        areas = {n: float(c) / labels.size for n, c in zip(self.class_names, counts) if c > 0}
        return SegmentationResult(image=img, labels=labels, class_names=self.class_names, areas=areas)


class PromptSegmenter:
    """Segmentation with learned MVP-SEG prompts (``pgseg-prompt-train``'s ``prompts.pt``): every pixel gets one of
    ``classes`` (no background rule; name a background class such as "background" or "sky" to have one).

        seg = pgseg.PromptSegmenter("runs/mvpseg/prompts.pt", classes=["cat", "dog", "grass"])
    """

    def __init__(self, prompts: str, classes: Sequence[str], checkpoint: str | None = None,
                 device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None,
                 short_side: int | None = None, crop_size: int | None = None, stride: int | None = None):
        from .mvpseg.inference import SlideSettings
        from .mvpseg.prompt_file import load_prompts
        names = [c.strip() for c in classes if c and c.strip()]
        if not names:
            raise ValueError('PromptSegmenter needs at least one class name')
        backbone = None
        if checkpoint:
            from .checkpoint import load_model
            from .mvpseg.backbones import GroupSegDenseBackbone
            backbone = GroupSegDenseBackbone(load_model(checkpoint))
        self.device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
        learner, backbone, meta = load_prompts(prompts, backbone)
        self.backbone, self.learner = backbone.to(self.device), learner.to(self.device).eval()
        self.settings = SlideSettings.from_prompts(meta, short_side, crop_size, stride)
        self.class_names, self.autocast_dtype = names, autocast_dtype
        with torch.no_grad():
            self.text = self.learner.class_embeddings(self.backbone, names)

    @torch.no_grad()
    def __call__(self, image) -> SegmentationResult:
        from .mvpseg.inference import predict_image
        img = load_any_image(image)
        labels, _ = predict_image(self.backbone, self.learner, self.text, img, self.settings, self.device,
                                  self.autocast_dtype)
        labels = labels.cpu().numpy()
        counts = np.bincount(labels.ravel(), minlength=len(self.class_names))
        areas = {n: float(c) / labels.size for n, c in zip(self.class_names, counts) if c > 0}
        return SegmentationResult(image=img, labels=labels, class_names=self.class_names, areas=areas)


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError, load_model

    parser = argparse.ArgumentParser(prog='pgseg-segment', description='Segment images with free-text class names. '
                                     'Writes <name>_overlay.png, <name>_labels.png (palette PNG: 0 background, '
                                     'k = k-th class) and <name>_areas.json per image.')
    parser.add_argument('images', nargs='+', help='image files (any format Pillow opens)')
    parser.add_argument('--classes', required=True, help='comma-separated class names, e.g. "cat,dog,sofa"')
    parser.add_argument('--checkpoint', default=None, help='pgseg checkpoint directory or official .pth')
    parser.add_argument('--prompts', default=None, help='learned MVP-SEG prompts (pgseg-prompt-train): every pixel '
                        'gets one of --classes, no background rule; --checkpoint, if given, is the pgseg backbone')
    parser.add_argument('--out', default='runs/segment', help='output folder')
    parser.add_argument('--bg-thresh', type=float, default=0.9,
                        help='background threshold (official rule); negative: no background class')
    parser.add_argument('--templates', default='simple', help='prompt templates: simple, subset, full')
    parser.add_argument('--bf16', action='store_true', help='bf16 autocast')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    Image.MAX_IMAGE_PIXELS = 400_000_000  # large photos are legitimate input here: they are resized for inference
    if not args.checkpoint and not args.prompts:
        parser.error('give --checkpoint (zero-shot rule) or --prompts (learned MVP-SEG prompts)')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dtype = bf16_flag_dtype(args.bf16, device)
    try:
        if args.prompts:
            segmenter = PromptSegmenter(args.prompts, args.classes.split(','), args.checkpoint, device, dtype)
        else:
            segmenter = Segmenter(load_model(args.checkpoint).to(device), args.classes.split(','),
                                  bg_thresh=None if args.bg_thresh < 0 else args.bg_thresh, templates=args.templates,
                                  autocast_dtype=dtype)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f'pgseg-segment: error: {exc}', file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    failed = 0
    for path in args.images:
        name = os.path.splitext(os.path.basename(path))[0]
        try:
            result = segmenter(path)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            failed += 1
            print(f'pgseg-segment: cannot read {path}: {exc}', file=sys.stderr)
            continue
        result.overlay().save(os.path.join(args.out, f'{name}_overlay.png'))
        result.label_png().save(os.path.join(args.out, f'{name}_labels.png'))
        with open(os.path.join(args.out, f'{name}_areas.json'), 'w') as f:
            json.dump({'image': path, 'size': list(result.image.size), 'classes': result.class_names,
                       'areas': result.areas}, f, indent=1)
        summary = ', '.join(f'{k} {100 * v:.1f}%' for k, v in sorted(result.areas.items(), key=lambda kv: -kv[1]))
        print(f'{path}: {summary}')
    return 1 if failed == len(args.images) else 0


if __name__ == '__main__':
    sys.exit(main())
