"""Bad input and faults a real run meets: each ends in a clear error before anything is written, or is survived."""
from __future__ import annotations

import json
import os

import pytest
import torch

import pgseg
from pgseg.config import ConfigError, load_config
from pgseg.train import main as train_main
from pgseg.train import run
from tests.helpers import TINY_CONFIG


def _args(out, shards, *extra):
    return ['--config', TINY_CONFIG, f'train.output_dir={out}', 'log.wandb_mode=disabled',
            f'data.sources=[{{name: s, pattern: "{shards}"}}]', 'log.every_steps=1', 'log.group_maps_every_steps=0',
            'data.num_workers=0', 'train.steps_per_epoch=4', 'train.epochs=2', *extra]


@pytest.mark.parametrize('override, message', [
    ('data.batch_size=0', 'data.batch_size=0: must be at least 1'),
    ('log.every_steps=0', 'log.every_steps=0: must be at least 1'),
    ('model.image.depths=[1,1]', 'model.image.embed_factors=[1, 1, 1] has 3 entries; expected one per stage'),
    ('train.precision=fp16', 'train.precision=fp16 needs a GPU'),
    ('data.sources.3.length=10', 'data.sources has 1 entries (0-0)'),
])
def test_bad_settings_fail_before_anything_is_written(tmp_path, shards, capsys, override, message):
    """Each is one line naming the key and exit code 2, and the run directory is not created."""
    out = tmp_path / 'run'
    assert train_main(_args(out, shards, override)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_one_element_of_a_list_can_be_overridden():
    cfg = load_config(os.path.join(os.path.dirname(TINY_CONFIG), '..', '..', 'configs', 'pgseg_gcc_redcaps.yaml'),
                      ['data.sources.0.length=null', 'data.sources.1.weight=2'])
    assert cfg.data.sources[0].length is None and cfg.data.sources[1].weight == 2.0
    assert cfg.data.sources[2].weight == 1.0


def test_a_failed_start_leaves_the_run_record_alone(tmp_path, shards):
    """An existing run's config.yaml and env.json survive a start that fails (a bad shard pattern, a missing resume
    folder)."""
    out = tmp_path / 'run'
    assert train_main(_args(out, shards, 'train.max_steps=1')) == 0
    record = {name: (out / name).read_bytes() for name in ('config.yaml', 'env.json')}
    assert train_main(_args(out, str(tmp_path / 'missing-{00..01}.tar'), 'optim.lr=1')) == 2
    assert train_main(_args(out, shards, 'optim.lr=1', '--resume', str(tmp_path / 'no-such-ckpt'))) == 2
    assert {name: (out / name).read_bytes() for name in record} == record


def test_a_truncated_checkpoint_names_itself_and_auto_resume_falls_back(tmp_path, shards, capsys, caplog):
    out = tmp_path / 'run'
    assert train_main(_args(out, shards, 'train.max_steps=4', 'checkpoint.every_steps=2',
                            'checkpoint.keep_last=3')) == 0
    weights = out / 'ckpt-00000004' / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:1000])  # a write cut short outside pgseg's atomic rename
    # an explicit resume from it: an error naming the folder and the file
    code = train_main(_args(out, shards, 'train.max_steps=6', '--resume', str(out / 'ckpt-00000004')))
    assert code == 2
    err = capsys.readouterr().err
    assert 'ckpt-00000004' in err and 'model.safetensors cannot be read' in err
    # resume: auto says so and continues from the previous complete checkpoint
    cfg = load_config(TINY_CONFIG, _args(out, shards, 'train.max_steps=6')[2:])
    with caplog.at_level('WARNING'):
        state = run(cfg)
    assert state.step == 6
    assert any('cannot resume from' in r.getMessage() and 'ckpt-00000004' in r.getMessage() for r in caplog.records)
    steps = [json.loads(line)['step'] for line in open(out / 'metrics.jsonl') if 'train/loss' in line]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6]  # steps 3 and 4 again, from ckpt-00000002


def test_model_config_rules_hold_for_configs_built_in_code():
    cfg = load_config(TINY_CONFIG).model
    cfg.image.num_heads = [2, 2]
    with pytest.raises(ConfigError, match=r'model.image.num_heads=\[2, 2\] has 2 entries'):
        pgseg.build_model(cfg)


def test_fp16_on_a_cpu_is_refused_by_name():
    from pgseg.runtime.precision import resolve_precision
    with pytest.raises(ConfigError, match='train.precision=fp16 needs a GPU'):
        resolve_precision('fp16', torch.device('cpu'))
