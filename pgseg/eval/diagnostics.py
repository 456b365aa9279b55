"""Diagnostics that tell whether naming or grouping holds a score down (docs/demo.md#diagnostics):

- recognition: of the classes present in an image, the share ranked within the image's top-|present| classes by the
  pooled image embedding (chance: |present| / K);
- distinct final groups per image: how many final groups win at least one pixel;
- group-oracle mIoU: every final group labelled with the majority true class of its pixels (an upper bound for the
  naming step given the grouping);
- object groups named: of the final groups whose pixels are mostly one foreground class, the share whose best class
  by the official group-class affinity is that class (chance: 1 / K);
- background-group leak: of the final groups whose pixels are mostly background, the share whose best class is one
  of the classes present in the image. High values mean the objects' identity has leaked into the background
  groups, so the background rule cannot tell them apart from the objects.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import SegmentationDataset
from .inference import group_class_affinity, preprocess_image
from .metrics import confusion_matrix, segmentation_metrics
from .protocols import Protocol

__all__ = ['grouping_diagnostics']


@torch.no_grad()
def grouping_diagnostics(model, dataset: SegmentationDataset, protocol: Protocol, class_embeds: torch.Tensor,
                         device='cpu', limit: int | None = None) -> dict:
    """class_embeds: [K_fg, D] for the dataset's foreground classes (background excluded)."""
    model.eval()
    with_bg = dataset.classes[0] == 'background'
    offset = 1 if with_bg else 0
    hits = total = 0
    distinct = []
    named = objects = leaks = backgrounds = 0
    conf = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64)
    for i in range(min(len(dataset), limit or len(dataset))):
        image, label, _ = dataset[i]
        x = preprocess_image(image, protocol.short_side, protocol.long_side).to(device)
        out = model.encode_image(x)
        best = group_class_affinity(out.group_embeds, out.image_embeds, class_embeds.to(out.group_embeds.device),
                                    model.logit_scale)[0].argmax(dim=-1).cpu()  # [G] best class of each group
        gh, gw = out.grid
        maps = out.group_maps[-1].transpose(1, 2).reshape(1, -1, gh, gw).float()
        groups = F.interpolate(maps, size=label.shape, mode='bilinear', align_corners=False).argmax(1)[0].cpu()
        groups = groups.numpy()
        distinct.append(len(np.unique(groups)))
        valid = label != 255
        oracle = np.zeros_like(label, dtype=np.int64)
        present = sorted({int(c) - offset for c in np.unique(label[valid]) if int(c) >= offset})
        for g in np.unique(groups):
            pix = (groups == g) & valid
            if pix.any():
                majority = int(np.bincount(label[pix].astype(np.int64)).argmax())
                oracle[groups == g] = majority
                if with_bg and majority == 0:
                    backgrounds += 1
                    leaks += int(int(best[g]) in present)
                elif majority - offset < class_embeds.shape[0]:
                    objects += 1
                    named += int(int(best[g]) == majority - offset)
        conf += confusion_matrix(oracle, label, dataset.num_classes)
        if present:
            scores = F.normalize(out.image_embeds.float(), dim=-1) @ class_embeds.float().t()
            top = set(scores[0].topk(len(present)).indices.tolist())
            hits += len(top & set(present))
            total += len(present)
    return {'recognition': 100.0 * hits / max(total, 1), 'distinct_groups_per_image': float(np.mean(distinct)),
            'group_oracle_miou': segmentation_metrics(conf, dataset.classes)['miou'],
            'object_groups_named': 100.0 * named / max(objects, 1), 'object_groups': objects,
            'background_group_leak': 100.0 * leaks / max(backgrounds, 1), 'background_groups': backgrounds}
