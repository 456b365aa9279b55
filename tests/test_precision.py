"""``precision: auto`` and the warning for bf16 where the device has no native bf16 matrix products."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import pgseg.runtime.precision
import pgseg.train
from pgseg.runtime.precision import bf16_flag_dtype, resolve_precision
from pgseg.train import main as train_main
from tests.helpers import TINY_CONFIG


@pytest.mark.parametrize('device,native,fallback,expected', [
    ('cpu', True, 'fp16', 'bf16'), ('cpu', False, 'fp16', 'fp32'),
    ('cuda', True, 'fp16', 'bf16'), ('cuda', False, 'fp16', 'fp16'), ('cuda', False, 'fp32', 'fp32')])
def test_auto_picks_bf16_only_where_native(monkeypatch, device, native, fallback, expected):
    monkeypatch.setattr(pgseg.runtime.precision, 'native_bf16', lambda d: native)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # auto never warns
        assert resolve_precision('auto', device, gpu_fallback=fallback) == expected


def test_explicit_bf16_runs_as_asked_and_warns_where_emulated(monkeypatch):
    monkeypatch.setattr(pgseg.runtime.precision, 'native_bf16', lambda d: False)
    with pytest.warns(RuntimeWarning, match=r'train\.precision=bf16 on a cpu .*train\.precision=auto picks fp32'):
        assert resolve_precision('bf16', 'cpu') == 'bf16'
    with pytest.warns(RuntimeWarning, match='leave out --bf16'):
        assert bf16_flag_dtype(True, 'cpu') is torch.bfloat16
    monkeypatch.setattr(pgseg.runtime.precision, 'native_bf16', lambda d: True)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert resolve_precision('bf16', 'cpu') == 'bf16' and bf16_flag_dtype(False, 'cpu') is None
    with pytest.raises(ValueError, match=r"train\.precision='bf17': expected one of auto, fp32, bf16, fp16"):
        resolve_precision('bf17', 'cpu')


@pytest.mark.parametrize('native,expected', [(True, 'bf16'), (False, 'fp32')])
def test_trainer_steps_in_the_resolved_precision(tmp_path, shards, monkeypatch, native, expected):
    monkeypatch.setattr(pgseg.runtime.precision, 'native_bf16', lambda d: native)
    seen = []

    def spy(model, micro, optimizer, precision, *args, **kwargs):
        seen.append(precision)
        return train_step(model, micro, optimizer, precision, *args, **kwargs)

    train_step = pgseg.train.train_step
    monkeypatch.setattr(pgseg.train, 'train_step', spy)
    code = train_main(['--config', TINY_CONFIG, f'train.output_dir={tmp_path}', 'log.wandb_mode=disabled',
                       f'data.sources=[{{name: s, pattern: "{shards}"}}]', 'train.max_steps=2', 'train.precision=auto',
                       'log.group_maps_every_steps=0', 'data.num_workers=0'])
    assert code == 0 and seen == [expected, expected]
    assert json.load(open(tmp_path / 'env.json'))['precision'] == expected
    assert 'precision: auto' in open(tmp_path / 'config.yaml').read()  # the run's config stays as given


def test_autocast_takes_only_a_resolved_precision():
    from pgseg.training.step import autocast_for
    with pytest.raises(ValueError, match='resolve auto first'):
        autocast_for(torch.device('cpu'), 'auto')
    with pytest.raises(ValueError, match='fp16 needs a GPU'):
        autocast_for(torch.device('cpu'), 'fp16')
