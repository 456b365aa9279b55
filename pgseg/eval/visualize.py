"""Pictures: label maps in the VOC palette, group-assignment maps over images (training dashboards, evaluation
grids)."""
from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ['denormalize', 'voc_palette', 'label_image', 'group_palette', 'group_map_grid']


def denormalize(images: torch.Tensor) -> np.ndarray:
    """Normalised [B, 3, H, W] -> uint8 [B, H, W, 3]. (ImageNet statistics on [0, 1] and mmseg's on [0, 255] give the
    same normalised values.)"""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    x = (images.float() * std + mean).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def voc_palette() -> list[int]:
    """The standard Pascal VOC colour map (bit-interleaved), flattened to 768 values."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def label_image(label: np.ndarray, num_classes: int) -> Image.Image:
    """Class indices [H, W] -> RGB with the VOC palette; 255 (ignore) in white."""
    palette = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3).copy()
    palette[255] = 255
    return Image.fromarray(palette[np.asarray(label).astype(np.uint8)])


def group_palette(n: int, seed: int = 3) -> np.ndarray:
    """n distinct colours [n, 3] uint8 (golden-ratio hues; stable for a given n)."""
    rng = np.random.default_rng(seed)
    colours = [colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.55 + 0.45 * rng.random(), 0.7 + 0.3 * rng.random())
               for k in range(n)]
    return (np.asarray(colours) * 255).round().astype(np.uint8)


def group_map_grid(images: torch.Tensor, group_maps: Sequence[torch.Tensor], grid: tuple[int, int],
                   alpha: float = 0.55, max_images: int = 8) -> Image.Image:
    """Rows: input, then one overlay per grouping stage (each patch coloured by the group that wins it)."""
    images = images[:max_images]
    pics = denormalize(images)
    B, H, W = pics.shape[:3]
    rows = [np.concatenate(list(pics), axis=1)]
    for maps in group_maps:
        maps = maps[:B].float()
        G = maps.shape[-1]
        winner = maps.transpose(1, 2).reshape(B, G, *grid)
        winner = F.interpolate(winner, size=(H, W), mode='bilinear', align_corners=False).argmax(1).cpu().numpy()
        colours = group_palette(G)[winner]  # [B, H, W, 3]
        overlay = (alpha * colours + (1 - alpha) * pics).astype(np.uint8)
        rows.append(np.concatenate(list(overlay), axis=1))
    return Image.fromarray(np.concatenate(rows, axis=0))
