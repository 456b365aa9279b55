"""Zero-shot segmentation scoring: the official per-crop rule and mmseg's sliding-window inference
(docs/fidelity.md#test-time-resize-and-sliding-windows, docs/fidelity.md#per-crop-scoring), with one encoder pass
per crop and the windows batched."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..losses import clamp_logit_scale

__all__ = ['window_slices', 'slide_windows', 'rgb_array', 'channel_argmax', 'group_class_affinity', 'crop_assignment',
           'winning_group_scores', 'background_threshold', 'crop_logits', 'slide_logits', 'rescale_image',
           'preprocess_image', 'predict_labels', 'pamr']


def window_slices(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """mmseg's windows along one axis: n = max(size - crop + stride - 1, 0) // stride + 1, the last flush right."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(n):
        end = min(i * stride + crop, size)
        out.append((max(end - crop, 0), end))
    return out


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The windows ((y0, y1), (x0, x1)) of mmseg's slide inference, row by row."""
    return [(ys, xs) for ys in window_slices(height, crop, stride) for xs in window_slices(width, crop, stride)]


def channel_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=1)`` for [B, C, H, W] with few channels, as C contiguous passes (a running maximum, the first
    index winning ties, as argmax): 5-10x faster on the CPU than argmax along the strided channel axis."""
    if x.shape[1] > 64 or not x.is_floating_point():
        return x.argmax(dim=1)
    best, index = x[:, 0].clone(), torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.long, device=x.device)
    for c in range(1, x.shape[1]):
        better = x[:, c] > best
        best = torch.where(better, x[:, c], best)
        index.masked_fill_(better, c)
    return index


@torch.no_grad()
def group_class_affinity(group_embeds: torch.Tensor, image_embeds: torch.Tensor, class_embeds: torch.Tensor,
                         log_scale: torch.Tensor, topk: int = 5) -> torch.Tensor:
    """Official group-to-class affinity F [B, G, K].

    softmax over classes of the scaled group-class cosine, restricted to the image's top-k classes (by the pooled
    embedding) and softmaxed again, times the unrestricted softmax ("double-softmax product").
    group_embeds: [B, G, D], image_embeds: [B, D], class_embeds: [K, D] (normalised).
    """
    scale = clamp_logit_scale(log_scale.float())
    cls = class_embeds.float()
    logits = scale * F.normalize(group_embeds.float(), dim=-1) @ cls.t()  # [B, G, K]
    image_probs = (scale * F.normalize(image_embeds.float(), dim=-1) @ cls.t()).softmax(dim=-1)  # [B, K]
    top = image_probs.topk(min(topk, cls.shape[0]), dim=-1).indices
    keep = torch.zeros_like(image_probs, dtype=torch.bool).scatter_(1, top, True)
    restricted = logits.masked_fill(~keep.unsqueeze(1), float('-inf')).softmax(dim=-1)
    return restricted * logits.softmax(dim=-1)


@torch.no_grad()
def crop_assignment(model, crops: torch.Tensor, class_embeds: torch.Tensor,
                    upsample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One encoder pass over same-sized crops [B, 3, h, w] -> (the final groups' soft assignment composed over stages
    [B, G, h, w], upsampled bilinearly to the crop; with ``upsample=False`` at the patch grid [B, G, gh, gw]; the
    group-class affinity [B, G, K] in float32)."""
    out = model.encode_image(crops)
    B, _, h, w = crops.shape
    gh, gw = out.grid
    maps = out.group_maps[-1].transpose(1, 2).reshape(B, -1, gh, gw)  # [B, G, gh, gw]
    maps = maps.to(torch.promote_types(maps.dtype, torch.float32))  # float32 (float64 for a float64 model)
    if upsample:
        maps = F.interpolate(maps, size=(h, w), mode='bilinear', align_corners=False)
    affinity = group_class_affinity(out.group_embeds, out.image_embeds, class_embeds, model.logit_scale)  # [B,G,K]
    return maps, affinity


def winning_group_scores(maps: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """The per-crop rule: each pixel takes the group that wins its soft assignment and that group's class
    affinities. maps: [B, G, h, w], affinity: [B, G, K] -> [B, K, h, w]."""
    B, G, h, w = maps.shape
    winner = channel_argmax(maps)  # [B, h, w]
    # per pixel, the affinity row of its winning group: one-hot [B, G, hw] x affinity [B, G, K] -> [B, K, h, w]
    # (exact: each sum has one nonzero term; written contiguously, unlike a gather with an expanded index)
    one_hot = F.one_hot(winner.reshape(B, -1), G).to(affinity.dtype)  # [B, hw, G]
    return torch.bmm(affinity.transpose(1, 2), one_hot.transpose(1, 2)).reshape(B, -1, h, w)


def background_threshold(affinity: torch.Tensor, bg_thresh: float) -> torch.Tensor:
    """Per crop, min(bg_thresh, max affinity) [B]: a pixel whose best class scores below it is background."""
    return affinity.flatten(1).amax(dim=1).clamp(max=bg_thresh)


@torch.no_grad()
def crop_logits(model, crops: torch.Tensor, class_embeds: torch.Tensor, bg_thresh: float = 0.95,
                with_background: bool = True, bg_constant: bool = False, window_pamr: bool = False) -> torch.Tensor:
    """Scores of same-sized crops [B, 3, h, w] -> [B, (1 +) K, h, w], one encoder pass.

    Each pixel takes the final group that wins its bilinearly upsampled soft assignment (composed over stages) and
    that group's class affinities. With ``window_pamr`` (the 8-benchmark protocol with PAMR), the rule runs at the
    patch grid instead, the grid's scores are refined by PAMR against the crop downsampled to the grid (bilinear,
    corners aligned), then upsampled bilinearly to the crop. Background (channel 0) is 1 where the best class score
    is below min(bg_thresh, max affinity of the crop), else 0; with ``bg_constant`` it is the constant ``bg_thresh``.
    """
    B, _, h, w = crops.shape
    maps, affinity = crop_assignment(model, crops, class_embeds, upsample=not window_pamr)
    fg = winning_group_scores(maps, affinity)
    if window_pamr:
        image = F.interpolate(crops.float(), size=fg.shape[-2:], mode='bilinear', align_corners=True)
        fg = F.interpolate(pamr(image, fg), size=(h, w), mode='bilinear', align_corners=False)
    if not with_background:
        return fg
    if bg_constant:
        return torch.cat([torch.full_like(fg[:, :1], bg_thresh), fg], dim=1)
    bg = (fg.amax(dim=1) < background_threshold(affinity, bg_thresh).view(B, 1, 1)).to(fg.dtype)
    return torch.cat([bg.unsqueeze(1), fg], dim=1)


@torch.no_grad()
def slide_logits(model, image: torch.Tensor, class_embeds: torch.Tensor, bg_thresh: float = 0.95,
                 with_background: bool = True, crop_size: int = 448, stride: int = 224,
                 crops_per_batch: int = 8, bg_constant: bool = False, window_pamr: bool = False) -> torch.Tensor:
    """Sliding-window scores of normalised images [B, 3, H, W] -> [B, (1 +) K, H, W] (before any rescale).

    Windows of ``crop_size`` with ``stride`` as mmseg's slide inference; each window's scores (:func:`crop_logits`)
    are summed into place and divided by the per-pixel window count.
    """
    if image.ndim != 4:
        raise ValueError(f'slide_logits expects images [B, 3, H, W], got shape {tuple(image.shape)}')
    B, _, H, W = image.shape
    windows = slide_windows(H, W, crop_size, stride)
    num_classes = class_embeds.shape[0] + int(with_background)
    class_embeds = class_embeds.to(image.device)
    preds = image.new_zeros(B, num_classes, H, W, dtype=torch.float32)
    count = image.new_zeros(1, 1, H, W, dtype=torch.float32)
    for (y0, y1), (x0, x1) in windows:
        count[..., y0:y1, x0:x1] += 1
    for b in range(B):
        for i in range(0, len(windows), crops_per_batch):
            chunk = windows[i:i + crops_per_batch]
            crops = torch.stack([image[b, :, y0:y1, x0:x1] for (y0, y1), (x0, x1) in chunk])
            scores = crop_logits(model, crops, class_embeds, bg_thresh, with_background, bg_constant,
                                 window_pamr).float()
            for s, ((y0, y1), (x0, x1)) in zip(scores, chunk):
                preds[b, :, y0:y1, x0:x1] += s
    return preds / count


MMSEG_MEAN = (123.675, 116.28, 103.53)
MMSEG_STD = (58.395, 57.12, 57.375)


def rgb_array(image) -> np.ndarray:
    """A PIL image (any mode) or an RGB array [H, W, 3] -> uint8 RGB array [H, W, 3]."""
    return np.asarray(image.convert('RGB') if hasattr(image, 'convert') else image)


def rescale_image(image, short_side: int = 448, long_side: int = 2048) -> torch.Tensor:
    """RGB PIL image or uint8 [H, W, 3] -> float [1, 3, h, w] in 0..255, resized as mmcv's ``imrescale``: scale =
    min(long_side / long edge, short_side / short edge), sizes rounded, bilinear without antialiasing, back to uint8."""
    arr = rgb_array(image)
    h, w = arr.shape[:2]
    scale = min(long_side / max(h, w), short_side / min(h, w))
    size = (int(h * scale + 0.5), int(w * scale + 0.5))
    x = torch.from_numpy(np.array(arr)).permute(2, 0, 1)[None].float()
    if size != (h, w):
        x = F.interpolate(x, size=size, mode='bilinear', align_corners=False).round().clamp(0, 255)
    return x


def preprocess_image(image, short_side: int = 448, long_side: int = 2048) -> torch.Tensor:
    """:func:`rescale_image`, then mmseg's normalisation -> [1, 3, h, w]."""
    x = rescale_image(image, short_side, long_side)
    mean = torch.tensor(MMSEG_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(MMSEG_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def predict_labels(model, image, class_embeds: torch.Tensor, bg_thresh: float | None, with_background: bool,
                   protocol, device: torch.device | str = 'cpu', autocast_dtype: torch.dtype | None = None,
                   bg_constant: bool = False, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image -> (labels [H, W] at the original size, scores [C, H, W] at the original size).

    Resize (protocol.short_side), sliding windows, bilinear resize of the averaged scores to the original size (or
    to ``size`` (H, W): the full size of an image decoded reduced), argmax (the official softmax before the argmax
    changes nothing). PAMR as the protocol places it: inside each window on the patch grid (``'window'``, the
    8-benchmark code's), or once on the full-size scores against the original image (``'image'``).
    """
    arr = rgb_array(image)
    x = preprocess_image(arr, protocol.short_side, protocol.long_side).to(device)
    with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        logits = slide_logits(model, x, class_embeds, bg_thresh=bg_thresh if bg_thresh is not None else 0.0,
                              with_background=with_background, crop_size=protocol.crop_size,
                              stride=protocol.stride, bg_constant=bg_constant,
                              window_pamr=protocol.pamr == 'window')
    size = tuple(size or arr.shape[:2])
    logits = F.interpolate(logits.float(), size=size, mode='bilinear', align_corners=False)
    if protocol.pamr == 'image':
        rgb = torch.from_numpy(np.array(arr)).permute(2, 0, 1)[None].float().to(logits.device)
        if rgb.shape[-2:] != size:
            rgb = F.interpolate(rgb, size=size, mode='bilinear', align_corners=False)
        logits = pamr(rgb, logits)
    return channel_argmax(logits)[0], logits[0]


@torch.no_grad()
def pamr(image: torch.Tensor, masks: torch.Tensor, dilations=(1, 2, 4, 8, 12, 24), num_iters: int = 10) -> torch.Tensor:
    """Pixel-adaptive mask refinement (Araslanov & Roth, 2020): masks are repeatedly averaged over the 8
    neighbours at several dilations, weighted by a softmax of the neighbours' colour similarity.

    The colour spread that scales the similarity is one standard deviation (unbiased, per colour channel) over the
    full 3x3 neighbourhoods of all dilations together, the centre pixel included once per dilation (9 values per
    dilation), as the reference PAMR; the similarity and the averaging use the 8 neighbours only. Borders are padded
    by replication.
    image: [B, 3, H, W] (any scale), masks: [B, C, H, W] -> refined masks [B, C, H, W]."""
    def neighbours(x: torch.Tensor, centre: bool = False) -> torch.Tensor:  # [B, C, H, W] -> [B, C, K, H, W]
        H, W = x.shape[-2:]
        out = []
        for d in dilations:
            padded = F.pad(x, (d, d, d, d), mode='replicate')
            for dy in (-d, 0, d):
                for dx in (-d, 0, d):
                    if dy or dx or centre:
                        out.append(padded[..., d + dy:d + dy + H, d + dx:d + dx + W])
        return torch.stack(out, dim=2)

    img = image.float()
    std = neighbours(img, centre=True).std(dim=2, keepdim=True)  # [B, 3, 1, H, W]
    affinity = -(neighbours(img) - img.unsqueeze(2)).abs() / (1e-8 + 0.1 * std)
    weights = affinity.mean(dim=1, keepdim=True).softmax(dim=2)  # [B, 1, K, H, W]
    out = masks.float()
    for _ in range(num_iters):
        out = (neighbours(out) * weights).sum(dim=2)
    return out
