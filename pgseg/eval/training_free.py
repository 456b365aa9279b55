"""Training-free CLIP segmentation under the same evaluator: an open_clip ViT's dense features under one of the
training-free rules (MaskCLIP, SCLIP, ClearCLIP, NACLIP: ``ClipDenseBackbone(dense=...)``), scored with the SCLIP
family's protocol (docs/protocols.md#training-free-clip-methods).

Per image: mmcv-style resize (short side per dataset, long side at most 2048), CLIP normalisation, sliding windows
(224, stride 112); in each window the cosine of every pixel feature with every text query, upsampled bilinearly to
the window; the windows averaged; bilinear resize to the original size; times the dataset's logit scale; softmax
over all queries; each class the best of its queries; optionally an area threshold (classes covering at most that
share of the non-background prediction are dropped); argmax; pixels whose best probability is below the dataset's
probability threshold become class 0 (background).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..runtime.distributed import all_reduce_sum, get_rank, get_world_size, is_main_process
from .classes import query_names
from .datasets import SegmentationDataset
from .inference import rescale_image, rgb_array, slide_windows
from .metrics import confusion_matrix, segmentation_metrics
from .templates import get_templates

__all__ = ['ClipProtocol', 'CLIP_PROTOCOLS', 'get_clip_protocol', 'query_embeddings', 'clip_window_scores',
           'labels_from_query_scores', 'evaluate_training_free']


@dataclass(frozen=True)
class ClipProtocol:
    """A protocol for training-free CLIP models: per-dataset resize, logit scale and thresholds."""
    name: str
    short_side: dict[str, int] = field(default_factory=dict)  # per dataset; default_short_side elsewhere
    logit_scale: dict[str, float] = field(default_factory=dict)
    prob_thd: dict[str, float] = field(default_factory=dict)  # below it: background (class 0); 0 = off
    area_thd: dict[str, float] = field(default_factory=dict)  # share of the non-background prediction; absent = off
    default_short_side: int = 336
    default_logit_scale: float = 40.0
    long_side: int = 2048
    crop_size: int = 224
    stride: int = 112
    templates: str = 'full'
    class_names: str = 'sclip'
    reproduces: str = ''
    overrides: tuple[tuple[str, object], ...] = ()  # (setting, value) given on the command line: for every dataset

    def settings_for(self, dataset: str) -> dict:
        out = {'short_side': self.short_side.get(dataset, self.default_short_side),
               'logit_scale': self.logit_scale.get(dataset, self.default_logit_scale),
               'prob_thd': self.prob_thd.get(dataset, 0.0), 'area_thd': self.area_thd.get(dataset)}
        out.update(dict(self.overrides))
        return out

    def describe(self, dataset: str) -> str:
        s = self.settings_for(dataset)
        area = f', area threshold {s["area_thd"]}' if s['area_thd'] is not None else ''
        return (f'{self.name} ({dataset}): short side {s["short_side"]} (long <= {self.long_side}), windows '
                f'{self.crop_size}/{self.stride}, templates {self.templates!r}, class names {self.class_names!r}, '
                f'logit scale {s["logit_scale"]}, probability threshold {s["prob_thd"]}{area}, PAMR off')


CLIP_PROTOCOLS = {
    # SCLIP's released configs (ClearCLIP and NACLIP evaluate with the same code and other values)
    'sclip': ClipProtocol(
        'sclip', short_side={'coco_stuff': 448, 'cityscapes': 560},
        logit_scale={'voc': 65.0, 'context': 50.0, 'coco_object': 50.0},
        prob_thd={'voc': 0.1, 'context': 0.1, 'coco_object': 0.1}, area_thd={'voc': 0.1}, reproduces='SCLIP'),
}


def get_clip_protocol(name: str, short_side: int | None = None, crop_size: int | None = None,
                      stride: int | None = None, templates: str | None = None) -> ClipProtocol:
    if name not in CLIP_PROTOCOLS:
        raise ValueError(f'unknown training-free protocol {name!r}; choose from {", ".join(CLIP_PROTOCOLS)}')
    protocol = CLIP_PROTOCOLS[name]
    given = {k: v for k, v in {'crop_size': crop_size, 'stride': stride, 'templates': templates}.items()
             if v is not None}
    if short_side is not None:
        given['overrides'] = (('short_side', short_side),)
    return replace(protocol, **given)


@torch.no_grad()
def query_embeddings(backbone, queries: list[str], templates: tuple[str, ...], batch_size: int = 256) -> torch.Tensor:
    """[Q, D] L2-normalised: each prompt's embedding normalised, averaged over the templates, normalised again."""
    prompts = [t.format(q) for q in queries for t in templates]
    embeds = torch.cat([backbone.encode_texts(prompts[i:i + batch_size]).float()
                        for i in range(0, len(prompts), batch_size)])
    embeds = F.normalize(embeds, dim=-1).reshape(len(queries), len(templates), -1).mean(dim=1)
    return F.normalize(embeds, dim=-1)


@torch.no_grad()
def clip_window_scores(backbone, image, queries: torch.Tensor, short_side: int, long_side: int = 2048,
                       crop_size: int = 224, stride: int = 112, windows_per_batch: int = 16,
                       size: tuple[int, int] | None = None) -> torch.Tensor:
    """One RGB image -> the cosine of every pixel with every query [Q, H, W], averaged over the sliding windows and
    resized bilinearly to the image's size (or ``size``). A window is zero-padded (the mean colour after
    normalisation) on both sides to a multiple of the patch size and its scores cut back."""
    arr = rgb_array(image)
    device = queries.device
    x = backbone.normalize(rescale_image(arr, short_side, long_side).to(device) / 255.0)
    _, _, H, W = x.shape
    patch = getattr(getattr(backbone, 'clip', None), 'visual', None)
    patch = getattr(patch, 'patch_size', (1, 1))
    windows = slide_windows(H, W, crop_size, stride)
    total = torch.zeros(queries.shape[0], H, W, device=device)
    count = torch.zeros(1, H, W, device=device)
    for i in range(0, len(windows), windows_per_batch):
        chunk = windows[i:i + windows_per_batch]
        by_size: dict[tuple[int, int], list] = {}
        for box in chunk:  # windows of one size go through together (edge windows of a small image differ)
            (y0, y1), (x0, x1) = box
            by_size.setdefault((y1 - y0, x1 - x0), []).append(box)
        for (h, w), boxes in by_size.items():
            crops = torch.cat([x[:, :, y0:y1, x0:x1] for (y0, y1), (x0, x1) in boxes])
            ph, pw = -h % patch[0], -w % patch[1]  # padding split evenly, the odd pixel after (SCLIP's rule)
            top, left = ph // 2, pw // 2
            padded = F.pad(crops, (left, pw - left, top, ph - top))
            feats = F.normalize(backbone.dense_features(padded).float(), dim=1)  # [b, D, h', w']
            cos = torch.einsum('bdhw,qd->bqhw', feats, queries)
            cos = F.interpolate(cos, size=(h + ph, w + pw), mode='bilinear', align_corners=False)
            cos = cos[..., top:top + h, left:left + w]
            for c, ((y0, y1), (x0, x1)) in zip(cos, boxes):
                total[:, y0:y1, x0:x1] += c
                count[:, y0:y1, x0:x1] += 1
    scores = total / count
    return F.interpolate(scores[None], size=tuple(size or arr.shape[:2]), mode='bilinear', align_corners=False)[0]


def labels_from_query_scores(scores: torch.Tensor, query_class: torch.Tensor, num_classes: int, logit_scale: float,
                             prob_thd: float = 0.0, area_thd: float | None = None) -> torch.Tensor:
    """Cosine scores [Q, H, W] of the queries, query_class [Q] (the class of each query) -> labels [H, W].

    softmax over the queries of logit_scale x scores; each class the best probability of its queries; with
    ``area_thd``, classes 1.. whose arg-max area is at most area_thd x the non-background arg-max area are dropped;
    argmax; pixels whose best probability is below ``prob_thd`` become 0."""
    probs = (logit_scale * scores.float()).softmax(dim=0)  # [Q, H, W]
    flat = probs.flatten(1)  # [Q, HW]
    index = query_class.to(probs.device).view(-1, 1).expand_as(flat)
    per_class = flat.new_zeros(num_classes, flat.shape[1]).scatter_reduce_(0, index, flat, 'amax', include_self=False)
    per_class = per_class.view(num_classes, *probs.shape[1:])
    if area_thd is not None:
        area = torch.bincount(per_class.argmax(dim=0).flatten(), minlength=num_classes)[1:].float()
        keep = (area > area_thd * area.sum()).to(per_class.dtype)
        per_class[1:] *= keep.view(-1, 1, 1)
    best, labels = per_class.max(dim=0)
    return labels.masked_fill(best < prob_thd, 0)


@torch.no_grad()
def evaluate_training_free(backbone, dataset: SegmentationDataset, protocol: ClipProtocol,
                           device: torch.device | str = 'cpu', limit: int | None = None,
                           autocast_dtype: torch.dtype | None = None, progress: bool = True) -> dict:
    """Run the protocol over the dataset (this rank's share) with a training-free dense backbone; metrics over all
    ranks, as :func:`pgseg.eval.segmentation.evaluate_segmentation`."""
    name = dataset.spec.name
    official = dataset.classes == dataset.spec.classes
    per_class = query_names(name, dataset.classes, protocol.class_names) if official else \
        [(c,) for c in dataset.classes]
    queries = [q for qs in per_class for q in qs]
    query_class = torch.tensor([k for k, qs in enumerate(per_class) for _ in qs], device=device)
    text = query_embeddings(backbone, queries, get_templates(protocol.templates)).to(device)
    s = protocol.settings_for(name)
    with_bg = dataset.classes[0] == 'background'
    indices = list(range(len(dataset)))[:limit][get_rank()::get_world_size()]
    conf = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64)
    for i in tqdm(indices, desc=f'{name} ({protocol.name}, {backbone.dense})', unit='img', dynamic_ncols=True,
                  disable=not (progress and is_main_process())):
        image, label, _ = dataset[i]
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            scores = clip_window_scores(backbone, image, text, s['short_side'], protocol.long_side,
                                        protocol.crop_size, protocol.stride)
        pred = labels_from_query_scores(scores, query_class, len(per_class), s['logit_scale'],
                                        s['prob_thd'] if with_bg else 0.0, s['area_thd'] if with_bg else None)
        conf += confusion_matrix(pred.cpu(), label, dataset.num_classes)
    conf = all_reduce_sum(conf)
    metrics = segmentation_metrics(conf, dataset.classes)
    metrics.update(dataset=name, split=dataset.split, num_images=len(dataset.ids[:limit]),
                   protocol=protocol.describe(name), dense=backbone.dense,
                   queries={dataset.classes[k]: list(qs) for k, qs in enumerate(per_class) if len(qs) > 1})
    return metrics
