"""The trainer: exact resume, DDP equals one process, the non-finite guard, schedule and parameter groups, main()."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import pgseg
from pgseg.losses.objective import build_objective
from pgseg.train import main as train_main
from pgseg.train import run
from pgseg.training.optim import build_scheduler, param_groups
from pgseg.training.state import NonFiniteLossError, RunState
from pgseg.training.step import train_step
from tests.helpers import TINY_CONFIG, tiny_batch, tiny_model_config


def _cfg(shards, out, **train):
    cfg = pgseg.load_config(TINY_CONFIG, [
        f'train.output_dir={out}', 'log.wandb_mode=disabled', 'log.every_steps=1', 'log.group_maps_every_steps=0',
        'train.steps_per_epoch=4', 'train.epochs=2', 'checkpoint.every_steps=100', 'data.num_workers=2',
        'data.shuffle_buffer=4'])
    cfg.data.sources = [pgseg.config.DataSourceConfig(name='synthetic', pattern=shards)]
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _final_weights(out):
    last = sorted(d for d in os.listdir(out) if d.startswith('ckpt-'))[-1]
    return load_file(os.path.join(out, last, 'model.safetensors')), last


@pytest.mark.slow
def test_resume_gives_the_same_parameters(tmp_path, shards):
    """3 steps, stop, resume to 6 (across an epoch boundary, 2 data workers) == 6 steps in one go."""
    run(_cfg(shards, tmp_path / 'straight', max_steps=6))
    run(_cfg(shards, tmp_path / 'resumed', max_steps=3))
    state = run(_cfg(shards, tmp_path / 'resumed', max_steps=6))
    assert state.step == 6 and state.epoch == 1
    a, name_a = _final_weights(tmp_path / 'straight')
    b, name_b = _final_weights(tmp_path / 'resumed')
    assert name_a == name_b == 'ckpt-00000006'
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in open(tmp_path / 'resumed' / 'metrics.jsonl')]
    assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_main_smoke_and_outputs(tmp_path, shards):
    code = train_main(['--config', TINY_CONFIG, f'train.output_dir={tmp_path}', 'log.wandb_mode=disabled',
                       f'data.sources=[{{name: s, pattern: "{shards}"}}]', 'train.max_steps=2',
                       'log.every_steps=1', 'log.group_maps_every_steps=2', 'data.num_workers=0'])
    assert code == 0
    assert {'config.yaml', 'env.json', 'metrics.jsonl', 'ckpt-00000002', 'group_maps'} <= set(os.listdir(tmp_path))
    row = json.loads(open(tmp_path / 'metrics.jsonl').readline())
    for key in ('train/loss', 'train/itc', 'train/npr', 'train/lr', 'train/grad_norm', 'train/images_per_s',
                'data/skipped_samples', 'train/logit_scale'):
        assert key in row
    assert json.load(open(tmp_path / 'env.json'))['world_size'] == 1


def test_trainer_starts_the_noun_losses_at_their_step(tmp_path, shards):
    """model.noun_losses_start_step counts the trainer's steps (the trainer passes noun_losses to each step)."""
    code = train_main(['--config', TINY_CONFIG, f'train.output_dir={tmp_path}', 'log.wandb_mode=disabled',
                       f'data.sources=[{{name: s, pattern: "{shards}"}}]', 'train.max_steps=3',
                       'log.every_steps=1', 'log.group_maps_every_steps=0', 'data.num_workers=0',
                       'model.multi_label=2', 'model.group_word_weight=1', 'model.noun_losses_start_step=2'])
    assert code == 0
    rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    # step k of the log is the k-th update, computed at step k - 1
    assert ['train/group_word' in r for r in rows] == [False, False, True]


def test_schedule_fitted_to_the_time_limit():
    """At 1 s/step with 120 s left at step 30 of a 3-minute budget, 30 + 0.97 * 120 = 146 steps fit: the cosine ends
    there (min LR), its midpoint moves to step 73, and every rank gets the same figure."""
    import time

    from pgseg.train import _fit_schedule
    cfg = pgseg.load_config(TINY_CONFIG, ['train.time_limit_minutes=3', 'train.warmup_epochs=0'])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, total_steps=1000, warmup_steps=0, warmup_lr=0.0, min_lr=0.0)
    state = RunState(step=30)
    now = time.time()
    fitted = _fit_schedule(cfg, sched, state, start=now - 60, probe_start=now - 20, total_steps=1000,
                           steps_per_epoch=100)
    assert fitted in (145, 146) and state.total_steps == fitted
    sched.step_update(fitted)
    assert opt.param_groups[0]['lr'] == pytest.approx(0.0, abs=1e-9)
    sched.step_update(fitted // 2)
    assert opt.param_groups[0]['lr'] == pytest.approx(0.5, abs=0.02)
    # a fast machine keeps the planned schedule
    assert _fit_schedule(cfg, sched, RunState(step=30), now - 1, now - 0.2, 1000, 100) == 1000
    assert RunState.from_state(state.state_dict()).total_steps == fitted


def test_main_reports_config_errors(tmp_path, capsys):
    assert train_main(['--config', TINY_CONFIG, f'train.output_dir={tmp_path}']) == 2
    assert 'data.sources is empty' in capsys.readouterr().err
    assert train_main(['--config', TINY_CONFIG, 'optim.nope=1']) == 2
    assert 'optim.nope' in capsys.readouterr().err
    assert train_main(['--config', TINY_CONFIG, f'train.output_dir={tmp_path}', 'train.fit_schedule_to_time_limit=true',
                       'data.sources=[{name: s, pattern: "x/{0..1}.tar"}]']) == 2
    assert 'train.time_limit_minutes' in capsys.readouterr().err


class _Exploding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, images, tokens):
        loss = (self.w * images.mean()).sum() * float('nan')
        return {'loss': loss}


def test_nonfinite_steps_are_skipped_then_stop_the_run():
    model = _Exploding()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = RunState()
    batch = [(torch.ones(2, 3, 4, 4), torch.zeros(2, 5, dtype=torch.long))]
    for _ in range(2):
        result = train_step(model, batch, opt)
        assert not result.applied and torch.equal(model.w.detach(), torch.ones(3))
        state.count_step(result.applied, max_streak=3)
    with pytest.raises(NonFiniteLossError, match='3 consecutive'):
        state.count_step(train_step(model, batch, opt).applied, max_streak=3)


def test_nonfinite_step_is_skipped_on_the_device_with_fused_adamw():
    model = _Exploding()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    batch = [(torch.ones(2, 3, 4, 4), torch.zeros(2, 5, dtype=torch.long))]
    result = train_step(model, batch, opt)
    assert torch.is_tensor(result.applied) and not bool(result.applied)  # decided without a host sync
    assert torch.equal(model.w.detach(), torch.ones(3))
    assert float(opt.state[model.w]['step']) == 0 and torch.equal(opt.state[model.w]['exp_avg'], torch.zeros(3))
    model.forward = lambda images, tokens: {'loss': (model.w * images.mean()).sum()}
    assert bool(train_step(model, batch, opt).applied) and not torch.equal(model.w.detach(), torch.ones(3))
    assert getattr(opt, 'found_inf', None) is None  # not left behind for other callers


def test_schedule_official_warmup_quirk():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    official = build_scheduler(opt, total_steps=300, warmup_steps=100, warmup_lr=1e-6, min_lr=1e-5,
                               warmup_prefix=False)
    official.step_update(100)
    expected = 1e-5 + 0.5 * (1e-4 - 1e-5) * (1 + math.cos(math.pi * 100 / 300))  # the drop at the end of warmup
    assert opt.param_groups[0]['lr'] == pytest.approx(expected)
    fixed = build_scheduler(opt, total_steps=300, warmup_steps=100, warmup_lr=1e-6, min_lr=1e-5)
    fixed.step_update(100)
    assert opt.param_groups[0]['lr'] == pytest.approx(1e-4)
    fixed.step_update(50)
    assert opt.param_groups[0]['lr'] == pytest.approx(1e-6 + 50 * (1e-4 - 1e-6) / 100)


def test_parameter_groups():
    model = pgseg.build_model(tiny_model_config())
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in param_groups(model, 0.05, 'pgseg')[0]['params']}
    for n in ('img_encoder.pos_embed', 'img_encoder.layers.0.group_token', 'logit_scale',
              'text_encoder.positional_embedding', 'img_encoder.logit_scale'):
        assert n not in decayed
    assert 'img_encoder.layers.0.blocks.0.attn.qkv.weight' in decayed
    official = {names[id(p)] for p in param_groups(model, 0.05, 'official')[0]['params']}
    assert {'img_encoder.pos_embed', 'logit_scale', 'img_encoder.layers.0.group_token'} <= official


# ---------------------------------------------------------------------------------------------- DDP equivalence
def _ddp_model():
    """The training objective over a tiny GroupViT (what the trainer wraps in DDP)."""
    cfg = tiny_model_config('groupvit')
    cfg.proj_num_layers = 1  # no BatchNorm: its statistics are per rank by design on the CPU
    cfg.image.gumbel = False
    torch.manual_seed(0)
    return build_objective(pgseg.build_model(cfg))


def _one_sgd_step(model, images, tokens):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_step(model, [(images, tokens)], opt)
    return {n: p.detach().clone() for n, p in (model.module if hasattr(model, 'module') else model).named_parameters()}


def _ddp_worker(rank, init_file, expected):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        images, tokens = tiny_batch(8)
        model = torch.nn.parallel.DistributedDataParallel(_ddp_model())
        got = _one_sgd_step(model, images[rank * 4:(rank + 1) * 4], tokens[rank * 4:(rank + 1) * 4])
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, atol=1e-4, rtol=1e-4, msg=k)  # float noise only
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_step_equals_one_process_on_the_concatenated_batch(tmp_path):
    images, tokens = tiny_batch(8)
    expected = _one_sgd_step(_ddp_model(), images, tokens)
    mp.spawn(_ddp_worker, args=(os.path.join(tmp_path, 'init'), expected), nprocs=2, join=True)


@pytest.mark.slow
def test_compiled_training_matches_eager_without_recompiling_each_step(tmp_path, shards, monkeypatch):
    """train.compile: the trainer compiles the losses' computation; the losses follow the eager run's, the graphs
    cover the whole step (a fallback to eager inside it would compile each submodule as a frame of its own: 20+),
    and later steps reuse them although the step and the caption length change."""
    from torch._dynamo.testing import CompileCounterWithBackend

    import pgseg.train

    def cfg(name, **train):
        c = _cfg(shards, tmp_path / name, max_steps=5, **train)
        # the noun losses from step 2: forward's branch on the step changes once
        c.model.multi_label, c.model.group_word_weight, c.model.noun_losses_start_step = 2, 1.0, 2
        return c
    eager = run(cfg('eager'))
    counter = CompileCounterWithBackend('aot_eager')  # inductor's code generation would take minutes here
    monkeypatch.setattr(pgseg.train, 'COMPILE_BACKEND', counter)
    from pgseg.training.logger import MetricsLogger
    frames, log = [], MetricsLogger.log

    def count_frames(self, step, values, *args, **kwargs):  # after every step (log.every_steps=1)
        if 'train/loss' in values:
            frames.append(counter.frame_count)
        log(self, step, values, *args, **kwargs)
    monkeypatch.setattr(MetricsLogger, 'log', count_frames)
    compiled = run(cfg('compiled', compile=True))
    assert eager.step == compiled.step == 5
    rows = {name: [json.loads(line) for line in open(tmp_path / name / 'metrics.jsonl')]
            for name in ('eager', 'compiled')}
    assert len(rows['eager']) == len(rows['compiled']) == len(frames) == 5
    # the first steps agree to float rounding (later, a near-tie in a Hungarian matching may flip on it)
    for a, b in zip(rows['eager'][:3], rows['compiled'][:3]):
        for key in ('train/loss', 'train/itc', 'train/npr', 'train/grad_norm'):
            assert math.isclose(a[key], b[key], rel_tol=1e-4), (key, a, b)
    assert 'train/group_word' in rows['compiled'][2]
    assert 0 < frames[0] <= 8, frames  # the matching's graph breaks split the step into a few graphs
    # recompiled when the caption length first changes (dynamic from then on) and when the noun losses start, then
    # never again: the last steps compile nothing although the step changes every step
    assert frames[2] == frames[3] == frames[4], frames


def test_wandb_mode_from_the_environment_is_announced_and_runs_are_named(tmp_path, monkeypatch, caplog):
    from pgseg.training.logger import MetricsLogger
    monkeypatch.setenv('WANDB_MODE', 'disabled')
    with caplog.at_level('WARNING', logger='pgseg.training.logger'):
        logger = MetricsLogger(str(tmp_path / 'run-7'), wandb_mode='online')
    assert logger.wandb_mode == 'disabled' and logger.wandb_name == f'{tmp_path.name}/run-7'
    assert 'WANDB_MODE=disabled wins over log.wandb_mode=online' in caplog.text
    caplog.clear()
    with caplog.at_level('WARNING', logger='pgseg.training.logger'):
        MetricsLogger(str(tmp_path / 'run-8'), wandb_mode='disabled', name='mine')
    assert caplog.text == ''  # the two agree: nothing to say


def test_two_runs_of_the_same_seed_end_with_identical_parameters(tmp_path, shards):
    """What the demo's reproducibility rests on: same seed, same threads, same machine -> the same bits (data order,
    augmentation, Gumbel noise, NPR and the optimizer all seeded)."""
    weights = []
    for run_name in ('a', 'b'):
        out = tmp_path / run_name
        assert train_main(['--config', TINY_CONFIG, f'train.output_dir={out}', 'log.wandb_mode=disabled',
                           f'data.sources=[{{name: s, pattern: "{shards}"}}]', 'train.max_steps=4',
                           'data.num_workers=2', 'log.group_maps_every_steps=0']) == 0
        weights.append(_final_weights(out)[0])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert json.loads(open(tmp_path / 'a' / 'metrics.jsonl').readline())['train/loss'] == \
        json.loads(open(tmp_path / 'b' / 'metrics.jsonl').readline())['train/loss']
