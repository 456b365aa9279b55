"""``pgseg-train --config FILE [key=value ...]``, also under ``torchrun`` (one or many nodes; NCCL on GPUs, gloo on
the CPU). Composes the builders; the step is :func:`pgseg.training.step.train_step`, the loop's cadences
:class:`pgseg.training.loop.Harness` (shared with ``pgseg-prompt-train``).

Resume: ``checkpoint.resume=auto`` (the default) continues from the newest ``ckpt-<step>`` in ``train.output_dir``
with model, optimizer, scheduler, scaler, step, every rank's RNG and data position, so an interrupted run (a crash,
``kill -9``, a torchrun elastic restart) ends with the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import CheckpointError, load_checkpoint, load_model, load_state_into
from .checkpoint.format import write_model_files
from .config import ConfigError, TrainConfig, config_to_dict, config_to_yaml, load_config, validate
from .data.text import CaptionTokenizer, trim_padding
from .data.transforms import TrainTransform, normalize_batch
from .data.webdataset import StreamPosition, TrainStream, build_train_loader, source_from_config
from .eval.templates import get_templates
from .eval.visualize import group_map_grid
from .losses.objective import build_objective
from .models import build_model
from .runtime.cli import run_command, setup_cpu_process, setup_logging
from .runtime.distributed import (
    all_gather_object,
    broadcast_int,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from .runtime.precision import resolve_precision
from .training.checkpoints import CheckpointWriter, claim_run_directory, load_resume_point, restore_rank
from .training.logger import MetricsLogger
from .training.loop import Harness, LoopSettings, write_run_files
from .training.optim import build_optimizer, build_scheduler, scaled_lrs, shorten_schedule
from .training.state import RunState
from .training.step import train_step

log = logging.getLogger('pgseg.train')
COMPILE_BACKEND = 'inductor'  # torch.compile's backend under train.compile (the tests swap in a faster one)


@dataclass
class Pretraining:
    """What one pretraining run is made of, built by :func:`build_run` and stepped by :func:`train_loop`."""
    cfg: TrainConfig
    device: torch.device
    precision: str  # resolved: fp32, bf16 or fp16
    model: torch.nn.Module  # GroupSegModel: what checkpoints hold
    objective: torch.nn.Module  # GroupSegObjective over the model, wrapped by DDP in a multi-process run
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler | None
    stream: TrainStream
    loader: object
    state: RunState
    position: StreamPosition
    total_steps: int
    steps_per_epoch: int
    eval_hook: Callable | None

    def train_state(self) -> dict:
        return {'optimizer': self.optimizer.state_dict(), 'scheduler': self.scheduler.state_dict(),
                'scaler': self.scaler.state_dict() if self.scaler else None}

    skipped_epoch_start: dict | None = None  # this rank's skip counters when the current epoch began

    def rank_state(self) -> dict:
        """What each rank saves of its own: data position and skip counters (the run's total, and at the start of
        the epoch, which a resume with another world size replays)."""
        start = self.skipped_epoch_start if self.skipped_epoch_start is not None else self.state.skipped
        return {'position': self.position.state_dict(), 'skipped': dict(self.state.skipped),
                'skipped_epoch_start': dict(start), 'stream': self.stream_layout()}

    def stream_layout(self) -> list[int]:
        """What a worker's position means: the same counts of samples and batches resume exactly only under the
        same batch size, workers, batches per epoch (and world size), and the same shards and sizes (by name: a
        moved data folder is the same data; an edited file list is not)."""
        names = [u.rsplit('/', 1)[-1] for u in self.stream.urls]
        data = zlib.crc32(json.dumps([names, self.stream.sizes]).encode())
        return [self.stream.batch_size, self.stream.num_workers, self.stream.steps_per_epoch, data]


def _steps_per_epoch(cfg: TrainConfig, sources, global_batch: int) -> int:
    steps = cfg.train.steps_per_epoch or sum(s.length for s in sources) // global_batch
    if steps < 1:
        raise ConfigError(f'{sum(s.length for s in sources)} samples make no step of {global_batch} '
                          f'(data.batch_size x world size x train.grad_accum_steps)')
    return steps


def build_run(cfg: TrainConfig, device: torch.device, local_rank: int, precision: str,
              eval_hook: Callable | None = None) -> Pretraining:
    """Data, model, optimizer, schedule and scaler from the config, then the resume point when there is one."""
    rank, world = get_rank(), get_world_size()
    torch.manual_seed(cfg.train.seed + rank)
    # data
    sources = []
    for i, source in enumerate(cfg.data.sources):
        try:
            sources.append(source_from_config(source))
        except (ValueError, KeyError) as exc:  # a list without its columns, unreadable shard metadata: the key named
            raise ConfigError(f'data.sources.{i} ({source.name}): {exc}') from None
    accum = cfg.train.grad_accum_steps
    global_batch = cfg.data.batch_size * world * accum
    steps_per_epoch = _steps_per_epoch(cfg, sources, global_batch)
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
    objective = build_objective(model)
    if cfg.train.compile:
        objective.compile_losses(backend=COMPILE_BACKEND)
    lr, warmup_lr, min_lr = scaled_lrs(cfg.optim, global_batch)
    optimizer = build_optimizer(model, cfg.optim, lr)
    scheduler = build_scheduler(optimizer, total_steps, cfg.train.warmup_epochs * steps_per_epoch, warmup_lr,
                                min_lr, cfg.optim.warmup_prefix)
    scaler = torch.amp.GradScaler('cuda') if precision == 'fp16' else None
    run = Pretraining(cfg, device, precision, model, objective, optimizer, scheduler, scaler, stream, loader,
                      RunState(), StreamPosition(), total_steps, steps_per_epoch, eval_hook)
    point = load_resume_point(cfg.checkpoint.resume, os.path.abspath(cfg.train.output_dir), _read_resume_point)
    if point:
        _resume(run, *point)
    # gradients as views of the communication buckets (no copy) and a static graph (the same parameters are used
    # every step): about 10% of a small model's CPU step under gloo
    if world > 1:
        run.objective = DistributedDataParallel(objective, device_ids=[local_rank] if device.type == 'cuda' else None,
                                          find_unused_parameters=cfg.train.find_unused_parameters,
                                          gradient_as_bucket_view=True,
                                          static_graph=not cfg.train.find_unused_parameters)
    if run.eval_hook is None and cfg.eval.every_steps > 0:
        from .eval.segmentation import build_in_training_evaluator
        run.eval_hook = build_in_training_evaluator(cfg.eval, device)
    return run


def _read_resume_point(path: str) -> tuple[dict, dict]:
    """(weights, training state) of checkpoint ``path``; a damaged file is a CheckpointError naming it."""
    weights, _, saved = load_checkpoint(path)
    return weights, saved


def _resume(run: Pretraining, path: str, loaded: tuple[dict, dict]) -> None:
    """Model, optimizer, schedule, scaler, counters, this rank's RNG and data position from checkpoint ``path``;
    with another world size, RNG and data restart at the current epoch's beginning."""
    weights, saved = loaded
    load_state_into(run.model, weights, source=path)
    run.model.to(run.device)
    run.optimizer.load_state_dict(saved['optimizer'])
    run.scheduler.load_state_dict(saved['scheduler'])
    if run.scaler is not None and saved.get('scaler'):
        run.scaler.load_state_dict(saved['scaler'])
    run.state = RunState.from_state(saved['run'])
    mine = restore_rank(saved, get_rank(), get_world_size())
    if mine is not None and mine.get('stream', run.stream_layout()) == run.stream_layout():
        run.position = StreamPosition.from_state(mine['position'])
        run.state.skipped = dict(mine.get('skipped', run.state.skipped))  # each rank's own counters
        run.skipped_epoch_start = mine.get('skipped_epoch_start')
    else:
        changed = (f'a {saved["world_size"]}-rank checkpoint' if mine is None else
                   'a checkpoint of another data layout (batch, workers, batches per epoch, data: '
                   f'{mine["stream"]}, now {run.stream_layout()})')
        log.warning('resuming %d ranks from %s: the data position restarts at epoch %d', get_world_size(), changed,
                    run.state.epoch)
        run.position = StreamPosition(epoch=run.state.epoch)
        # the epoch replays from its start: the counters as they stood then, all ranks' on rank 0 (the sum is kept)
        starts = [rank.get('skipped_epoch_start') for rank in saved['ranks']]
        if all(start is not None for start in starts):
            total: dict[str, int] = {}
            for start in starts:
                for k, v in start.items():
                    total[k] = total.get(k, 0) + int(v)
            run.state.skipped = total if get_rank() == 0 else {}
    log.info('resumed from %s at step %d (epoch %d)', path, run.state.step, run.state.epoch)
    run.total_steps = run.state.total_steps or run.total_steps  # a schedule fitted to the time limit keeps its length


def run(cfg: TrainConfig, eval_hook: Callable | None = None) -> RunState:
    """Train as ``cfg`` says; returns the final run state (step, epoch, counters)."""
    validate(cfg)  # a config built or changed in code gets the loaders' checks too
    if not cfg.data.sources:
        raise ConfigError('data.sources is empty: list at least one shard source (name, pattern)')
    device, local_rank = init_distributed()
    precision = resolve_precision(cfg.train.precision, device)  # 'auto' -> bf16 where native (runtime.precision)
    run_dir = os.path.abspath(cfg.train.output_dir)
    with claim_run_directory(run_dir):  # one live run per directory; temporaries of dead ones removed
        return _run(cfg, device, local_rank, precision, run_dir, eval_hook)


def _run(cfg: TrainConfig, device: torch.device, local_rank: int, precision: str, run_dir: str,
         eval_hook: Callable | None) -> RunState:
    r = build_run(cfg, device, local_rank, precision, eval_hook)
    # the run's record is written once the run is known to start: a failed start leaves an existing run's alone
    write_run_files(run_dir, config_to_yaml(cfg), precision)
    writer = CheckpointWriter(run_dir, cfg.checkpoint.keep_last, lambda folder: write_model_files(folder, r.model, cfg))
    logger = MetricsLogger(run_dir, enabled=is_main_process(), wandb_mode=cfg.log.wandb_mode,
                           project=cfg.log.wandb_project, name=cfg.log.wandb_name, tags=cfg.log.wandb_tags,
                           config=json.loads(json.dumps(config_to_dict(cfg))), resume_id=r.state.wandb_id)
    r.state.wandb_id = logger.wandb_id or r.state.wandb_id
    log.info('%d steps (%d per epoch), global batch %d, %d parameters, device %s, world %d', r.total_steps,
             r.steps_per_epoch, _global_batch(cfg), sum(p.numel() for p in r.model.parameters()), device,
             get_world_size())
    settings = LoopSettings(r.total_steps, cfg.train.max_steps, cfg.train.time_limit_minutes, cfg.log.every_steps,
                            cfg.train.max_nonfinite_steps)
    harness = Harness(run_dir, settings, writer, logger, r.state)
    train_loop(r, harness)
    harness.close()
    return r.state


def _global_batch(cfg: TrainConfig) -> int:
    return cfg.data.batch_size * cfg.train.grad_accum_steps * get_world_size()


def train_loop(r: Pretraining, h: Harness) -> None:
    """Epochs of steps until the harness says stop; each step is followed by its cadences: the schedule fit, log,
    group maps, evaluation, checkpoint."""
    cfg, state = r.cfg, r.state
    # this rank's counters so far, to which the workers' counts of the samples they deliver from here are added
    skip_base, worker_skips, micro, fixed_batch = dict(state.skipped), {}, [], None
    if r.skipped_epoch_start is None:
        r.skipped_epoch_start = dict(state.skipped)
    fit = cfg.train.fit_schedule_to_time_limit and state.total_steps is None and state.step < FIT_FROM
    probe_start = None
    r.scheduler.step_update(state.step)
    stop = h.should_stop()
    while not stop:
        r.stream.position = r.position
        r.position.epoch = state.epoch
        for images, tokens, info in r.loader:
            r.position.update(info)
            worker_skips[info['worker']] = info['skipped']
            tokens = trim_padding(tokens)  # on the CPU: no host sync; exact under the causal mask
            micro.append((normalize_batch(images.to(r.device, non_blocking=True)),
                          tokens.to(r.device, non_blocking=True)))
            fixed_batch = micro[-1][0][:8] if fixed_batch is None else fixed_batch
            if len(micro) < cfg.train.grad_accum_steps:
                continue
            r.model.train()
            result = train_step(r.objective, micro, r.optimizer, r.precision, cfg.optim.clip_grad, r.scaler,
                                noun_losses=state.step >= cfg.model.noun_losses_start_step)
            micro = []
            h.step_done(result.applied)  # read at log / checkpoint time: no host sync per step
            r.scheduler.step_update(state.step)
            if fit and state.step == FIT_FROM:
                probe_start = time.time()
            if fit and state.step == FIT_AT:
                r.total_steps = _fit_schedule(cfg, r.scheduler, state, h.start, probe_start, r.total_steps,
                                              r.steps_per_epoch)
                h.settings.total_steps = h.bar.total = r.total_steps
                fit = False
            state.skipped = _sum_skips(skip_base, worker_skips)
            if h.due(cfg.checkpoint.every_steps) or h.due(cfg.eval.every_steps):
                h.settle_nonfinite()
            if h.log_due():
                _log_step(h, r, result)
            if h.due(cfg.log.group_maps_every_steps):
                _log_group_maps(h.logger, r.model, fixed_batch, state.step)
            if r.eval_hook is not None and h.due(cfg.eval.every_steps):
                _run_eval(h, r)
            if h.due(cfg.checkpoint.every_steps):
                h.save(r.train_state(), r.rank_state())
            stop = h.should_stop()
            if stop:
                break
        else:  # the epoch's batches are exhausted
            r.position.next_epoch()
            state.epoch += 1
            skip_base, worker_skips = dict(state.skipped), {}
            r.skipped_epoch_start = dict(state.skipped)
    h.finish(r.train_state(), r.rank_state())


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


def _log_step(h: Harness, r: Pretraining, result) -> None:
    state, model = r.state, r.model
    skipped = _sum_skips({}, dict(enumerate(all_gather_object(dict(state.skipped)))))  # every rank's skips
    values = {f'train/{k}': float(v) for k, v in result.losses.items()}
    values.update({'train/lr': r.optimizer.param_groups[0]['lr'], 'train/grad_norm': float(result.grad_norm),
                   'train/epoch': state.epoch, 'train/logit_scale': float(model.logit_scale.detach().exp()),
                   'data/skipped_samples': sum(skipped.values())})
    values.update({f'data/skipped_{k}': v for k, v in skipped.items()})
    if hasattr(model.img_encoder, 'logit_scale'):
        values['train/npr_logit_scale'] = float(model.img_encoder.logit_scale.detach().exp())
    h.log(values, {'loss': f"{values['train/loss']:.3f}", 'lr': f"{values['train/lr']:.2e}"},
          images_per_step=_global_batch(r.cfg))


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


def _run_eval(h: Harness, r: Pretraining) -> None:
    """In-training evaluation: ``eval_hook(model, step) -> {name: value, 'score': float}``; the best score is kept
    as ``ckpt-best``."""
    r.model.eval()
    metrics = r.eval_hook(r.model, r.state.step) or {}
    r.model.train()
    h.logger.log(r.state.step, {f'eval/{k}': v for k, v in metrics.items()})
    score = metrics.get('score')
    if score is not None and (r.state.best_metric is None or score > r.state.best_metric):
        r.state.best_metric = float(score)
        h.save(r.train_state(), r.rank_state(), name='ckpt-best')


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
    setup_logging()
    setup_cpu_process()

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        if args.resume is not None:
            cfg.checkpoint.resume = args.resume
        run(cfg)

    return run_command('pgseg-train', body, (ConfigError, CheckpointError, FileNotFoundError))


if __name__ == '__main__':
    sys.exit(main())
