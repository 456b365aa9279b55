"""``pgseg-train --config FILE [key=value ...]``, also under ``torchrun`` (one or many nodes; NCCL on GPUs, gloo on
the CPU). Composes the builders; the step itself is :func:`pgseg.engine.train_step`.

Resume: ``checkpoint.resume=auto`` (the default) continues from the newest ``ckpt-<step>`` in ``train.output_dir``
with model, optimizer, scheduler, scaler, step, every rank's RNG and data position, so an interrupted run (a crash,
``kill -9``, a torchrun elastic restart) ends with the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import __version__
from .checkpoint import (
    CheckpointError,
    find_latest,
    load_checkpoint,
    load_model,
    load_state_into,
    prune_checkpoints,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig, config_to_dict, config_to_yaml, load_config
from .data.text import CaptionTokenizer, trim_padding
from .data.transforms import TrainTransform, normalize_batch
from .data.webdataset import StreamPosition, TrainStream, build_train_loader, expand_source
from .distributed import (
    broadcast_flag,
    broadcast_int,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    run_command,
)
from .engine import RunState, capture_rng, restore_rng, train_step
from .eval.visualize import group_map_grid
from .metrics import MetricsLogger
from .models import build_model
from .optim import build_optimizer, build_scheduler, scaled_lrs, shorten_schedule
from .precision import resolve_precision
from .prompts import get_templates

log = logging.getLogger('pgseg.train')
COMPILE_BACKEND = 'inductor'  # torch.compile's backend under train.compile (the tests swap in a faster one)


def environment_info(world: int) -> dict:
    def version(name):
        try:
            return __import__(name).__version__
        except Exception:
            return None
    try:
        rev = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except Exception:
        rev = None
    return {'pgseg': __version__, 'git_revision': rev, 'python': sys.version.split()[0], 'torch': torch.__version__,
            'timm': version('timm'), 'open_clip': version('open_clip'), 'webdataset': version('webdataset'),
            'world_size': world, 'host': platform.node(), 'cuda_devices': torch.cuda.device_count(),
            'command': sys.argv}


def resolve_resume(resume: str | None, run_dir: str) -> str | None:
    if resume in (None, '', 'none', 'null'):
        return None
    if resume == 'auto':
        return find_latest(run_dir)
    if not os.path.isdir(resume):
        raise CheckpointError(f'checkpoint.resume={resume!r}: no such checkpoint directory')
    return resume


class CheckpointWriter:
    """Gathers every rank's RNG and data position, then rank 0 writes ``ckpt-<step>`` and prunes old ones."""

    def __init__(self, run_dir: str, keep_last: int):
        self.run_dir, self.keep_last = run_dir, keep_last

    def save(self, model, cfg: TrainConfig, optimizer, scheduler, scaler, state: RunState,
             position: StreamPosition, name: str | None = None) -> None:
        mine = {'rng': capture_rng(), 'position': position.state_dict()}
        ranks = [None] * get_world_size()
        if get_world_size() > 1:
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if is_main_process():
            train_state = {'run': state.state_dict(), 'optimizer': optimizer.state_dict(),
                           'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict() if scaler else None,
                           'ranks': ranks, 'world_size': get_world_size()}
            path = os.path.join(self.run_dir, name or f'ckpt-{state.step:08d}')
            save_checkpoint(path, model, cfg, train_state=train_state)
            prune_checkpoints(self.run_dir, self.keep_last)
        if get_world_size() > 1:
            dist.barrier()


def _stop_requested(state: RunState, cfg: TrainConfig, start: float, total_steps: int) -> bool:
    """Step limits are the same on every rank. The time limit differs by rank, so rank 0 decides and broadcasts, and
    only every ``log.every_steps`` steps: no collective or host sync on the other steps."""
    if state.step >= total_steps or (cfg.train.max_steps is not None and state.step >= cfg.train.max_steps):
        return True
    if cfg.train.time_limit_minutes is None or state.step % cfg.log.every_steps:
        return False
    return broadcast_flag(time.time() - start > 60 * cfg.train.time_limit_minutes)


def run(cfg: TrainConfig, eval_hook: Callable | None = None) -> RunState:
    device, local_rank = init_distributed()
    rank, world = get_rank(), get_world_size()
    precision = resolve_precision(cfg.train.precision, device)  # 'auto' -> bf16 where native (pgseg.precision)
    run_dir = os.path.abspath(cfg.train.output_dir)
    os.makedirs(run_dir, exist_ok=True)
    if is_main_process():
        with open(os.path.join(run_dir, 'config.yaml'), 'w') as f:
            f.write(config_to_yaml(cfg))
        with open(os.path.join(run_dir, 'env.json'), 'w') as f:
            json.dump({**environment_info(world), 'precision': precision}, f, indent=1)
    torch.manual_seed(cfg.train.seed + rank)

    if cfg.train.fit_schedule_to_time_limit and cfg.train.time_limit_minutes is None:
        raise ConfigError('train.fit_schedule_to_time_limit=true needs train.time_limit_minutes (the budget the '
                          'schedule is fitted to)')
    # data
    if not cfg.data.sources:
        raise ConfigError('data.sources is empty: list at least one shard source (name, pattern)')
    sources = [expand_source(s.name, s.pattern, s.length, s.weight) for s in cfg.data.sources]
    accum = cfg.train.grad_accum_steps
    global_batch = cfg.data.batch_size * world * accum
    steps_per_epoch = cfg.train.steps_per_epoch or sum(s.length for s in sources) // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f'{sum(s.length for s in sources)} samples make no step of {global_batch} '
                          f'(data.batch_size x world size x train.grad_accum_steps)')
    total_steps = cfg.train.epochs * steps_per_epoch
    tokenizer = CaptionTokenizer(cfg.model.text.context_length, cfg.model.multi_label, get_templates('full'))
    stream = TrainStream(sources, TrainTransform(cfg.data.img_size, cfg.data.augment, cfg.data.crop_scale),
                         tokenizer, cfg.data.batch_size, steps_per_epoch * accum, seed=cfg.data.seed,
                         resampled=cfg.data.resampled, shuffle_buffer=cfg.data.shuffle_buffer, rank=rank,
                         world_size=world, num_workers=cfg.data.num_workers)
    loader = build_train_loader(stream, cfg.data.num_workers)

    # model, optimizer, schedule
    model = build_model(cfg.model)
    if cfg.checkpoint.init_from:
        init = load_model(cfg.checkpoint.init_from, npr_variant=cfg.model.npr.variant)
        report = load_state_into(model, init.state_dict(), source=cfg.checkpoint.init_from, allow_npr_fresh=True,
                                 allow_npr_ignored=True)
        log.info('initialised from %s: %s', cfg.checkpoint.init_from, report.summary())
    model.to(device)
    if device.type == 'cuda' and world > 1:
        model.convert_sync_batchnorm()
    if cfg.train.compile:
        model.compile_losses(backend=COMPILE_BACKEND)
    lr, warmup_lr, min_lr = scaled_lrs(cfg.optim, global_batch)
    optimizer = build_optimizer(model, cfg.optim, lr)
    scheduler = build_scheduler(optimizer, total_steps, cfg.train.warmup_epochs * steps_per_epoch, warmup_lr,
                                min_lr, cfg.optim.warmup_prefix)
    scaler = torch.amp.GradScaler('cuda') if precision == 'fp16' else None
    state, position = RunState(), StreamPosition()
    resume = resolve_resume(cfg.checkpoint.resume, run_dir)
    if resume:
        weights, _, saved = load_checkpoint(resume)
        load_state_into(model, weights, source=resume)
        model.to(device)
        optimizer.load_state_dict(saved['optimizer'])
        scheduler.load_state_dict(saved['scheduler'])
        if scaler is not None and saved.get('scaler'):
            scaler.load_state_dict(saved['scaler'])
        state = RunState.from_state(saved['run'])
        if saved['world_size'] == world:
            restore_rng(saved['ranks'][rank]['rng'])
            position = StreamPosition.from_state(saved['ranks'][rank]['position'])
        else:  # another world size: the data restarts at the current epoch's beginning
            log.warning('resuming %d ranks from a %d-rank checkpoint: RNG and data position restart at epoch %d',
                        world, saved['world_size'], state.epoch)
            position = StreamPosition(epoch=state.epoch)
        log.info('resumed from %s at step %d (epoch %d)', resume, state.step, state.epoch)
        total_steps = state.total_steps or total_steps  # a schedule fitted to the time limit keeps its length
    # gradients as views of the communication buckets (no copy) and a static graph (the same parameters are used
    # every step): about 10% of a small model's CPU step under gloo
    ddp = (DistributedDataParallel(model, device_ids=[local_rank] if device.type == 'cuda' else None,
                                   find_unused_parameters=cfg.train.find_unused_parameters,
                                   gradient_as_bucket_view=True, static_graph=not cfg.train.find_unused_parameters)
           if world > 1 else model)
    if eval_hook is None and cfg.eval.every_steps > 0:
        from .evaluate import build_in_training_evaluator
        eval_hook = build_in_training_evaluator(cfg.eval, device)
    writer = CheckpointWriter(run_dir, cfg.checkpoint.keep_last)
    logger = MetricsLogger(run_dir, enabled=is_main_process(), wandb_mode=cfg.log.wandb_mode,
                           project=cfg.log.wandb_project, name=cfg.log.wandb_name, tags=cfg.log.wandb_tags,
                           config=json.loads(json.dumps(config_to_dict(cfg))), resume_id=state.wandb_id)
    state.wandb_id = logger.wandb_id or state.wandb_id
    log.info('%d steps (%d per epoch), global batch %d, %d parameters, device %s, world %d', total_steps,
             steps_per_epoch, global_batch, sum(p.numel() for p in model.parameters()), device, world)
    _loop(cfg, ddp, model, stream, loader, optimizer, scheduler, scaler, state, position, writer, logger, device,
          total_steps, steps_per_epoch, eval_hook, precision)
    logger.close()
    return state


def _loop(cfg, ddp, model, stream, loader, optimizer, scheduler, scaler, state, position, writer, logger, device,
          total_steps, steps_per_epoch, eval_hook, precision):
    start, skip_base = time.time(), dict(state.skipped)
    bar = tqdm(total=total_steps, initial=state.step, disable=not is_main_process(), unit='step', dynamic_ncols=True)
    fixed_batch, micro, last_time, worker_skips, pending = None, [], time.time(), {}, []
    fit = cfg.train.fit_schedule_to_time_limit and state.total_steps is None and state.step < FIT_FROM
    probe_start = None
    scheduler.step_update(state.step)
    done = _stop_requested(state, cfg, start, total_steps)
    while not done:
        stream.position = position
        position.epoch = state.epoch
        for images, tokens, info in loader:
            position.update(info)
            worker_skips[info['worker']] = info['skipped']
            tokens = trim_padding(tokens)  # on the CPU: no host sync; exact under the causal mask
            micro.append((normalize_batch(images.to(device, non_blocking=True)), tokens.to(device, non_blocking=True)))
            if fixed_batch is None:
                fixed_batch = micro[-1][0][:8]
            if len(micro) < cfg.train.grad_accum_steps:
                continue
            model.train()
            model.step = state.step  # the noun losses' start (model.noun_losses_start_step)
            result = train_step(ddp, micro, optimizer, precision, cfg.optim.clip_grad, scaler)
            micro = []
            pending.append(result.applied)  # read at log / checkpoint time: no host sync per step
            state.step += 1
            scheduler.step_update(state.step)
            if fit and state.step == FIT_FROM:
                probe_start = time.time()
            if fit and state.step == FIT_AT:
                total_steps = _fit_schedule(cfg, scheduler, state, start, probe_start, total_steps, steps_per_epoch)
                bar.total, fit = total_steps, False
            state.skipped = _sum_skips(skip_base, worker_skips)
            bar.update(1)
            due = state.step % cfg.checkpoint.every_steps == 0 or (cfg.eval.every_steps and
                                                                  state.step % cfg.eval.every_steps == 0)
            if due or state.step % cfg.log.every_steps == 0 or state.step == 1:
                for applied in pending:  # non-finite steps, in order: a streak raises NonFiniteLossError
                    state.count_step(bool(applied), cfg.train.max_nonfinite_steps)
                pending = []
            if state.step % cfg.log.every_steps == 0 or state.step == 1:
                now = time.time()
                step_time = (now - last_time) / (1 if state.step == 1 else cfg.log.every_steps)
                last_time = now
                global_batch = cfg.data.batch_size * cfg.train.grad_accum_steps * get_world_size()
                _log_step(logger, bar, state, result, optimizer, model, step_time, global_batch)
            if cfg.log.group_maps_every_steps and state.step % cfg.log.group_maps_every_steps == 0:
                _log_group_maps(logger, model, fixed_batch, state.step)
            if eval_hook is not None and cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0:
                _run_eval(eval_hook, model, state, cfg, optimizer, scheduler, scaler, position, writer, logger)
            if state.step % cfg.checkpoint.every_steps == 0:
                writer.save(model, cfg, optimizer, scheduler, scaler, state, position)
            done = _stop_requested(state, cfg, start, total_steps)
            if done:
                break
        else:  # the epoch's batches are exhausted
            position.next_epoch()
            state.epoch += 1
            skip_base, worker_skips = dict(state.skipped), {}
    bar.close()
    for applied in pending:
        state.count_step(bool(applied), cfg.train.max_nonfinite_steps)
    writer.save(model, cfg, optimizer, scheduler, scaler, state, position)
    if is_main_process():
        log.info('stopped at step %d; checkpoint in %s', state.step, writer.run_dir)


FIT_FROM, FIT_AT = 10, 30  # train.fit_schedule_to_time_limit measures the step time between these steps


def _fit_schedule(cfg, scheduler, state: RunState, start: float, probe_start: float, total_steps: int,
                  steps_per_epoch: int) -> int:
    """The steps that fit in ``train.time_limit_minutes`` at the step time measured since ``probe_start`` (rank 0's
    figure, on every rank; 3% kept for checkpoints), at most ``total_steps``; the cosine is shortened to end there."""
    per_step = (time.time() - probe_start) / (FIT_AT - FIT_FROM)
    left = 60 * cfg.train.time_limit_minutes - (time.time() - start)
    fitted = broadcast_int(max(state.step + 1, min(total_steps, state.step + int(0.97 * left / per_step))))
    shorten_schedule(scheduler, fitted, cfg.train.warmup_epochs * steps_per_epoch, cfg.optim.warmup_prefix)
    scheduler.step_update(state.step)
    state.total_steps = fitted
    if is_main_process():
        log.info('schedule fitted to the %.1f-minute limit: %.3f s/step, %d steps (%d planned)',
                 cfg.train.time_limit_minutes, per_step, fitted, total_steps)
    return fitted


def _sum_skips(base: dict, per_worker: dict) -> dict:
    """Skipped samples of all ranks: this rank's counters are summed over ranks at log time; here, locally."""
    total = dict(base)
    for counts in per_worker.values():
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
    return total


def _log_step(logger, bar, state, result, optimizer, model, step_time, global_batch) -> None:
    skipped = dict(state.skipped)
    if get_world_size() > 1:  # the dashboard shows every rank's skips
        everyone = [None] * get_world_size()
        dist.all_gather_object(everyone, skipped)
        skipped = _sum_skips({}, dict(enumerate(everyone)))
    values = {f'train/{k}': float(v) for k, v in result.losses.items()}
    values.update({'train/lr': optimizer.param_groups[0]['lr'], 'train/grad_norm': float(result.grad_norm),
                   'train/step_time_s': step_time, 'train/images_per_s': global_batch / max(step_time, 1e-9),
                   'train/epoch': state.epoch, 'train/nonfinite_steps': state.nonfinite_total,
                   'train/logit_scale': float(model.logit_scale.detach().exp()),
                   'data/skipped_samples': sum(skipped.values())})
    values.update({f'data/skipped_{k}': v for k, v in skipped.items()})
    if hasattr(model.img_encoder, 'logit_scale'):
        values['train/npr_logit_scale'] = float(model.img_encoder.logit_scale.detach().exp())
    logger.log(state.step, values)
    bar.set_postfix(loss=f"{values['train/loss']:.3f}", img_s=f"{values['train/images_per_s']:.1f}",
                    lr=f"{values['train/lr']:.2e}", refresh=False)


@torch.no_grad()
def _log_group_maps(logger, model, images, step) -> None:
    if not is_main_process() or images is None:
        return
    model.eval()
    out = model.encode_image(images, with_group_embeds=False)
    model.train()
    picture = group_map_grid(images, out.group_maps, out.grid)
    os.makedirs(os.path.join(os.path.dirname(logger.path), 'group_maps'), exist_ok=True)
    picture.save(os.path.join(os.path.dirname(logger.path), 'group_maps', f'step_{step:08d}.png'))
    logger.log(step, {}, images={'train/group_maps': picture})


def _run_eval(eval_hook, model, state, cfg, optimizer, scheduler, scaler, position, writer, logger) -> None:
    """In-training evaluation: ``eval_hook(model, step) -> {name: value, 'score': float}``; the best score is kept
    as ``ckpt-best``."""
    model.eval()
    metrics = eval_hook(model, state.step) or {}
    model.train()
    logger.log(state.step, {f'eval/{k}': v for k, v in metrics.items()})
    score = metrics.get('score')
    if score is not None and (state.best_metric is None or score > state.best_metric):
        state.best_metric = float(score)
        writer.save(model, cfg, optimizer, scheduler, scaler, state, position, name='ckpt-best')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='pgseg-train', description='Pretrain GroupViT / PGSeg on image-text shards. Any config key can be '
        'overridden as key=value (e.g. optim.lr=2e-4 data.batch_size=256). Run the same command under torchrun '
        'for several processes.')
    parser.add_argument('--config', required=True, help='YAML config (see configs/)')
    parser.add_argument('--resume', default=None,
                        help="'auto' (default from the config): newest checkpoint in train.output_dir; a checkpoint "
                             "directory; or 'none' to start fresh")
    parser.add_argument('overrides', nargs='*', help='key=value config overrides')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get('RANK', 0)) == 0 else logging.WARNING,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        if args.resume is not None:
            cfg.checkpoint.resume = args.resume
        run(cfg)

    return run_command('pgseg-train', body, (ConfigError, CheckpointError, FileNotFoundError))


if __name__ == '__main__':
    sys.exit(main())
