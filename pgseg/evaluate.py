"""``pgseg-eval``: zero-shot segmentation on VOC / Context / COCO-Object and the 8-benchmark sets, and zero-shot
ImageNet classification; one process or many (``torchrun``: images split by rank without duplicates, confusion
matrices summed).

    pgseg-eval --checkpoint X --dataset voc --dataset context --data-root data/eval --protocol pgseg
    pgseg-eval --checkpoint X --imagenet data/imagenet/val          # an ImageFolder tree, or a shard pattern
    pgseg-eval --prompts runs/mvpseg/prompts.pt --dataset voc20     # MVP-SEG prompts: mIoU(S), mIoU(U), hIoU
    pgseg-eval --student runs/mvpseg_plus/student.pt --dataset voc20   # an MVP-SEG+ student: the same figures
    pgseg-eval --clip ViT-B-16 --clip-pretrained openai --dense sclip --dataset voc   # training-free CLIP
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from PIL import Image

from . import mvpseg
from .checkpoint import CheckpointError, load_model
from .eval.datasets import DATASETS, LayoutError, build_dataset
from .eval.imagenet import evaluate_imagenet
from .eval.metrics import format_table
from .eval.protocols import PROTOCOLS, get_protocol
from .eval.segmentation import evaluate_segmentation
from .eval.training_free import CLIP_PROTOCOLS, evaluate_training_free, get_clip_protocol
from .runtime.cli import run_command, setup_cpu_process, setup_logging
from .runtime.distributed import init_distributed, is_main_process
from .runtime.precision import bf16_flag_dtype

__all__ = ['main']


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='pgseg-eval', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', default=None, help='pgseg checkpoint directory or official .pth (with '
                        '--prompts: the pgseg backbone, when not the one the prompts file names)')
    parser.add_argument('--prompts', default=None, help='MVP-SEG prompts file (pgseg-prompt-train): every pixel is '
                        'classified over seen and unseen classes; reports mIoU(S), mIoU(U), hIoU')
    parser.add_argument('--student', default=None, help='MVP-SEG+ student (pgseg-transfer: student.pt or its run '
                        'directory): whole-image inference over seen and unseen classes; mIoU(S), mIoU(U), hIoU. '
                        "Classes it was not trained on are embedded with its teacher's prompts (--prompts, if given, "
                        'replaces the prompts file it was trained from)')
    parser.add_argument('--unseen', default=None, help='with --prompts or --student: comma-separated unseen class '
                        "names (default: the file's), or a named split: voc_15_5, context_49_10, coco_stuff_156_15")
    parser.add_argument('--dataset', action='append', default=[], choices=list(DATASETS),
                        help='dataset to evaluate (repeat for several)')
    parser.add_argument('--data-root', default=os.environ.get('PGSEG_EVAL_DATA', 'data/eval'),
                        help='folder holding VOCdevkit/, coco/, ... (default: $PGSEG_EVAL_DATA or data/eval)')
    parser.add_argument('--split', default=None, help='dataset split (default: val; validation for ADE20K)')
    parser.add_argument('--clip', default=None, help='a training-free CLIP instead of a checkpoint: an open_clip '
                        'model name (ViT-B-16) or an open_clip model config JSON file')
    parser.add_argument('--clip-pretrained', default=None, help='with --clip: a weights file, or an open_clip '
                        'pretrained tag already in the local cache (never downloaded); none: random weights')
    parser.add_argument('--dense', default='sclip', choices=list(mvpseg.DENSE_RULES),
                        help="with --clip: the last block's training-free rule (default sclip)")
    parser.add_argument('--protocol', default=None, choices=list(PROTOCOLS) + list(CLIP_PROTOCOLS),
                        help='evaluation protocol (default: pgseg; with --clip: sclip); docs/protocols.md')
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
    setup_logging()
    setup_cpu_process()
    if not args.dataset and not args.imagenet:
        parser.error('give at least one --dataset or --imagenet')
    if args.prompts or args.student:
        # options of the checkpoint evaluation that these have no use for: an error, not silently ignored
        flag = '--student' if args.student else '--prompts'
        names = ('protocol', 'templates', 'bg_thresh', 'background_words', 'imagenet', 'wandb', 'dense',
                 'clip', 'clip_pretrained') + (('crop_size', 'stride') if args.student else ())
        unused = [f'--{name.replace("_", "-")}' for name in names if getattr(args, name) != parser.get_default(name)]
        if unused:
            parser.error(f'{", ".join(unused)}: not used with {flag} (the file fixes the classifier; pixels are '
                         'scored over seen and unseen classes, without a background rule'
                         f'{"; the student sees the whole image" if args.student else ""})')
        return _main_student(args) if args.student else _main_prompts(args)
    if args.clip:
        if args.checkpoint:
            parser.error('give --checkpoint or --clip, not both')
        args.protocol = args.protocol or 'sclip'
        unused = [f'--{name.replace("_", "-")}' for name in ('bg_thresh', 'background_words', 'imagenet', 'wandb',
                                                            'visualize')
                  if getattr(args, name) != parser.get_default(name)]
        if args.protocol not in CLIP_PROTOCOLS or unused:
            parser.error(f'with --clip: a training-free protocol ({", ".join(CLIP_PROTOCOLS)}), not '
                         f'{", ".join(unused) if unused else "--protocol " + args.protocol}')
        return _main_clip(args)
    if not args.checkpoint:
        parser.error('--checkpoint is required (or --prompts, --student, or --clip)')
    clip_only = [f'--{name.replace("_", "-")}' for name in ('dense', 'clip_pretrained')
                 if getattr(args, name) != parser.get_default(name)]
    if clip_only:
        parser.error(f'{", ".join(clip_only)}: only with --clip (a training-free CLIP model)')
    args.protocol = args.protocol or 'pgseg'
    if args.protocol in CLIP_PROTOCOLS:
        parser.error(f'--protocol {args.protocol} scores training-free CLIP models: use it with --clip')
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
            grid = m.pop('visual_grid', None)
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
    def body() -> None:
        device, _ = init_distributed()
        learner, backbone, meta = mvpseg.load_prompt_classifier(args.prompts, args.checkpoint)
        backbone, learner = backbone.to(device), learner.to(device).eval()
        settings = mvpseg.SlideSettings.from_prompts(meta, args.short_side, args.crop_size, args.stride)
        results = {'prompts': args.prompts, 'settings': vars(settings), 'results': []}
        dtype = bf16_flag_dtype(args.bf16, device)
        os.makedirs(args.out, exist_ok=True)
        for name in args.dataset:
            ds = build_dataset(name, args.data_root, args.split)
            unseen = mvpseg.resolve_unseen(args.unseen, ds.classes, meta.get('unseen', []))
            m = mvpseg.evaluate_seen_unseen(backbone, learner, ds, unseen, settings, device, dtype, args.limit)
            if is_main_process():
                print('\n' + format_table(m, f'{name} ({m["num_images"]} images), learned prompts {args.prompts}'))
                print(_seen_unseen_lines(m))
            results['results'].append(m)
        if is_main_process():
            print(f'\nwrote {_write_results(args.out, results)}')

    return run_command('pgseg-eval', body, (LayoutError, CheckpointError, ValueError, FileNotFoundError))


def _seen_unseen_lines(m: dict) -> str:
    return (f"{'mIoU(S)':<24}{m['miou_seen']:>8.2f}\n{'mIoU(U)':<24}{m['miou_unseen']:>8.2f}\n"
            f"{'hIoU':<24}{m['hiou']:>8.2f}   (unseen: {', '.join(m['unseen_classes'])})")


def _main_student(args) -> int:
    """``pgseg-eval --student FILE``: seen / unseen evaluation of an MVP-SEG+ student (whole image, single scale)."""
    def body() -> None:
        device, _ = init_distributed()
        meta = mvpseg.load_student(args.student)[1]
        short = args.short_side or meta.get('eval', {}).get('short_side', 512)
        long = meta.get('eval', {}).get('long_side', 2048)
        results = {'student': args.student, 'settings': {'short_side': short, 'long_side': long}, 'results': []}
        dtype = bf16_flag_dtype(args.bf16, device)
        os.makedirs(args.out, exist_ok=True)
        for name in args.dataset:
            ds = build_dataset(name, args.data_root, args.split)
            unseen = mvpseg.resolve_unseen(args.unseen, ds.classes, meta.get('unseen', []))
            # a fresh copy per dataset: retargeting replaces classifier rows in place
            student = mvpseg.retarget_student(mvpseg.load_student(args.student)[0], meta, list(ds.classes),
                                              args.checkpoint, args.prompts).to(device)
            m = mvpseg.evaluate_predictions(
                lambda image, s=student: mvpseg.predict_student(s, image, short, long, device, dtype)[0],
                ds, unseen, args.limit)
            if is_main_process():
                print('\n' + format_table(m, f'{name} ({m["num_images"]} images), student {args.student}'))
                print(_seen_unseen_lines(m))
            results['results'].append(m)
        if is_main_process():
            print(f'\nwrote {_write_results(args.out, results)}')

    return run_command('pgseg-eval', body, (LayoutError, CheckpointError, ValueError, FileNotFoundError))


def _main_clip(args) -> int:
    """``pgseg-eval --clip NAME``: a training-free CLIP model's dense features under a training-free protocol."""
    def body() -> None:
        device, _ = init_distributed()
        model_config = None
        name = args.clip
        if args.clip.endswith('.json'):
            try:
                with open(args.clip) as f:
                    model_config = json.load(f)
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f'--clip {args.clip}: not a readable open_clip model config JSON ({exc})') from None
            name = None
        backbone = mvpseg.build_backbone(mvpseg.BackboneConfig(
            kind='clip', name=name, model_config=model_config, pretrained=args.clip_pretrained,
            dense=args.dense)).to(device)
        protocol = get_clip_protocol(args.protocol, args.short_side, args.crop_size, args.stride, args.templates)
        dtype = bf16_flag_dtype(args.bf16, device)
        results = {'clip': args.clip, 'pretrained': args.clip_pretrained, 'dense': args.dense, 'results': []}
        os.makedirs(args.out, exist_ok=True)
        for name in args.dataset:
            ds = build_dataset(name, args.data_root, args.split)
            m = evaluate_training_free(backbone, ds, protocol, device, args.limit, dtype)
            if is_main_process():
                print('\n' + format_table(m, f'{name} ({m["num_images"]} images), {args.clip} {args.dense}, '
                                             f'{m["protocol"]}'))
            results['results'].append(m)
        if is_main_process():
            print(f'\nwrote {_write_results(args.out, results)}')

    return run_command('pgseg-eval', body, (LayoutError, ValueError, FileNotFoundError))


def _write_results(out: str, results: dict) -> str:
    """``<out>/results.json``; returns its path."""
    path = os.path.join(out, 'results.json')
    with open(path, 'w') as f:
        json.dump(results, f, indent=1)
    return path


def _log_wandb(args, results) -> None:
    from .training.logger import MetricsLogger, resolve_wandb_mode
    if resolve_wandb_mode(args.wandb, '--wandb')[0] == 'disabled':  # WANDB_MODE, when set, wins (with a warning)
        return
    logger = MetricsLogger(args.out, wandb_mode=args.wandb, project='pgseg-eval', config=vars(args),
                           setting_name='--wandb')
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
