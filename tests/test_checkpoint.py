"""Checkpoints: round trip, atomic replace, official files (safe loading, strict keys), conversion."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from omegaconf import OmegaConf

import pgseg
from pgseg.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    find_latest,
    load_checkpoint,
    load_model,
    load_state_into,
    read_official_checkpoint,
    save_checkpoint,
)
from pgseg.convert import main as convert_main
from tests.helpers import tiny_batch, tiny_model_config


def _official_config(cfg) -> dict:
    """The official ``config.model`` layout for a pgseg ModelConfig."""
    img = cfg.image
    return {'model': {
        'type': 'MultiLabelContrastive',
        'img_encoder': {'type': 'PGSeg' if cfg.arch == 'pgseg' else 'GroupViT', 'img_size': img.img_size,
                        'patch_size': img.patch_size, 'embed_dim': img.embed_dim, 'embed_factors': img.embed_factors,
                        'num_heads': img.num_heads, 'depths': img.depths, 'num_group_tokens': img.num_group_tokens,
                        'num_output_groups': img.num_output_groups, 'drop_rate': 0.0, 'drop_path_rate': 0.1},
        'text_encoder': {'type': 'TextTransformer', 'context_length': cfg.text.context_length,
                         'width': cfg.text.width, 'layers': cfg.text.layers, 'vocab_size': cfg.text.vocab_size},
        'contrast_temperature': 0.07, 'proj_num_layers': 2, 'output_dim': cfg.output_dim,
        # the released configs pickle interpolations unresolved; a resolver must never be evaluated
        'multi_label': '${data.text_aug.multi_label}', 'proj_hidden_note': '${oc.env:HOME}'},
        'data': {'text_aug': {'multi_label': 0}}}


def _write_official(path, model, with_config=True):
    cfg = model.cfg
    payload = {'model': model.state_dict(), 'epoch': 29, 'metrics': {'max_miou': 0.0}}
    if with_config:
        payload['config'] = OmegaConf.create(_official_config(cfg))  # a pickled DictConfig, as the releases have
    torch.save(payload, path)


def _tiny_official(arch):
    cfg = tiny_model_config(arch, 'reference')
    cfg.text.heads = None  # the official rule: width // 64 (heads cannot be read from tensor shapes)
    cfg.image.num_heads = [max(1, cfg.image.embed_dim // 64)] * len(cfg.image.depths)
    cfg.npr.mapping_hidden_dim = 4096
    cfg.proj_hidden_dim = 4096
    return pgseg.build_model(cfg).eval()


def _outputs(model):
    images, tokens = tiny_batch(2)
    with torch.no_grad():
        out = model.encode_image(images)
        return out.image_embeds, out.group_embeds, model.encode_text(tokens)


def test_round_trip(tmp_path, tiny_cfg):
    model = pgseg.build_model(tiny_cfg).eval()
    train_state = {'step': 7, 'rng': torch.get_rng_state(), 'optimizer': {'lr': 0.1}}
    path = save_checkpoint(tmp_path / 'ckpt-000007', model, tiny_cfg, train_state=train_state)
    state, cfg, loaded_state = load_checkpoint(path)
    assert cfg == tiny_cfg
    assert loaded_state['step'] == 7 and torch.equal(loaded_state['rng'], train_state['rng'])
    again = load_model(path)
    for a, b in zip(_outputs(model), _outputs(again)):
        torch.testing.assert_close(a, b)
    assert find_latest(tmp_path) == str(path)


def test_save_replaces_atomically_and_leaves_no_temporaries(tmp_path, tiny_cfg):
    model = pgseg.build_model(tiny_cfg)
    path = tmp_path / 'ckpt-000001'
    save_checkpoint(path, model, tiny_cfg)
    with torch.no_grad():
        model.logit_scale.fill_(1.234)
    save_checkpoint(path, model, tiny_cfg)
    assert sorted(os.listdir(tmp_path)) == ['ckpt-000001']
    assert float(load_model(path).logit_scale.detach()) == pytest.approx(1.234)


def test_failed_save_keeps_previous(tmp_path, tiny_cfg, monkeypatch):
    model = pgseg.build_model(tiny_cfg)
    path = save_checkpoint(tmp_path / 'ckpt-000001', model, tiny_cfg)
    import pgseg.checkpoint as ck

    def boom(*a, **k):
        raise OSError('disk full')
    monkeypatch.setattr(ck.format, 'save_safetensors', boom)
    with pytest.raises(OSError):
        save_checkpoint(path, model, tiny_cfg)
    assert sorted(os.listdir(tmp_path)) == ['ckpt-000001']
    load_model(path)


@pytest.mark.parametrize('arch', ['pgseg', 'groupvit'])
def test_official_file_loads_and_computes_the_same(tmp_path, arch):
    model = _tiny_official(arch)
    _write_official(tmp_path / 'official.pth', model)
    loaded = load_model(tmp_path / 'official.pth')
    assert loaded.cfg.arch == arch and not loaded.training
    for a, b in zip(_outputs(model), _outputs(loaded)):
        torch.testing.assert_close(a, b)
    official = read_official_checkpoint(tmp_path / 'official.pth')
    assert official.meta['epoch'] == 29
    assert official.config['model']['multi_label'] == 0  # ${data.text_aug.multi_label} resolved
    assert official.config['model']['proj_hidden_note'] is None  # ${oc.env:...} not evaluated


def test_official_file_without_config_is_inferred(tmp_path):
    model = _tiny_official('pgseg')
    _write_official(tmp_path / 'bare.pth', model, with_config=False)
    loaded = load_model(tmp_path / 'bare.pth')  # heads follow width // 64, as the official rule
    for a, b in zip(_outputs(model), _outputs(loaded)):
        torch.testing.assert_close(a, b)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f'touch {self.target}',))


class _EvilOpen:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, 'w'))


@pytest.mark.parametrize('payload', [_Evil, _EvilOpen])
def test_malicious_pickle_is_refused_without_side_effects(tmp_path, payload):
    target = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'config': payload(str(target))}, path)
    with pytest.raises(UnsafeCheckpointError, match=r'refusing to load global (posix|os|nt|builtins|io)\.'):
        load_model(path)
    assert not target.exists()
    # the same protection when the payload hides in a plain pickle file
    with open(tmp_path / 'evil.pkl', 'wb') as f:
        pickle.dump({'model': payload(str(target))}, f)
    with pytest.raises(CheckpointError):
        read_official_checkpoint(tmp_path / 'evil.pkl')
    assert not target.exists()


def test_groupvit_into_pgseg_reports_fresh_npr_parts(tmp_path):
    groupvit = _tiny_official('groupvit')
    pgseg_model = _tiny_official('pgseg')
    report = load_state_into(pgseg_model, groupvit.state_dict(), allow_npr_fresh=True)
    expected = sorted(set(pgseg_model.state_dict()) - set(groupvit.state_dict()))
    assert report.fresh == expected and report.ignored == []
    assert any('downsample_spatial.mu' in k for k in report.fresh)
    assert 'img_encoder.logit_scale' in report.fresh and 'text_encoder.Atten.mu' in report.fresh
    with pytest.raises(CheckpointError, match='downsample_spatial'):  # strict by default
        load_state_into(pgseg_model, groupvit.state_dict())


def test_strict_mismatch_names_keys_and_shapes(tmp_path):
    model = _tiny_official('groupvit')
    state = model.state_dict()
    bad = dict(state)
    bad['surprise.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointError, match='surprise.weight'):
        load_state_into(model, bad)
    bad = dict(state)
    bad['logit_scale'] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r'logit_scale: file \(2,\) vs model \(\)'):
        load_state_into(model, bad)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match='not found'):
        load_model(tmp_path / 'nope.pth')
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='junk.pth'):
        load_model(tmp_path / 'junk.pth')


def test_convert_cli(tmp_path, capsys):
    model = _tiny_official('pgseg')
    _write_official(tmp_path / 'official.pth', model)
    assert convert_main([str(tmp_path / 'official.pth'), str(tmp_path / 'converted')]) == 0
    assert 'NPR variant reference' in capsys.readouterr().out
    converted = load_model(tmp_path / 'converted')
    for a, b in zip(_outputs(model), _outputs(converted)):
        torch.testing.assert_close(a, b)
    # fine-tuning with the fixed loss: the release-only parts are reported, not silently dropped
    assert convert_main([str(tmp_path / 'official.pth'), str(tmp_path / 'paper'), '--npr-variant', 'paper']) == 0
    assert load_model(tmp_path / 'paper').cfg.npr.variant == 'paper'
    assert convert_main([str(tmp_path / 'missing.pth'), str(tmp_path / 'x')]) == 2


def test_atomic_file_writes_leave_no_temporary_and_take_the_umask_permissions(tmp_path):
    """mkstemp's temporaries are private (0600); the file in place gets what open() would give it."""
    from pgseg.checkpoint.format import write_file_atomically
    old = os.umask(0o022)
    try:
        path = write_file_atomically(tmp_path / 'out.json', lambda tmp: open(tmp, 'w').write('{}'))
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644 and os.listdir(tmp_path) == ['out.json']

    def fail(tmp):
        raise RuntimeError('disk full')
    with pytest.raises(RuntimeError):
        write_file_atomically(tmp_path / 'other.json', fail)
    assert os.listdir(tmp_path) == ['out.json']  # nothing half-written, no temporary left
