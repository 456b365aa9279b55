#!/usr/bin/env python3
"""Explain the pixels where ``pgseg.slide_logits`` and a parity fixture's ``seg_slide_logits`` disagree.

Each crop's pixel takes the final group with the largest upsampled soft assignment (docs/fidelity.md#per-crop-scoring).
Where two groups tie to within float32 rounding, the winner depends on the order of the arithmetic (BLAS kernels, vector
width), and the pixel's scores jump between the two groups' class affinities; its binary background can flip, which
the 2-window average turns into a difference of 0.5.

For every pixel beyond the tolerance, in float32 and in float64 (the same model, ``model.double()``), this prints
each covering window's two leading groups and their gap, and the winners the fixture must have had: the combination
of the leading candidates whose averaged scores reproduce the fixture's pixel best. A gap far below the group maps'
float32 error (about 1e-6 relative here) means no float32 implementation decides that pixel reliably.

usage: python scripts/parity_ties.py DIR [--tol 2e-3]     (DIR: the folder of the parity fixtures)
"""
from __future__ import annotations

import argparse
import glob
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import pgseg  # noqa: E402
from pgseg.eval.inference import background_threshold, crop_assignment, slide_windows  # noqa: E402


@torch.no_grad()
def window_candidates(model, image: torch.Tensor, class_embeds: torch.Tensor, bg_thresh: float, window, pixel,
                      top: int = 2) -> list[tuple[int, float, torch.Tensor]]:
    """The ``top`` leading groups at ``pixel`` (y, x in image coordinates) of one window [(y0, y1), (x0, x1)]:
    (group, upsampled assignment, the pixel's scores [1 + K] were that group the winner)."""
    (y0, y1), (x0, x1) = window
    upsampled, affinity = crop_assignment(model, image[:, :, y0:y1, x0:x1], class_embeds.to(image.dtype))
    up, affinity = upsampled[0, :, pixel[0] - y0, pixel[1] - x0], affinity[0]  # [G], [G, K]
    thresh = background_threshold(affinity[None], bg_thresh)[0]
    values, groups = up.topk(min(top, up.numel()))
    result = []
    for v, g in zip(values.tolist(), groups.tolist()):
        fg = affinity[g].double()
        result.append((g, v, torch.cat([(fg.max() < thresh).double().view(1), fg])))
    return result


def explain_pixel(models: dict, image: torch.Tensor, class_embeds: torch.Tensor, bg_thresh: float, pixel,
                  fixture_scores: torch.Tensor, crop_size: int = 448, stride: int = 224) -> dict:
    """For one pixel (y, x): per precision (``models``: name -> (model, dtype)), each covering window's two leading
    groups and their gap; and the per-window winners whose averaged scores best reproduce ``fixture_scores``
    [1 + K] (among the first precision's candidates), with the max abs error of that fit."""
    H, W = image.shape[-2:]
    windows = [(ys, xs) for ys, xs in slide_windows(H, W, crop_size, stride)
               if ys[0] <= pixel[0] < ys[1] and xs[0] <= pixel[1] < xs[1]]
    report = {'pixel': tuple(pixel), 'windows': [], 'fixture_winners': None, 'fixture_fit': None}
    candidates = {}
    for name, (model, dtype) in models.items():
        candidates[name] = [window_candidates(model, image.to(dtype), class_embeds, bg_thresh, w, pixel)
                            for w in windows]
    first = next(iter(candidates))
    for i, w in enumerate(windows):
        leaders = {}
        for name, cands in candidates.items():
            (g1, v1, _), (g2, v2, _) = cands[i][:2]
            leaders[name] = (g1, g2, v1 - v2)
        report['windows'].append((w, leaders))
    best = None
    for combo in itertools.product(*[range(len(c)) for c in candidates[first]]):
        scores = torch.stack([candidates[first][i][j][2] for i, j in enumerate(combo)]).mean(dim=0)
        err = float((scores - fixture_scores.double()).abs().max())
        if best is None or err < best[0]:
            best = (err, [candidates[first][i][j][0] for i, j in enumerate(combo)])
    report['fixture_fit'], report['fixture_winners'] = best
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('folder', help='the parity fixtures: <variant>_<set>[_expected].pt(h)')
    ap.add_argument('--tol', type=float, default=2e-3, help="check_parity.py's slide_logits tolerance")
    ap.add_argument('--max-pixels', type=int, default=10, help='explain at most this many pixels per fixture')
    args = ap.parse_args(argv)
    pairs = sorted(glob.glob(os.path.join(args.folder, '*_expected.pt')))
    if not pairs:
        print(f'no *_expected.pt fixtures in {args.folder}', file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    for exp_path in pairs:
        tag = os.path.basename(exp_path).replace('_expected.pt', '.pth')
        e = torch.load(exp_path, weights_only=True)
        model = pgseg.load_model(exp_path.replace('_expected.pt', '.pth')).eval()
        model64 = pgseg.load_model(exp_path.replace('_expected.pt', '.pth')).double().eval()
        image, cls = e['seg_slide_input'].float(), e['class_embeds'].float()
        ref = e['seg_slide_logits'].float()
        bad = {}
        for name, m, dtype in (('float32', model, torch.float32), ('float64', model64, torch.float64)):
            logits = pgseg.slide_logits(m, image.to(dtype), cls.to(dtype), bg_thresh=e['seg_bg_thresh'])
            diff = (logits.float() - ref).abs().amax(dim=1)[0]
            bad[name] = {tuple(p) for p in (diff > args.tol).nonzero().tolist()}
            print(f'{tag} {name}: {len(bad[name])} of {diff.numel()} pixels beyond {args.tol:g} '
                  f'(max abs diff {float(diff.max()):.2e})')
        models = {'float32': (model, torch.float32), 'float64': (model64, torch.float64)}
        for pixel in sorted(bad['float32'] | bad['float64'])[:args.max_pixels]:
            r = explain_pixel(models, image, cls, e['seg_bg_thresh'], pixel, ref[0, :, pixel[0], pixel[1]])
            print(f'  pixel (row {pixel[0]}, col {pixel[1]}): fixture winners per window {r["fixture_winners"]} '
                  f'(reproduce its scores to {r["fixture_fit"]:.1e})')
            for ((y0, y1), (x0, x1)), leaders in r['windows']:
                cells = '; '.join(f'{name} group {g1} over {g2} by {gap:.2e}'
                                  for name, (g1, g2, gap) in leaders.items())
                print(f'    window rows {y0}-{y1} cols {x0}-{x1}: {cells}')
    print('a gap far below ~1e-6 of the assignment (the group maps\' float32 error against float64) is a tie that the '
          'order of float32 arithmetic decides; where the fixture\'s winner differs from float64\'s, the fixture '
          'itself took the rounding side')
    return 0


if __name__ == '__main__':
    sys.exit(main())
