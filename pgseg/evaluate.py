"""``pgseg-eval``: zero-shot segmentation on VOC / Context / COCO-Object and the 8-benchmark sets, and zero-shot
ImageNet classification; one process or many (``torchrun``: images split by rank without duplicates, confusion
matrices summed).

    pgseg-eval --checkpoint X --dataset voc --dataset context --data-root data/eval --protocol pgseg
    pgseg-eval --checkpoint X --imagenet data/imagenet/val          # an ImageFolder tree, or a shard pattern
    pgseg-eval --prompts runs/mvpseg/prompts.pt --dataset voc20     # MVP-SEG prompts: mIoU(S), mIoU(U), hIoU
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .checkpoint import CheckpointError, load_model
from .distributed import all_reduce_sum, get_rank, get_world_size, init_distributed, is_main_process, run_command
from .eval.datasets import DATASETS, LayoutError, SegmentationDataset, build_dataset
from .eval.inference import predict_labels, preprocess_image
from .eval.metrics import confusion_matrix, format_table, segmentation_metrics
from .eval.protocols import PROTOCOLS, Protocol, get_protocol
from .eval.visualize import group_map_grid, label_image
from .precision import bf16_flag_dtype
from .prompts import get_templates

log = logging.getLogger('pgseg.eval')

__all__ = ['evaluate_segmentation', 'evaluate_imagenet', 'build_in_training_evaluator', 'main']


def _class_prompts(dataset: SegmentationDataset) -> tuple[list[str], bool]:
    """Prompt names (without background) and whether the dataset has a background class."""
    names = list(dataset.classes)
    with_bg = names[0] == 'background'
    return (names[1:] if with_bg else names), with_bg


@torch.no_grad()
def evaluate_segmentation(model, dataset: SegmentationDataset, protocol: Protocol, device: torch.device | str = 'cpu',
                          bg_thresh: float | None = None, autocast_dtype: torch.dtype | None = None,
                          limit: int | None = None, num_visuals: int = 0, progress: bool = True) -> dict:
    """Run the protocol over the dataset (this rank's share: images rank, rank + W, ...) and return metrics over
    all ranks. ``bg_thresh`` overrides the protocol's value for this dataset."""
    model.eval()
    prompts, with_bg = _class_prompts(dataset)
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
        metrics['_visuals'] = _visual_grid(model, visuals, dataset.num_classes, protocol, device)
    return metrics


def _visual_grid(model, visuals, num_classes: int, protocol: Protocol, device) -> Image.Image:
    """Columns: input, prediction, ground truth, final group map; one row per image, at a common height."""
    rows = []
    height = 192
    for image, pred, label in visuals:
        w = max(1, round(image.width * height / image.height))
        x = preprocess_image(image, protocol.short_side, protocol.long_side).to(device)
        out = model.encode_image(x, with_group_embeds=False)
        groups = group_map_grid(torch.nn.functional.interpolate(x, size=(height, w), mode='bilinear'),
                                out.group_maps[-1:], out.grid, max_images=1)
        tiles = [image.convert('RGB').resize((w, height), Image.NEAREST),
                 label_image(pred, num_classes).resize((w, height), Image.NEAREST),
                 label_image(label, num_classes).resize((w, height), Image.NEAREST),
                 groups.crop((0, height, w, 2 * height))]
        row = Image.new('RGB', (4 * w, height))
        for k, tile in enumerate(tiles):
            row.paste(tile, (k * w, 0))
        rows.append(row)
    grid = Image.new('RGB', (max(r.width for r in rows), sum(r.height for r in rows)), 'white')
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    return grid


# ---------------------------------------------------------------------------------------------- ImageNet
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

    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
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


# ---------------------------------------------------------------------------------------------- trainer hook
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


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='pgseg-eval', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', default=None, help='pgseg checkpoint directory or official .pth (with '
                        '--prompts: the pgseg backbone, when not the one the prompts file names)')
    parser.add_argument('--prompts', default=None, help='MVP-SEG prompts file (pgseg-prompt-train): every pixel is '
                        'classified over seen and unseen classes; reports mIoU(S), mIoU(U), hIoU')
    parser.add_argument('--unseen', default=None, help='with --prompts: comma-separated unseen class names '
                        "(default: the prompts file's), or a named split: voc_15_5, context_49_10, coco_stuff_156_15")
    parser.add_argument('--dataset', action='append', default=[], choices=list(DATASETS),
                        help='dataset to evaluate (repeat for several)')
    parser.add_argument('--data-root', default=os.environ.get('PGSEG_EVAL_DATA', 'data/eval'),
                        help='folder holding VOCdevkit/, coco/, ... (default: $PGSEG_EVAL_DATA or data/eval)')
    parser.add_argument('--split', default=None, help='dataset split (default: val; validation for ADE20K)')
    parser.add_argument('--protocol', default='pgseg', choices=list(PROTOCOLS))
    parser.add_argument('--bg-thresh', type=float, default=None, help="override the protocol's background value")
    parser.add_argument('--templates', default=None, help="prompt template set (default: the protocol's)")
    parser.add_argument('--background-words', default=None,
                        help='comma-separated prompts that stand for background ("grass,sky,wall"): they compete with '
                        'the classes and a pixel won by one is background (datasets with a background class only)')
    parser.add_argument('--short-side', type=int, default=None,
                        help="resize short side (default: the protocol's; with --prompts, the prompts file's)")
    parser.add_argument('--crop-size', type=int, default=None,
                        help="sliding-window size (default: the protocol's; with --prompts, the prompts file's)")
    parser.add_argument('--stride', type=int, default=None,
                        help="sliding-window stride (default: the protocol's; with --prompts, the prompts file's)")
    parser.add_argument('--imagenet', default=None, help='ImageNet val: ImageFolder tree or shard pattern')
    parser.add_argument('--limit', type=int, default=None, help='evaluate only the first N images')
    parser.add_argument('--bf16', action='store_true', help='bf16 autocast (faster; numbers may move slightly)')
    parser.add_argument('--visualize', type=int, default=4, help='images in the PNG grid per dataset (0: none)')
    parser.add_argument('--out', default='runs/eval', help='folder for results.json and the visualisation grids')
    parser.add_argument('--wandb', default='disabled', choices=['disabled', 'offline', 'online'])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    if not args.dataset and not args.imagenet:
        parser.error('give at least one --dataset or --imagenet')
    if args.prompts:
        # options of the checkpoint evaluation that prompts evaluation has no use for: an error, not silently ignored
        unused = [f'--{name.replace("_", "-")}' for name in ('protocol', 'templates', 'bg_thresh', 'background_words',
                                                            'imagenet', 'wandb')
                  if getattr(args, name) != parser.get_default(name)]
        if unused:
            parser.error(f'{", ".join(unused)}: not used with --prompts (the prompts file fixes the classifier; '
                         'pixels are scored over seen and unseen classes, without a background rule)')
        return _main_prompts(args)
    if not args.checkpoint:
        parser.error('--checkpoint is required (or --prompts)')
    def body() -> None:
        device, _ = init_distributed()
        model = load_model(args.checkpoint).to(device)
        protocol = get_protocol(args.protocol, templates=args.templates, short_side=args.short_side,
                                crop_size=args.crop_size, stride=args.stride,
                                background_words=_split_words(args.background_words))
        dtype = bf16_flag_dtype(args.bf16, device)
        results = {'checkpoint': args.checkpoint, 'protocol': protocol.describe(), 'results': []}
        os.makedirs(args.out, exist_ok=True)
        for name in args.dataset:
            ds = build_dataset(name, args.data_root, args.split)
            m = evaluate_segmentation(model, ds, protocol, device, args.bg_thresh, dtype, args.limit,
                                      args.visualize if is_main_process() else 0)
            grid = m.pop('_visuals', None)
            if is_main_process():
                print('\n' + format_table(m, f'{name} ({len(ds.ids[:args.limit])} images), protocol {protocol.name}'))
                if grid is not None:
                    path = os.path.join(args.out, f'{name}_visuals.png')
                    grid.save(path)
                    m['visuals'] = path
            results['results'].append(m)
        if args.imagenet:
            r = evaluate_imagenet(model, args.imagenet, device, limit=args.limit)
            results['results'].append(r)
            if is_main_process():
                print(f"\nimagenet zero-shot ({r['num_images']} images, templates {r['templates']}): "
                      f"top-1 {r['top1']:.2f}, top-5 {r['top5']:.2f}")
        if is_main_process():
            path = _write_results(args.out, results)
            print(f'\nprotocol {protocol.describe()}\nwrote {path}')
            _log_wandb(args, results)

    return run_command('pgseg-eval', body, (LayoutError, CheckpointError, ValueError))


def _split_words(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    words = tuple(w.strip() for w in text.split(',') if w.strip())
    if not words:
        raise ValueError(f'--background-words {text!r} names no word; give comma-separated prompts like "grass,sky"')
    return words


def _main_prompts(args) -> int:
    """``pgseg-eval --prompts FILE``: seen / unseen evaluation of learned MVP-SEG prompts."""
    from .mvpseg.inference import SlideSettings, evaluate_seen_unseen
    from .mvpseg.prompt_file import load_prompts
    from .mvpseg.protocols import SPLITS, resolve_split
    def body() -> None:
        device, _ = init_distributed()
        backbone = None
        if args.checkpoint:
            from .mvpseg.backbones import GroupSegDenseBackbone
            backbone = GroupSegDenseBackbone(load_model(args.checkpoint))
        learner, backbone, meta = load_prompts(args.prompts, backbone)
        backbone, learner = backbone.to(device), learner.to(device).eval()
        settings = SlideSettings.from_prompts(meta, args.short_side, args.crop_size, args.stride)
        results = {'prompts': args.prompts, 'settings': vars(settings), 'results': []}
        dtype = bf16_flag_dtype(args.bf16, device)
        os.makedirs(args.out, exist_ok=True)
        for name in args.dataset:
            ds = build_dataset(name, args.data_root, args.split)
            if args.unseen in SPLITS:
                _, unseen = resolve_split(args.unseen, list(ds.classes))
            else:
                names = args.unseen.split(',') if args.unseen else meta.get('unseen', [])
                _, unseen = resolve_split('custom', list(ds.classes), [n.strip() for n in names])
            m = evaluate_seen_unseen(backbone, learner, ds, unseen, settings, device, dtype, args.limit)
            if is_main_process():
                print('\n' + format_table(m, f'{name} ({m["num_images"]} images), learned prompts {args.prompts}'))
                print(f"{'mIoU(S)':<24}{m['miou_seen']:>8.2f}\n{'mIoU(U)':<24}{m['miou_unseen']:>8.2f}\n"
                      f"{'hIoU':<24}{m['hiou']:>8.2f}   (unseen: {', '.join(m['unseen_classes'])})")
            results['results'].append(m)
        if is_main_process():
            print(f'\nwrote {_write_results(args.out, results)}')

    return run_command('pgseg-eval', body, (LayoutError, CheckpointError, ValueError, FileNotFoundError))


def _write_results(out: str, results: dict) -> str:
    """``<out>/results.json``; returns its path."""
    path = os.path.join(out, 'results.json')
    with open(path, 'w') as f:
        json.dump(results, f, indent=1)
    return path


def _log_wandb(args, results) -> None:
    if args.wandb == 'disabled':
        return
    from .metrics import MetricsLogger
    logger = MetricsLogger(args.out, wandb_mode=args.wandb, project='pgseg-eval', config=vars(args))
    values, images = {}, {}
    for r in results['results']:
        key = r['dataset']
        values.update({f'eval/{key}/{m}': r[m] for m in ('miou', 'top1', 'top5') if m in r})
        if 'visuals' in r:
            images[f'eval/{key}/visuals'] = Image.open(r['visuals'])
    logger.log(0, values, images)
    logger.close()


if __name__ == '__main__':
    sys.exit(main())
