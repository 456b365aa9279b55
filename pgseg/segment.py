"""``pgseg-segment``: segment images with free-text class names (the ``pgseg.Segmenter`` API, or
``pgseg.PromptSegmenter`` with learned MVP-SEG prompts, ``pgseg.StudentSegmenter`` with an MVP-SEG+ student).

    pgseg-segment photo.jpg other.png --classes "cat,dog,sofa" --checkpoint X --out runs/segment
    pgseg-segment photo.jpg --classes "cat,dog,grass" --prompts runs/mvpseg/prompts.pt    # learned MVP-SEG prompts
    pgseg-segment photo.jpg --classes "cat,dog,grass" --student runs/mvpseg_plus            # an MVP-SEG+ student
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch
from PIL import Image

from .checkpoint import CheckpointError, load_model
from .eval.segmenter import Segmenter
from .mvpseg import PromptSegmenter, StudentSegmenter
from .runtime.cli import run_command
from .runtime.precision import bf16_flag_dtype

__all__ = ['main']

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='pgseg-segment', description='Segment images with free-text class names. '
                                     'Writes <name>_overlay.png, <name>_labels.png (palette PNG: 0 background, '
                                     'k = k-th class) and <name>_areas.json per image.')
    parser.add_argument('images', nargs='+', help='image files (any format Pillow opens)')
    parser.add_argument('--classes', required=True, help='comma-separated class names, e.g. "cat,dog,sofa"')
    parser.add_argument('--checkpoint', default=None, help='pgseg checkpoint directory or official .pth')
    parser.add_argument('--prompts', default=None, help='learned MVP-SEG prompts (pgseg-prompt-train): every pixel '
                        'gets one of --classes, no background rule; --checkpoint, if given, is the pgseg backbone')
    parser.add_argument('--student', default=None, help='an MVP-SEG+ student (pgseg-transfer: student.pt or its run '
                        'directory): every pixel gets one of --classes; names it was not trained on are embedded '
                        "with its teacher's prompts (--prompts, if given, replaces the prompts file the student was "
                        "trained from; --checkpoint the teacher's pgseg backbone)")
    parser.add_argument('--out', default='runs/segment', help='output folder')
    parser.add_argument('--bg-thresh', type=float, default=0.9,
                        help='background threshold (official rule); negative: no background class')
    parser.add_argument('--templates', default='simple', help='prompt templates: simple, subset, full')
    parser.add_argument('--bf16', action='store_true', help='bf16 autocast')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    Image.MAX_IMAGE_PIXELS = 400_000_000  # large photos are legitimate input here: they are resized for inference
    if not args.checkpoint and not args.prompts and not args.student:
        parser.error('give --checkpoint (zero-shot rule), --prompts (learned MVP-SEG prompts) or --student '
                     '(an MVP-SEG+ student)')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dtype = bf16_flag_dtype(args.bf16, device)
    failed = []

    def body() -> None:
        if args.student:
            segmenter = StudentSegmenter(args.student, args.classes.split(','), args.checkpoint, device, dtype,
                                         prompts=args.prompts)
        elif args.prompts:
            segmenter = PromptSegmenter(args.prompts, args.classes.split(','), args.checkpoint, device, dtype)
        else:
            segmenter = Segmenter(load_model(args.checkpoint).to(device), args.classes.split(','),
                                  bg_thresh=None if args.bg_thresh < 0 else args.bg_thresh, templates=args.templates,
                                  autocast_dtype=dtype)
        os.makedirs(args.out, exist_ok=True)
        failed.extend(path for path in args.images if not _segment_one(segmenter, path, args.out))

    code = run_command('pgseg-segment', body, (CheckpointError, FileNotFoundError, ValueError))
    return code or (1 if len(failed) == len(args.images) else 0)


def _segment_one(segmenter, path: str, out: str) -> bool:
    """Writes the image's overlay, label PNG and areas; False (and a message) when the image cannot be read."""
    name = os.path.splitext(os.path.basename(path))[0]
    try:
        result = segmenter(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        print(f'pgseg-segment: cannot read {path}: {exc}', file=sys.stderr)
        return False
    result.overlay().save(os.path.join(out, f'{name}_overlay.png'))
    result.label_png().save(os.path.join(out, f'{name}_labels.png'))
    with open(os.path.join(out, f'{name}_areas.json'), 'w') as f:
        json.dump({'image': path, 'size': list(result.image.size), 'classes': result.class_names,
                   'areas': result.areas}, f, indent=1)
    summary = ', '.join(f'{k} {100 * v:.1f}%' for k, v in sorted(result.areas.items(), key=lambda kv: -kv[1]))
    print(f'{path}: {summary}')
    return True


if __name__ == '__main__':
    sys.exit(main())
