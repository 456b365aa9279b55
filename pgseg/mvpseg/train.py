"""MVP-SEG prompt training, the library behind ``pgseg-prompt-train``: learn prompts on the seen classes of a
labelled dataset, with the backbone frozen.

The trainer's habits are pretraining's, through the same harness (:mod:`pgseg.training`): one process or
``torchrun`` (gradients of the few prompt tensors are all-reduced by hand; the frozen backbone needs no DDP), bf16
autocast where native (``train.precision: auto``), atomic ``ckpt-<step>`` directories with the optimizer, schedule,
run state and RNG, ``checkpoint.resume: auto``, a time limit, metrics.jsonl and wandb, a progress bar. At the end
``prompts.pt`` is written and the validation split is evaluated over seen and unseen classes with the learned
prompts and with the hand-written templates; ``results.json`` holds both.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil

import torch

from ..checkpoint.format import read_checkpoint_file, read_train_state
from ..eval.datasets import build_dataset
from ..eval.templates import get_templates
from ..runtime.distributed import (
    all_ranks_true,
    all_reduce_grads_mean,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from ..runtime.precision import resolve_precision
from ..training.checkpoints import (
    CheckpointWriter,
    claim_run_directory,
    load_resume_point,
    restore_rank,
)
from ..training.loop import Harness, LoopSettings, start_run_record
from ..training.optim import build_scheduler
from ..training.state import RunState
from ..training.step import autocast_for
from .backbones import build_backbone
from .config import PromptTrainConfig
from .data import CropDataset, crop_loader, seen_only_labels
from .inference import SlideSettings, evaluate_seen_unseen
from .learner import MultiViewPrompts, TemplateClassifier, presence_loss, segmentation_loss
from .prompt_file import save_prompts
from .splits import resolve_split

log = logging.getLogger('pgseg.mvpseg')

__all__ = ['run', 'prompt_losses', 'evaluate_run', 'format_comparison']


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


def run(cfg: PromptTrainConfig) -> dict:
    """Learn the prompts as ``cfg`` says, write ``prompts.pt`` and evaluate them; returns the evaluation results."""
    device, _ = init_distributed()
    # 'auto' -> bf16 where native, else fp32 (pgseg.runtime.precision)
    precision = resolve_precision(cfg.train.precision, device, gpu_fallback='fp32')
    run_dir = os.path.abspath(cfg.train.output_dir)
    with claim_run_directory(run_dir):  # one live run per directory; temporaries of dead ones removed
        return _run(cfg, device, precision, run_dir)


def _run(cfg: PromptTrainConfig, device: torch.device, precision: str, run_dir: str) -> dict:
    rank, world = get_rank(), get_world_size()
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
    point = load_resume_point(cfg.checkpoint.resume, run_dir, _read_resume_point)
    if point:
        resume, (saved, prompts) = point
        learner.load_state_dict(prompts['state_dict'])
        optimizer.load_state_dict(saved['optimizer'])
        scheduler.load_state_dict(saved['scheduler'])
        state = RunState.from_state(saved['run'])
        restore_rank(saved, rank, world)
        log.info('resumed from %s at step %d', resume, state.step)

    dataset = CropDataset(train_set, seen_only_labels(seen), cfg.data.crop_size, cfg.data.base_size,
                          cfg.data.scale_range, seed=cfg.train.seed)
    loader = crop_loader(dataset, cfg.data.batch_size, rank, world, cfg.train.seed, state.step, cfg.data.num_workers,
                         device)
    # the run's record is written once the run is known to start: a failed start leaves an existing run's alone
    logger = start_run_record(run_dir, cfg, precision, state)
    if is_main_process():
        log.info('%d seen / %d unseen classes of %s (%s); %d training images, %d steps, %d trainable values, '
                 'backbone %s, world %d', len(seen), len(unseen), cfg.data.dataset, cfg.data.protocol, len(train_set),
                 cfg.train.steps, sum(p.numel() for p in params), cfg.backbone.kind, world)
    writer = CheckpointWriter(run_dir, cfg.checkpoint.keep_last,
                              lambda folder: save_prompts(os.path.join(folder, 'prompts.pt'), learner, cfg.backbone,
                                                          meta))
    settings = LoopSettings(cfg.train.steps, cfg.train.max_steps, cfg.train.time_limit_minutes, cfg.log.every_steps,
                            cfg.train.max_nonfinite_steps)
    harness = Harness(run_dir, settings, writer, logger, state)

    def train_state() -> dict:
        return {'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict()}

    scheduler.step_update(state.step)
    batches = iter(loader)
    while not harness.should_stop():
        images, labels = next(batches)
        images = backbone.normalize(images.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        losses, grad_norm, applied = _prompt_step(learner, backbone, params, optimizer, images, labels, seen_names,
                                                  cfg, precision)
        harness.step_done(applied)
        scheduler.step_update(state.step)
        if harness.log_due():
            values = {f'train/{k}': float(v.detach()) for k, v in losses.items()}
            values.update({'train/lr': optimizer.param_groups[0]['lr'], 'train/grad_norm': float(grad_norm),
                           'train/fusion_scale': float(learner.log_tau1.detach().exp())})
            if learner.cfg.gpr:
                values['train/gpr_temperature'] = float(learner.log_tau2.detach().exp())
            harness.log(values, {'loss': f"{values['train/loss']:.3f}", 'seg': f"{values['train/seg']:.3f}"})
        if harness.due(cfg.checkpoint.every_steps):
            harness.save(train_state())
    final = harness.finish(train_state())
    if is_main_process():
        shutil.copyfile(os.path.join(final, 'prompts.pt'), os.path.join(run_dir, 'prompts.pt'))
    results = evaluate_run(cfg, backbone, learner, unseen, device, logger, state.step, precision)
    if is_main_process():
        results['prompts'] = os.path.join(run_dir, 'prompts.pt')
        with open(os.path.join(run_dir, 'results.json'), 'w') as f:
            json.dump(results, f, indent=1)
        print(format_comparison(results))
        print(f'wrote {run_dir}/prompts.pt and results.json')
    harness.close()
    return results


def _read_resume_point(path: str) -> tuple[dict, dict]:
    """(training state, prompts payload) of checkpoint ``path``; a damaged file is a CheckpointError naming it."""
    prompts = read_checkpoint_file(path, 'prompts.pt',
                                   lambda f: torch.load(f, map_location='cpu', weights_only=True))
    return read_train_state(path), prompts


def _prompt_step(learner, backbone, params, optimizer, images, labels, seen_names, cfg, precision):
    """One step of prompt learning -> (losses, gradient norm, applied): the prompts' gradients averaged over ranks
    by hand (the frozen backbone needs no DDP), clipped, and applied only if finite on every rank."""
    optimizer.zero_grad(set_to_none=True)
    with autocast_for(images.device, precision):
        losses = prompt_losses(learner, backbone, images, labels, seen_names, cfg)
    losses['loss'].backward()
    all_reduce_grads_mean(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad or math.inf)
    ok = all_ranks_true(bool(torch.isfinite(losses['loss']).item() and torch.isfinite(grad_norm).item()))
    if ok:
        optimizer.step()
    return losses, grad_norm, ok


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
