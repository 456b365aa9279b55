"""Segmentation metrics from a confusion matrix (mmseg's convention, docs/fidelity.md#miou)."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ['confusion_matrix', 'segmentation_metrics', 'format_table']


def confusion_matrix(pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """[C, C] int64 counts: rows are ground truth, columns predictions, ignore pixels left out (``bincount``)."""
    pred = torch.as_tensor(np.asarray(pred) if not torch.is_tensor(pred) else pred).long().flatten()
    label = torch.as_tensor(np.asarray(label) if not torch.is_tensor(label) else label).long().flatten()
    if pred.shape != label.shape:
        raise ValueError(f'prediction and label differ in size: {tuple(pred.shape)} vs {tuple(label.shape)}')
    keep = label != ignore_index
    if (label[keep] >= num_classes).any() or (label[keep] < 0).any():
        raise ValueError(f'label values outside [0, {num_classes}) other than the ignore index {ignore_index}')
    idx = label[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor, class_names: list[str] | tuple[str, ...]) -> dict:
    """mIoU = nan-mean of per-class IoU over the classes whose union is not empty (x100), pixel accuracy, and the
    per-class IoU (None where the union is empty)."""
    conf = conf.double()
    inter = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float('nan')))
    valid = ~torch.isnan(iou)
    total = conf.sum()
    return {
        'miou': float(iou[valid].mean() * 100) if valid.any() else float('nan'),
        'pixel_accuracy': float(inter.sum() / total * 100) if total > 0 else float('nan'),
        'per_class_iou': {name: (None if torch.isnan(v) else float(v * 100)) for name, v in zip(class_names, iou)},
        'num_pixels': int(total),
    }


def format_table(metrics: dict, title: str) -> str:
    """A plain-text per-class IoU table ending in the mIoU line."""
    rows = [f'{title}', f'{"class":<24}{"IoU":>8}', '-' * 32]
    for name, v in metrics['per_class_iou'].items():
        rows.append(f'{name.strip():<24}{("-" if v is None else f"{v:.2f}"):>8}')
    rows += ['-' * 32, f'{"mIoU":<24}{metrics["miou"]:>8.2f}',
             f'{"pixel accuracy":<24}{metrics["pixel_accuracy"]:>8.2f}']
    return '\n'.join(rows)
