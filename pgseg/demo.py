"""``make demo``: segmentation learned from captions alone, on the CPU, in about a quarter of an hour.

1. synthetic captioned scenes (``pgseg-synth``) for training, with one class pair (circle + star) that never appears
   together in training; held-out labelled sets in the Pascal VOC layout: ``val`` (picks the background threshold),
   ``test`` (other seeds) and ``unseen_pairs`` (every image holds the held-out pair);
2. the untrained model evaluated the same way, as the baseline;
3. training under ``torchrun --nproc_per_node 2`` for the configuration's steps (captions only, no pixel labels); a
   time guard stops it cleanly, and the summary then says so;
4. zero-shot evaluation and grouping diagnostics; ``runs/demo/summary.json``, ``curves.png``, ``grid.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import torch
from PIL import Image

from .checkpoint import find_latest, load_model, save_checkpoint
from .config import ConfigError, load_config
from .data.synthetic.scenes import SceneConfig
from .data.synthetic.writers import check_scene_matches, write_caption_shards, write_segmentation_set
from .eval.datasets import build_dataset
from .eval.diagnostics import grouping_diagnostics
from .eval.protocols import get_protocol
from .eval.segmentation import evaluate_segmentation
from .eval.templates import get_templates
from .eval.visualize import curves_figure, figure_image
from .models import build_model
from .runtime.cli import run_command

HOLDOUT = ('circle', 'star')
# objects larger than pgseg-synth's default (0.12-0.28 of the side): 3-6 patches across instead of 2-4.5, which helps
# recognition and the naming of object groups (docs/demo.md#diagnosis-3-why-the-groups-carry-the-whole-image-runs-15-17)
DEMO_RADIUS = (0.18, 0.36)
BG_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # up to the official VOC value
# the second protocol of the demo: the scenes' background kinds named as a user would name the stuff in a picture; a
# pixel won by one of them is background (``Protocol.background_words``), on top of the threshold rule
BACKGROUND_WORDS = ('grass', 'sky', 'sand', 'water', 'brick wall', 'snow', 'noisy background')


def prepare_data(data: str, num_samples: int, scene: SceneConfig) -> None:
    """Write what is missing under ``data``; check that what is there was written with the same scene design."""
    shards = os.path.join(data, 'shards')
    train_scene = replace(scene, forbidden_pairs=[HOLDOUT])
    if os.path.isfile(os.path.join(shards, 'sizes.json')):
        check_scene_matches(shards, train_scene)
    else:
        write_caption_shards(shards, num_samples, seed=0, scene=train_scene)
    for name, seed, n, pair in (('val', 1000, 100, None), ('test', 2000, 200, None), ('unseen_pairs', 3000, 100,
                                                                                         HOLDOUT)):
        root = os.path.join(data, 'eval', name)
        eval_scene = replace(scene, required_pair=pair)
        if os.path.isdir(os.path.join(root, 'VOCdevkit')):
            check_scene_matches(os.path.join(root, 'VOCdevkit', 'VOC2012'), eval_scene)
        else:
            write_segmentation_set(root, 'voc', n, seed=seed, scene=eval_scene)


def pick_threshold(model, data: str, protocol, log=print) -> float:
    """The background threshold of ``BG_GRID`` with the best mIoU on ``val``."""
    val = build_dataset('voc', os.path.join(data, 'eval', 'val'))
    scores = {t: evaluate_segmentation(model, val, protocol, bg_thresh=t, progress=False)['miou'] for t in BG_GRID}
    best = max(scores, key=scores.get)
    log(f'  background threshold on val{" with background words" if protocol.background_words else ""}: {best} '
        '(mIoU by threshold: ' + ', '.join(f'{t}: {v:.1f}' for t, v in scores.items()) + ')')
    return best


def evaluate(model, data: str, protocol, log=print) -> dict:
    """Background threshold picked on ``val``; mIoU, recognition and diagnostics on ``test`` and ``unseen_pairs``;
    the mIoU again with the background kinds as extra prompts (``background_words``)."""
    sets = {split: build_dataset('voc', os.path.join(data, 'eval', split)) for split in ('test', 'unseen_pairs')}
    best = pick_threshold(model, data, protocol, log)
    out = {'bg_thresh': best}
    for split, ds in sets.items():
        m = evaluate_segmentation(model, ds, protocol, bg_thresh=best, progress=False)
        classes = model.class_embeddings(list(ds.classes[1:]), get_templates(protocol.templates))
        diag = grouping_diagnostics(model, ds, protocol, classes)
        out[split] = {'miou': m['miou'], 'num_images': m['num_images'], 'per_class_iou': m['per_class_iou'], **diag}
    words = replace(protocol, background_words=BACKGROUND_WORDS)
    best = pick_threshold(model, data, words, log)
    out['background_words'] = {'bg_thresh': best, 'words': list(BACKGROUND_WORDS)}
    for split, ds in sets.items():
        m = evaluate_segmentation(model, ds, words, bg_thresh=best, progress=False)
        out['background_words'][split] = {'miou': m['miou'], 'per_class_iou': m['per_class_iou']}
    return out


def _describe(protocol, bg_thresh: float) -> str:
    """The protocol's description with the threshold picked on ``val`` in place of the datasets' values."""
    fixed = 'background threshold ' + ', '.join(f'{k} {v}' for k, v in protocol.bg_thresh.items())
    return protocol.describe().replace(fixed, f'background threshold {bg_thresh} (picked on val)')


CURVES = ('train/loss', 'train/itc', 'train/npr', 'train/multi_label', 'train/grounding', 'train/group_word',
          'train/balance', 'train/lr')


def noun_losses_start(model_cfg) -> int | None:
    """The step from which the noun losses (grounding, noun-to-group) count, when they are on and start late."""
    on = model_cfg.grounding_weight > 0 or model_cfg.group_word_weight > 0
    return model_cfg.noun_losses_start_step if on and model_cfg.noun_losses_start_step > 0 else None


def read_metrics(metrics_path: str, keys=CURVES) -> dict[str, tuple[list[int], list[float]]]:
    """The trainer's ``metrics.jsonl`` as ``key -> (steps, values)`` for the ``keys`` the run logged, in the order of
    ``keys`` (the first key, without points, when the run logged none of them)."""
    rows = []
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    series = {k: ([r['step'] for r in rows if k in r], [float(r[k]) for r in rows if k in r]) for k in keys}
    return {k: v for k, v in series.items() if v[0]} or {keys[0]: ([], [])}


def curves_figure_of_run(metrics_path: str, keys=CURVES, per_row: int = 4, noun_start: int | None = None,
                         panel_px: tuple[int, int] = (360, 250)):
    """The matplotlib figure of :func:`plot_curves` (``pgseg.eval.visualize.curves_figure``)."""
    marks = {f'noun losses start (step {noun_start})': noun_start} if noun_start is not None else {}
    return curves_figure(read_metrics(metrics_path, keys), marks, per_row=per_row, panel_px=panel_px)


def plot_curves(metrics_path: str, out_path: str | None = None, keys=CURVES, per_row: int = 4,
                noun_start: int | None = None, panel_px: tuple[int, int] = (360, 250)) -> Image.Image:
    """Training curves drawn with matplotlib: one panel per key the run logged, ``per_row`` panels a row, each
    ``panel_px`` pixels; raw values thin and light, their moving average bold, a dashed line where the noun losses
    start (``noun_start``, :func:`noun_losses_start`). Saved as a PNG at ``out_path`` when given; returned."""
    img = figure_image(curves_figure_of_run(metrics_path, keys, per_row, noun_start, panel_px))
    if out_path:
        img.save(out_path)
    return img


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='pgseg-demo', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='demo_cpu', help='a shipped config by name, or a YAML path')
    parser.add_argument('--data', default='data/demo')
    parser.add_argument('--out', default='runs/demo')
    parser.add_argument('--minutes', type=float, default=None,
                        help="a guard on training's wall time: past it, training stops cleanly with a checkpoint and "
                             "the summary says the run is not the demo's (default: the config's "
                             'train.time_limit_minutes, 45)')
    parser.add_argument('--num-samples', type=int, default=20000)
    parser.add_argument('--nproc', type=int, default=2)
    parser.add_argument('--min-radius', type=float, default=DEMO_RADIUS[0],
                        help='smallest object radius in the synthetic scenes, as a fraction of the image side')
    parser.add_argument('--max-radius', type=float, default=DEMO_RADIUS[1],
                        help='largest object radius in the synthetic scenes, as a fraction of the image side')
    parser.add_argument('overrides', nargs='*', help='key=value overrides of the training config')
    args = parser.parse_args(argv)
    return run_command('pgseg-demo', lambda: run_demo(args), (ConfigError, ValueError))


def run_demo(args) -> None:
    """The four stages of the demo, as the command's options say."""
    start = time.time()
    cfg = load_config(args.config, args.overrides)
    size = cfg.data.img_size
    protocol = get_protocol('pgseg', short_side=size, crop_size=size, stride=size // 2)
    print(f'[1/4] synthetic data in {args.data}', flush=True)
    prepare_data(args.data, args.num_samples, SceneConfig(size=size, min_radius=args.min_radius,
                                                          max_radius=args.max_radius))

    print('[2/4] the untrained model', flush=True)
    torch.manual_seed(cfg.train.seed)
    untrained = build_model(cfg.model).eval()
    save_checkpoint(os.path.join(args.out, 'untrained'), untrained, cfg)
    before = evaluate(untrained, args.data, protocol)

    minutes = args.minutes if args.minutes is not None else cfg.train.time_limit_minutes
    global_batch = cfg.data.batch_size * args.nproc * cfg.train.grad_accum_steps
    planned = cfg.train.epochs * (cfg.train.steps_per_epoch or args.num_samples // global_batch)
    if cfg.train.max_steps is not None:
        planned = min(planned, cfg.train.max_steps)
    print(f'[3/4] training {planned} steps ({args.nproc} processes; a guard stops it after {minutes} minutes)',
          flush=True)
    train_dir = os.path.join(args.out, 'train')
    last_shard = (args.num_samples - 1) // 1000  # 1000 samples per shard
    shards = os.path.join(args.data, 'shards', f'{{00000..{last_shard:05d}}}.tar')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(args.nproc), '-m', 'pgseg.train',
           '--config', args.config, f'train.output_dir={train_dir}', f'train.time_limit_minutes={minutes}',
           f"data.sources=[{{name: synthetic, pattern: '{shards}'}}]", *args.overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.nproc)))
    subprocess.run(cmd, check=True, env=env)
    ckpt = find_latest(train_dir)
    trained = load_model(ckpt)

    print(f'[4/4] zero-shot evaluation of {ckpt}', flush=True)
    after = evaluate(trained, args.data, protocol)
    test_set = build_dataset('voc', os.path.join(args.data, 'eval', 'test'))
    evaluate_segmentation(trained, test_set, protocol, bg_thresh=after['bg_thresh'], limit=8, num_visuals=8,
                          progress=False)['visual_grid'].save(os.path.join(args.out, 'grid.png'))
    plot_curves(os.path.join(train_dir, 'metrics.jsonl'), os.path.join(args.out, 'curves.png'),
                noun_start=noun_losses_start(cfg.model))
    state = torch.load(os.path.join(ckpt, 'train_state.pt'), weights_only=True)['run']
    summary = {
        'miou': after['test']['miou'], 'recognition': after['test']['recognition'],
        'miou_untrained': before['test']['miou'], 'recognition_untrained': before['test']['recognition'],
        'miou_unseen_pairs': after['unseen_pairs']['miou'], 'recognition_unseen_pairs':
            after['unseen_pairs']['recognition'],
        # the same models under the second protocol: background kinds as extra prompts (BACKGROUND_WORDS)
        'miou_background_words': after['background_words']['test']['miou'],
        'miou_background_words_untrained': before['background_words']['test']['miou'],
        'miou_unseen_pairs_background_words': after['background_words']['unseen_pairs']['miou'],
        'distinct_groups_per_image': after['test']['distinct_groups_per_image'],
        'group_oracle_miou': after['test']['group_oracle_miou'],
        'distinct_groups_per_image_untrained': before['test']['distinct_groups_per_image'],
        'group_oracle_miou_untrained': before['test']['group_oracle_miou'],
        'object_groups_named': after['test']['object_groups_named'],
        'background_group_leak': after['test']['background_group_leak'],
        'object_groups_named_untrained': before['test']['object_groups_named'],
        'background_group_leak_untrained': before['test']['background_group_leak'],
        'num_images': after['test']['num_images'], 'num_images_unseen_pairs': after['unseen_pairs']['num_images'],
        'protocol': _describe(protocol, after['bg_thresh']),
        'protocol_background_words': _describe(replace(protocol, background_words=BACKGROUND_WORDS),
                                               after['background_words']['bg_thresh']),
        'bg_thresh': after['bg_thresh'], 'training_steps': state['step'], 'planned_steps': planned,
        'stopped_by_time_guard': state['step'] < planned, 'precision': _precision(train_dir), 'checkpoint': ckpt,
        'per_class_iou': after['test']['per_class_iou'], 'minutes_total': (time.time() - start) / 60,
        'untrained': before, 'trained': after,
    }
    with open(os.path.join(args.out, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    rows = [('mIoU (test)', 'miou_untrained', 'miou'),
            ('mIoU, background words', 'miou_background_words_untrained', 'miou_background_words'),
            ('recognition', 'recognition_untrained', 'recognition'),
            ('distinct groups / image', 'distinct_groups_per_image_untrained', 'distinct_groups_per_image'),
            ('group-oracle mIoU', 'group_oracle_miou_untrained', 'group_oracle_miou'),
            ('object groups named %', 'object_groups_named_untrained', 'object_groups_named'),
            ('background-group leak %', 'background_group_leak_untrained', 'background_group_leak')]
    print(f"\n{'':<26}{'untrained':>10}{'trained':>10}")
    for name, a, b in rows:
        print(f'{name:<26}{summary[a]:>10.1f}{summary[b]:>10.1f}')
    print(f"{'mIoU (unseen pairs)':<26}{before['unseen_pairs']['miou']:>10.1f}{summary['miou_unseen_pairs']:>10.1f}")
    print(f"\n{summary['training_steps']} training steps ({summary['precision']}); {summary['protocol']}\nwrote "
          f'{args.out}/summary.json, curves.png, grid.png ({summary["minutes_total"]:.1f} minutes in all)')
    if summary['stopped_by_time_guard']:
        print(f'\nNOTE: the time guard ({minutes} minutes) stopped training at step {state["step"]} of {planned}: '
              'these figures are not the demo\'s. Give it more time (--minutes) or a faster machine.')


def _precision(train_dir: str) -> str:
    """The precision the training resolved (its env.json), or 'unknown'."""
    try:
        with open(os.path.join(train_dir, 'env.json')) as f:
            return str(json.load(f).get('precision', 'unknown'))
    except (OSError, ValueError):
        return 'unknown'


if __name__ == '__main__':
    sys.exit(main())
