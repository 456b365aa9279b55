#!/usr/bin/env python
"""Measure where PAMR runs: off, inside each window on the patch-grid scores (bench8_pamr), or once on the full-size
scores (bench8_pamr_image), under constant and adaptive backgrounds, on one labelled dataset.

    python scripts/pamr_placement.py --checkpoint runs/demo/train/ckpt-00000936 --data-root data/demo/eval/test \
        --short-side 64 --crop-size 64 --stride 32 --adaptive 0.8

Prints one line per (background, placement): mIoU and the evaluation's wall time (docs/protocols.md#pamr).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

import pgseg
from pgseg.eval.datasets import DATASETS, build_dataset
from pgseg.eval.protocols import Protocol
from pgseg.eval.segmentation import evaluate_segmentation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--checkpoint', required=True)
    ap.add_argument('--data-root', required=True)
    ap.add_argument('--dataset', default='voc', choices=list(DATASETS))
    ap.add_argument('--short-side', type=int, default=448)
    ap.add_argument('--crop-size', type=int, default=448)
    ap.add_argument('--stride', type=int, default=224)
    ap.add_argument('--constant', type=float, action='append', default=None,
                    help='constant background scores to try (default 0.5 and 0.4)')
    ap.add_argument('--adaptive', type=float, action='append', default=[],
                    help='adaptive background thresholds to try')
    ap.add_argument('--limit', type=int, default=None)
    args = ap.parse_args()
    model = pgseg.load_model(args.checkpoint).eval()
    ds = build_dataset(args.dataset, args.data_root)
    base = Protocol('pamr_placement', short_side=args.short_side, crop_size=args.crop_size, stride=args.stride)
    backgrounds = [(f'constant {v}', {'bg_score': v}) for v in (args.constant or [0.5, 0.4])]
    backgrounds += [(f'adaptive {v}', {'bg_thresh': {args.dataset: v}}) for v in args.adaptive]
    print(f'{args.checkpoint} on {args.dataset} ({len(ds.ids[:args.limit])} images), torch threads '
          f'{torch.get_num_threads()}')
    for label, background in backgrounds:
        for pamr in ('off', 'window', 'image'):
            protocol = replace(base, pamr=pamr, **background)
            start = time.perf_counter()
            m = evaluate_segmentation(model, ds, protocol, limit=args.limit, progress=False)
            print(f'{label:14s} PAMR {pamr:7s} mIoU {m["miou"]:6.2f}   {time.perf_counter() - start:6.1f} s',
                  flush=True)


if __name__ == '__main__':
    main()
