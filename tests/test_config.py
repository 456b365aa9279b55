"""Configuration: overrides, errors that name the key, the shipped recipes."""
from __future__ import annotations

import glob
import os

import pytest

import pgseg
from pgseg.config import ConfigError, load_config
from tests.helpers import ROOT, TINY_CONFIG


def test_overrides_apply_with_types():
    cfg = load_config(TINY_CONFIG, ['optim.lr=3e-4', 'model.image.depths=[2,1,1]', 'train.precision=bf16'])
    assert cfg.optim.lr == 3e-4 and cfg.model.image.depths == [2, 1, 1] and cfg.train.precision == 'bf16'


@pytest.mark.parametrize('override,match', [
    ('optim.lrr=1', 'optim.lrr'),  # unknown key
    ('optim.lr=fast', 'optim.lr'),  # wrong type
    ('train.precision=fp8', 'train.precision'),  # not one of the choices
    ('model.npr.variant=both', 'model.npr.variant'),
    ('no_equals_sign', 'key=value'),
    ("data.sources=[{name:synthetic,pattern:'d/{00000..00007}.tar'}]",  # YAML needs 'key: value' there
     r'data\.sources is not valid YAML.*space after each colon'),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY_CONFIG, [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / 'bad.yaml'
    path.write_text('model:\n  image:\n    embed_dimm: 3\n')
    with pytest.raises(ConfigError, match=r'bad.yaml.*model.image.embed_dimm'):
        load_config(path)


def test_missing_required_value(tmp_path):
    path = tmp_path / 'src.yaml'
    path.write_text('data:\n  sources:\n    - name: cc3m\n')
    with pytest.raises(ConfigError, match='pattern'):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match='not found'):
        load_config(tmp_path / 'nope.yaml')
    (tmp_path / 'broken.yaml').write_text('model: [unclosed')
    with pytest.raises(ConfigError, match='broken.yaml'):
        load_config(tmp_path / 'broken.yaml')


def test_data_paths_come_from_the_environment(monkeypatch):
    monkeypatch.setenv('PGSEG_DATA', '/datasets/web')
    cfg = load_config(os.path.join(ROOT, 'configs', 'pgseg_gcc_redcaps.yaml'))
    assert all(s.pattern.startswith('/datasets/web/') for s in cfg.data.sources)
    monkeypatch.delenv('PGSEG_DATA')
    cfg = load_config(os.path.join(ROOT, 'configs', 'pgseg_gcc_redcaps.yaml'))
    assert all(s.pattern.startswith('data/') for s in cfg.data.sources)


@pytest.mark.parametrize('path', sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.yaml'))
                                        if not os.path.basename(p).startswith('mvpseg_')))  # test_mvpseg loads those
def test_shipped_configs_load_and_build(path):
    cfg = load_config(path)
    assert cfg.model.arch in ('pgseg', 'groupvit')
    model = pgseg.build_model(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_shipped_configs_load_by_name_from_anywhere(tmp_path, monkeypatch):
    """--config demo_cpu (or demo_cpu.yaml, configs/demo_cpu.yaml) is the shipped recipe, from any directory; an
    unknown name is an error that lists the shipped ones."""
    monkeypatch.chdir(tmp_path)
    by_path = load_config(os.path.join(ROOT, 'configs', 'demo_cpu.yaml'))
    for name in ('demo_cpu', 'demo_cpu.yaml', 'configs/demo_cpu.yaml'):
        assert load_config(name) == by_path
    with pytest.raises(ConfigError, match=r'no_such_recipe.*demo_cpu, groupvit_gcc_yfcc'):
        load_config('no_such_recipe')
    (tmp_path / 'demo_cpu.yaml').write_text('train:\n  epochs: 1\n')
    assert load_config('demo_cpu.yaml').train.epochs == 1  # a file of that name in the working directory wins


@pytest.mark.slow
def test_wheel_ships_the_configs_and_one_version(tmp_path):
    """A wheel built from the checkout holds every shipped config as package data, and its version is pgseg's."""
    import subprocess
    import sys
    import zipfile
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
                    str(tmp_path), ROOT], check=True, capture_output=True)
    wheel = next(tmp_path.glob('pgseg-*.whl'))
    assert wheel.name.startswith(f'pgseg-{pgseg.__version__}-')
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f'pgseg/configs/{os.path.basename(p)}' for p in glob.glob(os.path.join(ROOT, 'configs', '*.yaml'))}
    assert shipped and shipped <= names
    assert not any('fixtures' in n or n.startswith('tests/') for n in names)


def test_validate_checks_literals_and_cross_field_rules_in_one_place():
    """The loaders and the builders share one validate(): a Literal field set in code, a model rule broken in a
    file or on the command line, and a train rule, each named by key before anything runs."""
    cfg = load_config(TINY_CONFIG)
    cfg.train.precision = 'fp8'
    with pytest.raises(ConfigError, match=r"train.precision must be 'auto', 'fp32', 'bf16' or 'fp16', got 'fp8'"):
        pgseg.config.validate(cfg)
    with pytest.raises(ConfigError, match=r'model.group_word_weight=1.0 needs noun prompts'):
        load_config(TINY_CONFIG, ['model.group_word_weight=1.0'])
    with pytest.raises(ConfigError, match=r'model.npr.stage_weights has 1 entries'):
        load_config(TINY_CONFIG, ['model.npr.stage_weights=[1.0]'])
    with pytest.raises(ConfigError, match=r'fit_schedule_to_time_limit=true needs train.time_limit_minutes'):
        load_config(TINY_CONFIG, ['train.fit_schedule_to_time_limit=true'])
    with pytest.raises(ConfigError, match=r'model.image.embed_factors=\[1, 1, 1\] has 3 entries; expected one per '
                                          r'stage \(2, from model.image.depths=\[1, 1\]\)'):
        load_config(TINY_CONFIG, ['model.image.depths=[1,1]'])
    cfg = load_config(TINY_CONFIG)
    cfg.model.image_pooling = 'max'
    with pytest.raises(ConfigError, match=r"model.image_pooling must be 'tokens' or 'embeds', got 'max'"):
        pgseg.build_model(cfg.model)
