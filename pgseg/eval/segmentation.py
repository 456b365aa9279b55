"""Zero-shot segmentation of a labelled dataset under a protocol, over one process or many, and the trainer's
in-training evaluator."""
from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..runtime.distributed import all_reduce_sum, get_rank, get_world_size, is_main_process
from .classes import prompt_names
from .datasets import SegmentationDataset, build_dataset
from .inference import predict_labels, preprocess_image
from .metrics import confusion_matrix, segmentation_metrics
from .protocols import Protocol, get_protocol
from .templates import get_templates
from .visualize import group_map_grid, label_image, legend_entries, titled_grid

log = logging.getLogger('pgseg.eval')

__all__ = ['evaluate_segmentation', 'class_prompts', 'build_in_training_evaluator']


def class_prompts(dataset: SegmentationDataset, protocol: Protocol) -> tuple[list[str], bool]:
    """Prompt names (without background) under the protocol's class naming, and whether the dataset has a
    background class. A dataset with its own class list (``pgseg_classes.json``) keeps its names."""
    names = list(dataset.classes)
    if dataset.classes == dataset.spec.classes:
        names = list(prompt_names(dataset.spec.name, names, protocol.class_names))
    with_bg = names[0] == 'background'
    return (names[1:] if with_bg else names), with_bg


@torch.no_grad()
def evaluate_segmentation(model, dataset: SegmentationDataset, protocol: Protocol, device: torch.device | str = 'cpu',
                          bg_thresh: float | None = None, autocast_dtype: torch.dtype | None = None,
                          limit: int | None = None, num_visuals: int = 0, progress: bool = True) -> dict:
    """Run the protocol over the dataset (this rank's share: images rank, rank + W, ...) and return metrics over
    all ranks. ``bg_thresh`` overrides the protocol's value for this dataset. With ``num_visuals`` > 0 the result
    also holds ``visual_grid``, a PIL image (input, prediction, ground truth, final groups, titled, with a legend of
    the class colours) of the first images."""
    model.eval()
    prompts, with_bg = class_prompts(dataset, protocol)
    words = list(protocol.background_words) if with_bg else []
    if protocol.background_words and not with_bg:
        log.warning('%s has no background class: the background words %s are not used', dataset.spec.name,
                    ', '.join(protocol.background_words))
    class_embeds = model.class_embeddings(prompts + words, templates=get_templates(protocol.templates)).to(device)
    bg_value, constant = (None, False)
    if with_bg:
        bg_value, constant = (bg_thresh, False) if bg_thresh is not None else protocol.background_for(dataset.spec.name)
    indices = list(range(len(dataset)))[:limit][get_rank()::get_world_size()]
    conf = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64)
    visuals = []
    for i in tqdm(indices, desc=f'{dataset.spec.name} ({protocol.name})', disable=not (progress and is_main_process()),
                  unit='img', dynamic_ncols=True):
        image, label, image_id = dataset[i]
        pred, _ = predict_labels(model, image, class_embeds, bg_value, with_bg, protocol, device, autocast_dtype,
                                 bg_constant=constant)
        if words:  # channels 1..K are the classes, K+1.. the background words
            pred = pred.masked_fill(pred > len(prompts), 0)
        conf += confusion_matrix(pred.cpu(), label, dataset.num_classes)
        if len(visuals) < num_visuals:
            visuals.append((image, pred.cpu().numpy(), label))
    conf = all_reduce_sum(conf)  # the CPU matrix crosses to the GPU for NCCL
    metrics = segmentation_metrics(conf, dataset.classes)
    metrics.update(dataset=dataset.spec.name, split=dataset.split, num_images=len(dataset.ids[:limit]),
                   protocol=protocol.describe(), background=bg_value, background_constant=constant)
    if visuals:
        metrics['visual_grid'] = _visual_grid(model, visuals, list(dataset.classes), protocol, device)
    return metrics


VISUAL_COLUMNS = ('input', 'prediction', 'ground truth', 'final groups')


def _visual_grid(model, visuals, class_names, protocol: Protocol, device) -> Image.Image:
    """Columns: input, prediction, ground truth, final group map, under a row of titles; one row per image, at a
    common height; below, the colours of the classes predicted or labelled in these images, with their names."""
    rows = []
    height = 192
    num_classes = len(class_names)
    for image, pred, label in visuals:
        w = max(1, round(image.width * height / image.height))
        x = preprocess_image(image, protocol.short_side, protocol.long_side).to(device)
        out = model.encode_image(x, with_group_embeds=False)
        groups = group_map_grid(torch.nn.functional.interpolate(x, size=(height, w), mode='bilinear'),
                                out.group_maps[-1:], out.grid, max_images=1)
        rows.append([image.convert('RGB').resize((w, height), Image.NEAREST),
                     label_image(pred, num_classes).resize((w, height), Image.NEAREST),
                     label_image(label, num_classes).resize((w, height), Image.NEAREST),
                     groups.crop((0, height, w, 2 * height))])
    legend = legend_entries([m for _, pred, label in visuals for m in (pred, label)], class_names)
    return titled_grid(rows, VISUAL_COLUMNS, legend)


def build_in_training_evaluator(cfg, device):
    """The trainer's ``eval_hook`` from an :class:`pgseg.config.EvalConfig`: mean mIoU over the datasets as
    ``score``, plus each dataset's mIoU."""
    readers = [build_dataset(name, cfg.data_root) for name in cfg.datasets]
    proto = get_protocol(cfg.protocol, short_side=cfg.short_side, crop_size=cfg.crop_size, stride=cfg.stride)
    limit, bg_thresh = cfg.limit, cfg.bg_thresh

    def hook(model, step: int) -> dict:
        out = {}
        for ds in readers:
            m = evaluate_segmentation(model, ds, proto, device, bg_thresh=bg_thresh, limit=limit, progress=False)
            out[f'{ds.spec.name}/miou'] = m['miou']
        out['score'] = float(np.mean([out[f'{ds.spec.name}/miou'] for ds in readers]))
        return out
    return hook
