"""Seen / unseen class splits (MaskCLIP+'s zero-shot splits, docs/mvpseg.md#protocols) and the GZS3 metrics.

Every pixel is classified over seen and unseen classes together; IoU is dataset-level (intersections and unions
summed over all images); mIoU(S) and mIoU(U) average it over the seen and the unseen classes, and
hIoU = 2 S U / (S + U).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..eval.metrics import segmentation_metrics

__all__ = ['SplitProtocol', 'SPLITS', 'resolve_split', 'resolve_unseen', 'harmonic_iou', 'seen_unseen_metrics']


@dataclass(frozen=True)
class SplitProtocol:
    name: str
    dataset: str  # a pgseg dataset reader (pgseg.eval.datasets.DATASETS)
    unseen: tuple[int, ...]  # class indices in that reader's class list
    note: str


SPLITS: dict[str, SplitProtocol] = {
    'voc_15_5': SplitProtocol(
        'voc_15_5', 'voc20', (15, 16, 17, 18, 19),
        'Pascal VOC 2012 without background (20 classes, label 0 ignored); unseen: potted plant, sheep, sofa, train, '
        'tv monitor'),
    'context_49_10': SplitProtocol(
        'context_49_10', 'context', (1, 7, 8, 15, 20, 25, 32, 34, 49, 55),
        'Pascal Context 59 classes + background (background counted as seen); unseen: aeroplane, bird, boat, cat, '
        'cow, fence, keyboard, motorbike, sofa, tv monitor'),
    'coco_stuff_156_15': SplitProtocol(
        'coco_stuff_156_15', 'coco_stuff', (19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160),
        'COCO-Stuff 164k, 171 classes; unseen: cow, giraffe, suitcase, frisbee, skateboard, carrot, scissors, '
        'cardboard, clouds, grass, playingfield, river, road, tree, wall-concrete'),
}


def resolve_split(protocol: str, classes: Sequence[str], unseen_names: Sequence[str] = ()) -> tuple[list[int],
                                                                                                   list[int]]:
    """(seen indices, unseen indices) into ``classes``. ``protocol: custom`` takes the unseen classes by name (for
    synthetic sets and other datasets); a named protocol takes them by index and checks the class count."""
    if protocol == 'custom':
        missing = [n for n in unseen_names if n not in classes]
        if missing or not unseen_names:
            raise ValueError(f'protocol custom: data.unseen must name classes of the dataset; '
                             f'{missing or "none given"} not in {list(classes)}')
        unseen = sorted(classes.index(n) for n in unseen_names)
    else:
        if protocol not in SPLITS:
            raise ValueError(f"unknown seen/unseen protocol {protocol!r}; choose from {', '.join(SPLITS)} or 'custom'")
        unseen = sorted(SPLITS[protocol].unseen)
        if max(unseen) >= len(classes):
            raise ValueError(f'protocol {protocol}: the dataset has {len(classes)} classes, fewer than the protocol '
                             f'expects (use protocol custom with data.unseen for other class lists)')
    seen = [i for i in range(len(classes)) if i not in unseen]
    if not seen:
        raise ValueError('every class is unseen; at least one seen class is needed to learn prompts')
    return seen, unseen


def resolve_unseen(spec: str | None, classes: Sequence[str], default: Sequence[str] = ()) -> list[int]:
    """The unseen class indices of a command-line choice: a named split (``voc_15_5``, ...), comma-separated class
    names, or (``None``) the ``default`` names (a prompts file's own unseen classes)."""
    if spec in SPLITS:
        return resolve_split(spec, list(classes))[1]
    names = spec.split(',') if spec else list(default)
    return resolve_split('custom', list(classes), [n.strip() for n in names])[1]


def harmonic_iou(seen: float, unseen: float) -> float:
    return 0.0 if seen + unseen <= 0 else 2 * seen * unseen / (seen + unseen)


def _mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else float('nan')


def seen_unseen_metrics(conf: torch.Tensor, classes: Sequence[str], unseen: Sequence[int]) -> dict:
    """From a confusion matrix over all classes: mIoU, mIoU(S), mIoU(U), hIoU (x100), per-class IoU."""
    m = segmentation_metrics(conf, classes)
    ious = list(m['per_class_iou'].values())
    unseen_set = set(unseen)
    s = _mean([v for i, v in enumerate(ious) if i not in unseen_set])
    u = _mean([v for i, v in enumerate(ious) if i in unseen_set])
    return {**m, 'miou_seen': s, 'miou_unseen': u, 'hiou': harmonic_iou(s, u),
            'seen_classes': [c for i, c in enumerate(classes) if i not in unseen_set],
            'unseen_classes': [classes[i] for i in sorted(unseen_set)]}
