"""``pgseg-prompt-train``: learn MVP-SEG prompts on the seen classes of a labelled dataset, with the backbone frozen.

    pgseg-prompt-train --config configs/mvpseg_voc_15_5.yaml backbone.name=RN50 backbone.pretrained=/path/RN50.pt
    torchrun --nproc_per_node 8 -m pgseg.mvpseg.train --config configs/mvpseg_coco_stuff_156_15.yaml

The trainer's habits are pretraining's: one process or ``torchrun`` (gradients of the few prompt tensors are
all-reduced by hand; the frozen backbone needs no DDP), bf16 autocast where native (``train.precision: auto``),
atomic ``ckpt-<step>`` directories with the optimizer, schedule, run state and RNG, ``checkpoint.resume: auto``, a
time limit, metrics.jsonl and wandb, a progress bar. At the end ``prompts.pt`` is written and the validation split
is evaluated over seen and unseen classes with the learned prompts and with the hand-written templates;
``results.json`` holds both.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import find_latest, prune_checkpoints
from ..config import ConfigError, config_to_dict, config_to_yaml
from ..distributed import (
    all_ranks_true,
    broadcast_flag,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    run_command,
)
from ..engine import RunState, autocast_for, capture_rng, restore_rng
from ..eval.datasets import LayoutError, build_dataset
from ..metrics import MetricsLogger
from ..optim import build_scheduler
from ..precision import resolve_precision
from ..prompts import get_templates
from .backbones import build_backbone
from .config import PromptTrainConfig, load_prompt_config
from .data import EpochBatchSampler, SeenPixelDataset
from .inference import SlideSettings, evaluate_seen_unseen
from .learner import MultiViewPrompts, TemplateClassifier, presence_loss, segmentation_loss
from .prompt_file import save_prompts
from .protocols import resolve_split

log = logging.getLogger('pgseg.mvpseg')

__all__ = ['run', 'main', 'prompt_losses']


def prompt_losses(learner: MultiViewPrompts, backbone, images: torch.Tensor, labels: torch.Tensor,
                  names: list[str], cfg: PromptTrainConfig) -> dict[str, torch.Tensor]:
    """images: [B, 3, S, S] normalised; labels [B, S, S] (seen positions or 255) -> weighted losses and ``loss``."""
    with torch.no_grad():
        feats = backbone.dense_features(images)  # the frozen backbone: no graph kept
    text = learner.class_embeddings(backbone, names)
    logits = learner(feats, text)
    out = {'seg': segmentation_loss(logits, labels), 'oc': learner.orthogonality()}
    total = cfg.loss.seg_weight * out['seg'] + cfg.loss.oc_weight * out['oc']
    if learner.cfg.gpr:
        out['cls'] = presence_loss(logits, labels, len(names))
        total = total + cfg.loss.cls_weight * out['cls']
    out['loss'] = total
    return out


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _save_checkpoint(run_dir: str, step: int, learner, cfg, optimizer, scheduler, state: RunState, meta: dict,
                     keep_last: int) -> str:
    ranks = [None] * get_world_size()
    mine = capture_rng()
    if get_world_size() > 1:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    path = os.path.join(run_dir, f'ckpt-{step:08d}')
    if is_main_process():
        tmp = tempfile.mkdtemp(dir=run_dir, prefix='.ckpt-tmp-')
        save_prompts(os.path.join(tmp, 'prompts.pt'), learner, cfg.backbone, meta)
        torch.save({'run': state.state_dict(), 'optimizer': optimizer.state_dict(),
                    'scheduler': scheduler.state_dict(), 'ranks': ranks, 'world_size': get_world_size()},
                   os.path.join(tmp, 'train_state.pt'))
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
        prune_checkpoints(run_dir, keep_last)
    if get_world_size() > 1:
        dist.barrier()
    return path


def run(cfg: PromptTrainConfig) -> dict:
    device, _ = init_distributed()
    rank, world = get_rank(), get_world_size()
    # 'auto' -> bf16 where native, else fp32 (pgseg.precision)
    precision = resolve_precision(cfg.train.precision, device, gpu_fallback='fp32')
    run_dir = os.path.abspath(cfg.train.output_dir)
    os.makedirs(run_dir, exist_ok=True)
    if is_main_process():
        with open(os.path.join(run_dir, 'config.yaml'), 'w') as f:
            f.write(config_to_yaml(cfg))
    torch.manual_seed(cfg.train.seed)

    backbone = build_backbone(cfg.backbone).to(device)
    train_set = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.train_split)
    classes = list(train_set.classes)
    seen, unseen = resolve_split(cfg.data.protocol, classes, cfg.data.unseen)
    seen_names = [classes[i] for i in seen]
    meta = {'dataset': cfg.data.dataset, 'protocol': cfg.data.protocol, 'classes': classes,
            'seen': seen_names, 'unseen': [classes[i] for i in unseen],
            'slide': {'short_side': cfg.eval.short_side, 'crop_size': cfg.eval.crop_size, 'stride': cfg.eval.stride}}
    learner = MultiViewPrompts(cfg.prompts, backbone).to(device)
    params = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.warmup_lr,
                                cfg.optim.min_lr)
    state = RunState()
    resume = find_latest(run_dir, marker='train_state.pt') if cfg.checkpoint.resume == 'auto' else cfg.checkpoint.resume
    if resume:
        if not os.path.isfile(os.path.join(resume, 'train_state.pt')):
            raise ConfigError(f'checkpoint.resume={resume!r}: no train_state.pt there')
        saved = torch.load(os.path.join(resume, 'train_state.pt'), map_location='cpu', weights_only=True)
        prompts = torch.load(os.path.join(resume, 'prompts.pt'), map_location='cpu', weights_only=True)
        learner.load_state_dict(prompts['state_dict'])
        optimizer.load_state_dict(saved['optimizer'])
        scheduler.load_state_dict(saved['scheduler'])
        state = RunState.from_state(saved['run'])
        if saved['world_size'] == world:
            restore_rng(saved['ranks'][rank])
        log.info('resumed from %s at step %d', resume, state.step)

    dataset = SeenPixelDataset(train_set, seen, cfg.data.crop_size, cfg.data.base_size, cfg.data.scale_range,
                               seed=cfg.train.seed)
    per_epoch = EpochBatchSampler(len(train_set), cfg.data.batch_size, rank, world).batches_per_epoch
    sampler = EpochBatchSampler(len(train_set), cfg.data.batch_size, rank, world, cfg.train.seed,
                                start_epoch=state.step // per_epoch, start_batch=state.step % per_epoch)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == 'cuda', prefetch_factor=4 if cfg.data.num_workers else None)
    logger = MetricsLogger(run_dir, enabled=is_main_process(), wandb_mode=cfg.log.wandb_mode,
                           project=cfg.log.wandb_project, name=cfg.log.wandb_name, tags=cfg.log.wandb_tags,
                           config=json.loads(json.dumps(config_to_dict(cfg))), resume_id=state.wandb_id)
    state.wandb_id = logger.wandb_id or state.wandb_id
    if is_main_process():
        log.info('%d seen / %d unseen classes of %s (%s); %d training images, %d steps, %d trainable values, '
                 'backbone %s, world %d', len(seen), len(unseen), cfg.data.dataset, cfg.data.protocol, len(train_set),
                 cfg.train.steps, sum(p.numel() for p in params), cfg.backbone.kind, world)

    start, last = time.time(), time.time()
    bar = tqdm(total=cfg.train.steps, initial=state.step, disable=not is_main_process(), unit='step',
               dynamic_ncols=True)
    scheduler.step_update(state.step)
    last_step = min(cfg.train.steps, cfg.train.max_steps or cfg.train.steps)
    done = state.step >= last_step
    batches = iter(loader)
    while not done:
        images, labels = next(batches)
        images = backbone.normalize(images.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(device, precision):
            losses = prompt_losses(learner, backbone, images, labels, seen_names, cfg)
        losses['loss'].backward()
        if world > 1:
            _all_reduce_grads(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad or math.inf)
        ok = all_ranks_true(bool(torch.isfinite(losses['loss']).item() and torch.isfinite(grad_norm).item()))
        if ok:
            optimizer.step()
        state.count_step(ok, 20)
        state.step += 1
        scheduler.step_update(state.step)
        bar.update(1)
        if state.step % cfg.log.every_steps == 0 or state.step == 1:
            now = time.time()
            values = {f'train/{k}': float(v.detach()) for k, v in losses.items()}
            values.update({'train/lr': optimizer.param_groups[0]['lr'], 'train/grad_norm': float(grad_norm),
                           'train/fusion_scale': float(learner.log_tau1.detach().exp()),
                           'train/step_time_s': (now - last) / (1 if state.step == 1 else cfg.log.every_steps)})
            if learner.cfg.gpr:
                values['train/gpr_temperature'] = float(learner.log_tau2.detach().exp())
            last = now
            logger.log(state.step, values)
            bar.set_postfix(loss=f"{values['train/loss']:.3f}", seg=f"{values['train/seg']:.3f}")
            limit = cfg.train.time_limit_minutes
            if limit is not None and broadcast_flag((time.time() - start) / 60 >= limit):
                log.info('time limit of %.1f minutes reached at step %d', limit, state.step)
                done = True
        if state.step % cfg.checkpoint.every_steps == 0:
            _save_checkpoint(run_dir, state.step, learner, cfg, optimizer, scheduler, state, meta,
                             cfg.checkpoint.keep_last)
        done = done or state.step >= last_step
    bar.close()
    final = _save_checkpoint(run_dir, state.step, learner, cfg, optimizer, scheduler, state, meta,
                             cfg.checkpoint.keep_last)
    if is_main_process():
        shutil.copyfile(os.path.join(final, 'prompts.pt'), os.path.join(run_dir, 'prompts.pt'))
    results = evaluate_run(cfg, backbone, learner, unseen, device, logger, state.step, precision)
    if is_main_process():
        results['prompts'] = os.path.join(run_dir, 'prompts.pt')
        with open(os.path.join(run_dir, 'results.json'), 'w') as f:
            json.dump(results, f, indent=1)
        print(format_comparison(results))
        print(f'wrote {run_dir}/prompts.pt and results.json')
    logger.close()
    return results


@torch.no_grad()
def evaluate_run(cfg: PromptTrainConfig, backbone, learner, unseen: list[int], device, logger=None,
                 step: int = 0, precision: str | None = None) -> dict:
    """The validation split over seen and unseen classes: learned prompts, and (``eval.baseline``) templates;
    ``precision`` as resolved by the caller (default: ``cfg.train.precision`` resolved here)."""
    precision = precision or resolve_precision(cfg.train.precision, device, gpu_fallback='fp32')
    val = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.val_split)
    e = cfg.eval
    settings = SlideSettings(e.short_side, e.long_side, e.crop_size, e.stride)
    dtype = torch.bfloat16 if precision == 'bf16' else None
    learner.eval()
    out = {'dataset': cfg.data.dataset, 'split': cfg.data.val_split, 'protocol': cfg.data.protocol,
           'settings': vars(settings), 'learned': evaluate_seen_unseen(backbone, learner, val, unseen, settings,
                                                                      device, dtype, e.limit, desc='learned prompts')}
    if e.baseline:
        baseline = TemplateClassifier(get_templates(e.templates), backbone.logit_scale)
        out['templates'] = evaluate_seen_unseen(backbone, baseline, val, unseen, settings, device, dtype, e.limit,
                                                desc=f'templates ({e.templates})')
        out['templates']['template_set'] = e.templates
    learner.train()
    if logger is not None:
        logger.log(step, {f'eval/{kind}/{m}': out[kind][m] for kind in ('learned', 'templates') if kind in out
                          for m in ('miou_seen', 'miou_unseen', 'hiou', 'miou')})
    return out


def format_comparison(results: dict) -> str:
    head = f"{'classifier':<28}{'mIoU(S)':>9}{'mIoU(U)':>9}{'hIoU':>8}{'mIoU':>8}"
    rows = [f"{results['dataset']} {results['split']} ({results['learned']['num_images']} images), protocol "
            f"{results['protocol']}; unseen: {', '.join(results['learned']['unseen_classes'])}", head, '-' * len(head)]
    for kind, label in (('templates', f"templates ({results.get('templates', {}).get('template_set', '')})"),
                        ('learned', 'learned prompts (MVP-SEG)')):
        if kind in results:
            r = results[kind]
            rows.append(f"{label:<28}{r['miou_seen']:>9.2f}{r['miou_unseen']:>9.2f}{r['hiou']:>8.2f}{r['miou']:>8.2f}")
    return '\n'.join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='pgseg-prompt-train', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', required=True, help='YAML config (configs/mvpseg_*.yaml)')
    parser.add_argument('overrides', nargs='*', help='key=value overrides, e.g. train.steps=500')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    def body() -> None:
        run(load_prompt_config(args.config, args.overrides))

    return run_command('pgseg-prompt-train', body, (ConfigError, LayoutError, FileNotFoundError, ValueError))


if __name__ == '__main__':
    sys.exit(main())
