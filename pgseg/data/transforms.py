"""Image decoding and training augmentation (docs/fidelity.md#image-augmentation).

``official_pgseg``: RandomResizedCrop(224, scale 0.08-1, ratio 3/4-4/3, bilinear), horizontal flip 0.5, ImageNet
normalisation. The crop box is drawn from the header's size *before* decoding, so JPEGs decode in draft mode at the
smallest 1/2^k scale that still gives the crop its full output resolution (the box snapped to the reduced image's
pixels: within half of one of them): nearly the same pixels out, less decode and resize work. The crop is
then resized as torchvision crops and resizes a PIL image, by :func:`resize_uint8` (torch's uint8 antialiased
bilinear kernel: within 2 grey levels of Pillow's, and faster: docs/performance.md#the-data-workers-resize).
``official_groupvit``: timm's ``create_transform`` with GroupViT's RandAugment recipe and random erasing.
Every image Pillow can open is turned into RGB correctly (grayscale, palette, alpha, CMYK, 16-bit).
"""
from __future__ import annotations

import io
import math
import random
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image

__all__ = ['IMAGENET_MEAN', 'IMAGENET_STD', 'to_rgb', 'open_image', 'TrainTransform', 'build_train_transform',
           'normalize_tensor', 'normalize_batch', 'uint8_tensor', 'resize_uint8', 'sample_crop_box']

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Augment = Literal['official_pgseg', 'official_groupvit', 'none']


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image -> 8-bit RGB: 16/32-bit grayscale is rescaled (not clipped), alpha is composited on white."""
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith('I;16') else max(float(arr.max()), 1.0)
        return Image.fromarray(np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8), 'L').convert('RGB')
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return img.convert('RGB') if img.mode != 'RGB' else img


def open_image(data: bytes) -> Image.Image:
    """Open image bytes lazily (header only). Raises ``ValueError`` for empty or zero-size images."""
    if not data:
        raise ValueError('empty image file')
    img = Image.open(io.BytesIO(data))
    if img.width == 0 or img.height == 0:
        raise ValueError(f'zero-size image {img.size}')
    return img


def sample_crop_box(width: int, height: int, rng: random.Random, scale=(0.08, 1.0),
                    ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, w, h), drawn as torchvision draws it (10 tries, then a centre crop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


_NORM_SCALE = (1.0 / (255.0 * np.asarray(IMAGENET_STD))).astype(np.float32)
_NORM_SHIFT = (np.asarray(IMAGENET_MEAN) / np.asarray(IMAGENET_STD)).astype(np.float32)


def uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W] (what data workers return: a quarter of float32's bytes between processes;
    :func:`normalize_batch` finishes the job on the training device)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


def resize_uint8(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, size[0], size[1]] resized by antialiased bilinear interpolation, as
    ``img.resize((size[1], size[0]), Image.BILINEAR)`` computes it (within 2 grey levels: both round fixed-point
    sums, differently). torch's uint8 kernel for channels-last images (the one torchvision's v2 transforms use) is
    faster than Pillow's in a single-threaded data worker (``scripts/benchmark.py data``;
    docs/performance.md#the-data-workers-resize)."""
    hwc = torch.from_numpy(np.array(img, dtype=np.uint8))  # a writable copy [H, W, 3]
    out = torch.nn.functional.interpolate(hwc.permute(2, 0, 1)[None], size=size, mode='bilinear', antialias=True,
                                          align_corners=False)  # a channels-last view in, channels-last out
    return out[0].contiguous()


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """A batch from the loader -> ImageNet-normalised float [B, 3, H, W]. uint8 batches (``official_pgseg``, ``none``)
    are normalised here, on whatever device they are on; float batches (timm's ``official_groupvit``) already are."""
    if images.dtype != torch.uint8:
        return images
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255.0
    return (images.float() - mean) / std


def normalize_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ImageNet-normalised float [3, H, W]: ``TF.normalize(TF.to_tensor(img), mean, std)`` in one
    numpy pass (about 20x faster in a data worker, where torch runs single-threaded on small tensors)."""
    arr = np.asarray(img, dtype=np.float32) * _NORM_SCALE - _NORM_SHIFT  # [H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class TrainTransform:
    """bytes -> [3, size, size] tensor: uint8 for ``official_pgseg`` and ``none`` (normalised later on the device by
    :func:`normalize_batch`), normalised float for timm's ``official_groupvit``. ``rng`` drives every random choice
    (exact resume)."""

    def __init__(self, size: int = 224, augment: Augment = 'official_pgseg', scale=(0.08, 1.0),
                 use_draft: bool = True):
        self.size, self.augment, self.scale, self.use_draft = size, augment, tuple(scale), use_draft
        self._timm: Callable | None = None
        if augment == 'official_groupvit':
            from timm.data import create_transform
            self._timm = create_transform(size, is_training=True, scale=self.scale, ratio=(3 / 4, 4 / 3),
                                          hflip=0.5, color_jitter=0.4, auto_augment='rand-m9-mstd0.5-inc1',
                                          interpolation='bilinear', re_prob=0.25, re_mode='pixel', re_count=1,
                                          mean=IMAGENET_MEAN, std=IMAGENET_STD)
        elif augment not in ('official_pgseg', 'none'):
            raise ValueError(f"augment must be 'official_pgseg', 'official_groupvit' or 'none', got {augment!r}")

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        img = open_image(data)
        if self.augment == 'none':
            if self.use_draft and img.format == 'JPEG' and min(img.size) >= 2 * self.size:
                img.draft('RGB', (self.size, self.size))  # DCT-domain reduction, never below the output size
            return resize_uint8(to_rgb(img), (self.size, self.size))
        if self._timm is not None:
            # timm's transforms draw from the global RNGs (random, numpy, torch): seed them from this sample's rng
            # so that exact resume holds. torch.default_generator, not torch.manual_seed, which would also seed
            # (and on a CUDA build trace the stack for) every GPU generator, a cost on every sample
            # (docs/performance.md#earlier-changes).
            seed = rng.getrandbits(62)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.default_generator.manual_seed(seed)
            return self._timm(to_rgb(img))
        left, top, w, h = sample_crop_box(img.width, img.height, rng, self.scale)
        if self.use_draft and img.format == 'JPEG' and min(w, h) >= 2 * self.size:
            full = img.size
            # the largest reduction that keeps the crop at least `size` pixels on each side
            img.draft('RGB', (math.ceil(full[0] * self.size / w), math.ceil(full[1] * self.size / h)))
            # the same box on the reduced image, snapped to its pixels (a 1/2^k reduction moves it <= 2^(k-1) pixels)
            sx, sy = img.size[0] / full[0], img.size[1] / full[1]
            left, top = round(left * sx), round(top * sy)
            w, h = min(round(w * sx), img.size[0] - left), min(round(h * sy), img.size[1] - top)
        out = resize_uint8(to_rgb(img).crop((left, top, left + w, top + h)), (self.size, self.size))
        if rng.random() < 0.5:
            out = out.flip(-1)
        return out


def build_train_transform(size: int, augment: Augment, scale=(0.08, 1.0)) -> TrainTransform:
    return TrainTransform(size=size, augment=augment, scale=scale)
