#!/usr/bin/env python3
"""Prepare evaluation datasets, and check image counts against the official ones.

    python scripts/prepare_datasets.py coco-object-from-stuff --coco data/coco_stuff164k --out data/eval/coco
    python scripts/prepare_datasets.py coco-object-from-instances --annotations instances_val2017.json \
        --images data/coco/val2017 --out data/eval/coco --split val2017
    python scripts/prepare_datasets.py cityscapes --root data/eval/cityscapes
    python scripts/prepare_datasets.py check --data-root data/eval

Pascal Context's label PNGs and split files come from mmseg's converter (trainval_merged.json, Detail API); VOC and
ADE20K need no conversion. See docs/data.md#evaluation-datasets for the layout of every dataset.
"""
import argparse
import json
import sys

from pgseg.eval.prepare import (
    convert_cityscapes,
    convert_coco_object_from_instances,
    convert_coco_object_from_stuff,
    count_images,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='cmd', required=True)
    a = sub.add_parser('coco-object-from-stuff', help='COCO-Object labels from COCO-Stuff-164k PNGs (official)')
    a.add_argument('--coco', required=True)
    a.add_argument('--out', required=True)
    a.add_argument('--splits', nargs='+', default=['val2017'])
    b = sub.add_parser('coco-object-from-instances', help='COCO-Object labels from instance JSON (pycocotools)')
    b.add_argument('--annotations', required=True)
    b.add_argument('--images', required=True)
    b.add_argument('--out', required=True)
    b.add_argument('--split', default='val2017')
    c = sub.add_parser('cityscapes', help='Cityscapes labelIds -> labelTrainIds')
    c.add_argument('--root', required=True)
    c.add_argument('--splits', nargs='+', default=['val'])
    d = sub.add_parser('check', help='count images per dataset against the official counts')
    d.add_argument('--data-root', default='data/eval')
    d.add_argument('--dataset', action='append', default=None)
    args = parser.parse_args(argv)
    if args.cmd == 'coco-object-from-stuff':
        print(f'wrote {convert_coco_object_from_stuff(args.coco, args.out, args.splits)} label maps')
    elif args.cmd == 'coco-object-from-instances':
        print(f'wrote {convert_coco_object_from_instances(args.annotations, args.images, args.out, args.split)} maps')
    elif args.cmd == 'cityscapes':
        print(f'wrote {convert_cityscapes(args.root, args.splits)} label maps')
    else:
        report = count_images(args.data_root, args.dataset)
        for name, r in report.items():
            status = 'ok' if r['ok'] else ('MISSING' if 'error' in r else 'COUNT DIFFERS')
            print(f"{name:<12} {r['found']:>6} / {r['official']:<6} {status}")
        print(json.dumps(report, indent=1), file=sys.stderr)
        return 0 if all(r['ok'] for r in report.values()) else 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
