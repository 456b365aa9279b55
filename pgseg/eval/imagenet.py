"""Zero-shot ImageNet classification with the class-name prompts, over one process or many."""
from __future__ import annotations

import os

import torch
from PIL import Image
from tqdm import tqdm

from ..runtime.distributed import all_reduce_sum, get_rank, get_world_size, is_main_process
from .datasets import LayoutError
from .templates import get_templates

__all__ = ['evaluate_imagenet']


def _imagenet_items(source: str) -> tuple[list, str]:
    """(items, kind): an ImageFolder tree (class folders sorted = class index), or tar shards with ``cls``."""
    if os.path.isdir(source):
        classes = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d)))
        if len(classes) != 1000:
            raise LayoutError(f'{source}: expected 1000 class folders (ImageFolder layout), found {len(classes)}')
        items = [(os.path.join(source, c, f), k) for k, c in enumerate(classes)
                 for f in sorted(os.listdir(os.path.join(source, c)))]
        return items, 'folder'
    import braceexpand
    shards = list(braceexpand.braceexpand(source))
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise LayoutError(f'ImageNet source {source!r}: {missing[0]} not found (a folder or a shard pattern)')
    return shards, 'shards'


def _imagenet_samples(items, kind: str):
    """This rank's (PIL image, class) pairs: files or whole shards strided by rank, so each image is seen once."""
    mine = items[get_rank()::get_world_size()]
    if kind == 'folder':
        for path, k in mine:
            yield Image.open(path).convert('RGB'), k
        return
    import io

    from webdataset.tariterators import tarfile_samples
    for sample in tarfile_samples({'url': u} for u in mine):
        key = next(k for k in ('jpg', 'jpeg', 'png', 'webp') if k in sample)
        yield Image.open(io.BytesIO(sample[key])).convert('RGB'), int(sample['cls'])


@torch.no_grad()
def evaluate_imagenet(model, source: str, device='cpu', batch_size: int = 64, templates: str = 'subset',
                      limit: int | None = None, progress: bool = True) -> dict:
    """Zero-shot top-1 / top-5 over every image exactly once: Resize 256, CenterCrop 224, ImageNet normalisation;
    the classifier is the 1000 CLIP class names x ``templates`` (the official 'subset' of 7)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from torchvision import transforms as T

    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
    model.eval()
    items, kind = _imagenet_items(source)
    if limit:
        items = items[:limit]
    tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    classifier = model.class_embeddings(list(IMAGENET_CLASSNAMES), get_templates(templates)).to(device)
    counts = torch.zeros(3, dtype=torch.int64)  # images, top-1 hits, top-5 hits
    batch, labels = [], []

    def flush():
        if not batch:
            return
        emb = torch.nn.functional.normalize(model.encode_image(torch.stack(batch).to(device),
                                                               with_group_embeds=False).image_embeds.float(), dim=-1)
        top5 = (emb @ classifier.t()).topk(5, dim=-1).indices.cpu()
        y = torch.tensor(labels)
        counts[0] += len(y)
        counts[1] += (top5[:, 0] == y).sum()
        counts[2] += (top5 == y[:, None]).any(dim=1).sum()
        batch.clear()
        labels.clear()
    for image, k in tqdm(_imagenet_samples(items, kind), disable=not (progress and is_main_process()), unit='img',
                         desc='imagenet'):
        batch.append(tf(image))
        labels.append(k)
        if len(batch) == batch_size:
            flush()
    flush()
    counts = all_reduce_sum(counts)
    n = int(counts[0])
    return {'dataset': 'imagenet', 'num_images': n, 'top1': 100 * float(counts[1]) / max(n, 1),
            'top5': 100 * float(counts[2]) / max(n, 1), 'templates': templates}
