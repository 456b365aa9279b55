"""``pgseg-synth``: synthetic image-caption shards and labelled segmentation sets, deterministic by seed.

    pgseg-synth shards data/synth/train --num-samples 20000 --seed 0 --holdout-pairs circle+star
    pgseg-synth seg data/synth/eval --layout voc --num-images 200 --seed 1000
    pgseg-synth seg data/synth/eval_unseen --layout voc --num-images 100 --seed 2000 --required-pair circle+star
"""
from __future__ import annotations

import argparse
import sys

from .data.synthetic.scenes import DEFAULT_CLASSES, SHAPES, SceneConfig
from .data.synthetic.writers import parse_classes, parse_pairs, write_caption_shards, write_segmentation_set
from .runtime.cli import run_command


def _scene(args) -> SceneConfig:
    return SceneConfig(size=args.size, classes=parse_classes(args.classes, DEFAULT_CLASSES),
                       min_objects=args.min_objects, max_objects=args.max_objects, min_radius=args.min_radius,
                       max_radius=args.max_radius, hue_jitter=args.hue_jitter,
                       forbidden_pairs=parse_pairs(args.holdout_pairs),
                       required_pair=(parse_pairs(args.required_pair) or [None])[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='pgseg-synth', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='what', required=True)
    shards = sub.add_parser('shards', help='image-caption tar shards in img2dataset layout (+ sizes.json)')
    seg = sub.add_parser('seg', help='a labelled segmentation set in an official layout')
    for p in (shards, seg):
        p.add_argument('out', help='output directory')
        p.add_argument('--seed', type=int, default=0, help='scenes depend only on (seed, index)')
        p.add_argument('--size', type=int, default=64, help='image side in pixels')
        p.add_argument('--classes', default=None,
                       help=f'comma-separated shape classes (default: {",".join(DEFAULT_CLASSES)}; '
                            f'available: {",".join(SHAPES)})')
        p.add_argument('--min-objects', type=int, default=1)
        p.add_argument('--max-objects', type=int, default=3)
        p.add_argument('--min-radius', type=float, default=SceneConfig.min_radius,
                       help='smallest object radius, as a fraction of the image side')
        p.add_argument('--max-radius', type=float, default=SceneConfig.max_radius,
                       help='largest object radius, as a fraction of the image side')
        p.add_argument('--hue-jitter', type=float, default=15.0,
                       help='degrees of hue jitter around each class colour (180: colour says nothing of the class)')
        p.add_argument('--holdout-pairs', default=None,
                       help="class pairs that never appear together, e.g. 'circle+star,square+heart'")
        p.add_argument('--required-pair', default=None, help="a class pair present in every scene, e.g. 'circle+star'")
    shards.add_argument('--num-samples', type=int, required=True)
    shards.add_argument('--samples-per-shard', type=int, default=1000)
    seg.add_argument('--layout', choices=['voc', 'context', 'coco_object', 'all'], default='voc')
    seg.add_argument('--num-images', type=int, required=True)
    seg.add_argument('--split', default='val')
    args = parser.parse_args(argv)

    def body() -> None:
        scene = _scene(args)
        if args.what == 'shards':
            paths = write_caption_shards(args.out, args.num_samples, args.seed, args.samples_per_shard, scene)
            print(f'wrote {len(paths)} shards, {args.num_samples} samples, to {args.out}')
        else:
            layouts = ['voc', 'context', 'coco_object'] if args.layout == 'all' else [args.layout]
            for layout in layouts:
                base = write_segmentation_set(args.out, layout, args.num_images, args.seed, scene, args.split)
                print(f'wrote {args.num_images} {layout} images to {base}')

    return run_command('pgseg-synth', body, (ValueError,))


if __name__ == '__main__':
    sys.exit(main())
