"""transformers' GroupViT folders in and out: a small random model converted both ways, embeddings and group maps
equal to transformers' own outputs, a round trip bit-exact, hf-hub: names from the local cache only."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from omegaconf import OmegaConf

import pgseg
from pgseg.checkpoint import CheckpointError, export_hf, load_model, save_checkpoint
from pgseg.config import model_config_from_dict
from pgseg.convert import main as convert_main
from tests.helpers import tiny_model_config

transformers = pytest.importorskip('transformers')

HF_CONFIG = dict(
    text_config=dict(hidden_size=32, intermediate_size=128, num_attention_heads=2, num_hidden_layers=1,
                     max_position_embeddings=16),
    vision_config=dict(hidden_size=32, intermediate_size=128, depths=[1, 1, 1], num_hidden_layers=3,
                       num_attention_heads=2, num_group_tokens=[8, 4, 0], num_output_groups=[8, 4, 4], image_size=32,
                       patch_size=8),
    projection_dim=16, projection_intermediate_dim=64)


def _random_hf(seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.GroupViTModel(transformers.GroupViTConfig(**HF_CONFIG)).eval()
    with torch.no_grad():  # statistics and scale away from their initial values, so a mix-up shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        model.logit_scale.fill_(2.0)
    return model


def _inputs():
    torch.manual_seed(1)
    ids = torch.randint(1, 49000, (3, 16))
    ids[:, 9] = 49407  # end of text, then padding
    ids[:, 10:] = 0
    return torch.randn(2, 3, 32, 32), ids


def _groupvit_model(seed: int = 2):
    values = OmegaConf.to_container(OmegaConf.structured(tiny_model_config()))
    values['arch'] = 'groupvit'
    values['image']['assign_eps'] = 0.5  # not the default: the round trip must carry it
    torch.manual_seed(seed)
    return pgseg.build_model(model_config_from_dict(values)).eval()


def _architecture(cfg) -> tuple:
    """What shapes the weights (training-time regularisation such as drop path is not in a transformers folder)."""
    image = {k: getattr(cfg.image, k) for k in ('img_size', 'patch_size', 'embed_dim', 'depths', 'num_heads',
                                                 'num_group_tokens', 'num_output_groups', 'mlp_ratio', 'assign_eps',
                                                 'assign_temperature', 'assign_gain', 'hard_assignment')}
    return cfg.arch, image, cfg.text, cfg.output_dim, cfg.proj_hidden_dim


def test_a_transformers_folder_loads_with_its_embeddings_and_group_maps(tmp_path):
    hf = _random_hf()
    hf.save_pretrained(tmp_path / 'hf')
    model = load_model(str(tmp_path / 'hf'))  # config.json + model.safetensors: told apart from pgseg's format
    images, ids = _inputs()
    with torch.no_grad():
        hf_image = hf.get_image_features(pixel_values=images)
        hf_text = hf.get_text_features(input_ids=ids)
        attentions = hf.vision_model(pixel_values=images, output_attentions=True).attentions  # [B, G_s, N_s] each
        out = model.encode_image(images)
        text = model.encode_text(ids)
    hf_image = getattr(hf_image, 'pooler_output', hf_image)
    hf_text = getattr(hf_text, 'pooler_output', hf_text)
    torch.testing.assert_close(out.image_embeds, hf_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text, hf_text, rtol=1e-5, atol=1e-5)
    composed = attentions[0].transpose(1, 2)  # [B, patches, G0]
    torch.testing.assert_close(out.group_maps[0], composed, rtol=1e-5, atol=1e-5)
    composed = composed @ attentions[1].transpose(1, 2)  # [B, patches, G1]
    torch.testing.assert_close(out.group_maps[1], composed, rtol=1e-5, atol=1e-5)
    assert model.logit_scale.item() == pytest.approx(2.0)
    # the same weights as pytorch_model.bin
    (tmp_path / 'bin').mkdir()
    shutil.copy(tmp_path / 'hf/config.json', tmp_path / 'bin/config.json')
    # as older transformers saved them: with the text's position_ids buffer
    torch.save({**hf.state_dict(), 'text_model.embeddings.position_ids': torch.arange(16)[None]},
               tmp_path / 'bin/pytorch_model.bin')
    for key, value in load_model(str(tmp_path / 'bin')).state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key], rtol=0, atol=0)


def test_pgseg_to_transformers_and_back_is_bit_exact(tmp_path):
    model = _groupvit_model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_()
    folder, left_out = export_hf(str(tmp_path / 'out'), model)
    assert left_out == [] and sorted(os.listdir(folder)) == ['config.json', 'model.safetensors']
    hf = transformers.GroupViTModel.from_pretrained(folder).eval()
    images, ids = _inputs()
    with torch.no_grad():
        hf_image = hf.get_image_features(pixel_values=images)
        hf_image = getattr(hf_image, 'pooler_output', hf_image)
        torch.testing.assert_close(hf_image, model.encode_image(images).image_embeds, rtol=1e-5, atol=1e-5)
    back = load_model(folder)
    assert _architecture(back.cfg) == _architecture(model.cfg)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_what_transformers_cannot_express_is_refused_or_left_out_by_name(tmp_path):
    pgseg_model = pgseg.build_model(tiny_model_config()).eval()  # the PGSeg architecture
    with pytest.raises(CheckpointError, match='GroupViT part explicitly'):
        export_hf(str(tmp_path / 'no'), pgseg_model)
    assert not (tmp_path / 'no').exists()
    folder, left_out = export_hf(str(tmp_path / 'part'), pgseg_model, groupvit_part=True)
    assert left_out and all('downsample_spatial' in k or 'text_encoder.Atten' in k or 'logit_scale' in k
                            or 'mapping' in k or 'prototypes' in k for k in left_out)
    transformers.GroupViTModel.from_pretrained(folder)  # the GroupViT part loads into transformers
    values = OmegaConf.to_container(OmegaConf.structured(tiny_model_config()))
    values.update(arch='groupvit')
    values['image'].update(num_group_tokens=[8, 4, 0], num_output_groups=[6, 4])  # 8 tokens grouped into 6
    odd = pgseg.build_model(model_config_from_dict(values))
    with pytest.raises(CheckpointError, match='group projector'):
        export_hf(str(tmp_path / 'odd'), odd)
    values['image'].update(num_group_tokens=[8, 4, 0], num_output_groups=[8, 4], assign_temperature=0.1)
    sharpened = pgseg.build_model(model_config_from_dict(values))  # a pgseg option the official forward lacks
    with pytest.raises(CheckpointError, match=r'image.assign_temperature=0.1 \(transformers: 1.0\)'):
        export_hf(str(tmp_path / 'sharp'), sharpened)
    assert not (tmp_path / 'sharp').exists()


def test_hf_hub_names_come_from_the_local_cache_only(tmp_path, monkeypatch):
    from huggingface_hub import constants
    cache = tmp_path / 'cache'
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    with pytest.raises(CheckpointError, match=f'not in the local Hugging Face cache {cache}'):
        load_model('hf-hub:someone/groupvit-tiny')
    snapshot = cache / 'models--someone--groupvit-tiny' / 'snapshots' / 'abc123'
    _random_hf().save_pretrained(snapshot)
    (cache / 'models--someone--groupvit-tiny' / 'refs').mkdir()
    (cache / 'models--someone--groupvit-tiny' / 'refs' / 'main').write_text('abc123')
    model = load_model('hf-hub:someone/groupvit-tiny')
    assert model.cfg.arch == 'groupvit' and model.cfg.image.num_group_tokens == [8, 4, 0]


def test_folders_are_told_apart_by_their_files(tmp_path):
    model = _groupvit_model()
    save_checkpoint(str(tmp_path / 'pgseg'), model, model.cfg)
    export_hf(str(tmp_path / 'hf'), model)
    assert _architecture(load_model(str(tmp_path / 'pgseg')).cfg) == _architecture(load_model(str(tmp_path / 'hf')).cfg)
    save_checkpoint(str(tmp_path / 'run/ckpt-00000004'), model, model.cfg)  # a run directory: its newest
    assert _architecture(load_model(str(tmp_path / 'run')).cfg) == _architecture(model.cfg)
    (tmp_path / 'bare').mkdir()
    shutil.copy(tmp_path / 'hf/model.safetensors', tmp_path / 'bare/model.safetensors')
    with pytest.raises(CheckpointError, match='a folder, but not a model'):
        load_model(str(tmp_path / 'bare'))
    config = json.loads((tmp_path / 'hf/config.json').read_text())
    assert config['vision_config']['assign_eps'] == model.cfg.image.assign_eps
    for key, value in (('hidden_act', 'relu'), ('assign_mlp_ratio', [0.5, 2])):  # what pgseg fixes, refused by name
        changed = dict(config, vision_config=dict(config['vision_config'], **{key: value}))
        (tmp_path / 'hf/config.json').write_text(json.dumps(changed))
        with pytest.raises(CheckpointError, match=f'vision_config.{key}='):
            load_model(str(tmp_path / 'hf'))
    (tmp_path / 'hf/config.json').write_text(json.dumps(dict(config, model_type='clip')))
    with pytest.raises(CheckpointError, match="model_type 'clip'"):
        load_model(str(tmp_path / 'hf'))


def test_convert_command_both_ways(tmp_path, capsys):
    model = _groupvit_model()
    save_checkpoint(str(tmp_path / 'ckpt'), model, model.cfg)
    assert convert_main([str(tmp_path / 'ckpt'), str(tmp_path / 'hf'), '--to', 'hf']) == 0
    assert 'transformers GroupViT of the groupvit model' in capsys.readouterr().out
    assert convert_main([str(tmp_path / 'hf'), str(tmp_path / 'again')]) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(load_model(str(tmp_path / 'again')).state_dict()[key], value)
    assert convert_main([str(tmp_path / 'missing'), str(tmp_path / 'x')]) == 2
