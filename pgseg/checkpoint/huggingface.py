"""Hugging Face ``transformers`` GroupViT folders (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``),
read and written without importing ``transformers``, and ``hf-hub:ORG/NAME`` names resolved from the local cache only.

The weights are the official GroupViT's under other names (README.md#hugging-face-groupvit); pgseg keeps the
official names, so a folder is renamed key by key, the fused query-key-value projections split or joined, and the
projectors' 1x1 convolutions reshaped to linear layers. What ``transformers`` cannot express is refused by name:

- the PGSeg architecture (its NPR modules): ``export_hf(..., groupvit_part=True)`` writes the GroupViT part only;
- a stage whose group-token count differs from the previous stage's output-group count (``transformers`` sizes the
  group projector from the latter);
- the multi-label loss's own logit scale (a training-time parameter; left out with a note).
"""
from __future__ import annotations

import json
import logging
import os
import re

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from ..config import ModelConfig, model_config_from_dict
from .errors import CheckpointError
from .format import write_dir_atomically

log = logging.getLogger(__name__)

__all__ = ['HF_PREFIX', 'is_hf_groupvit_dir', 'resolve_hf_hub', 'read_hf_groupvit', 'model_config_from_hf',
           'hf_state_to_pgseg', 'pgseg_state_to_hf', 'hf_config_from_model', 'export_hf', 'summarise_keys']

HF_PREFIX = 'hf-hub:'
HF_CONFIG = 'config.json'
HF_WEIGHTS = ('model.safetensors', 'pytorch_model.bin')

# pgseg (official) name <-> transformers name, as templates: {i} and {j} stand for stage / layer numbers, a template
# ending in '.' is a prefix (the rest of the name carries over), any other is a whole name. The first rule that
# matches wins, in either direction: specific rules come before general ones.
_NAMES = [
    ('logit_scale', 'logit_scale'),
    ('img_encoder.pos_embed', 'vision_model.embeddings.position_embeddings'),
    ('img_encoder.patch_embed.proj.', 'vision_model.embeddings.patch_embeddings.projection.'),
    ('img_encoder.patch_embed.norm.', 'vision_model.embeddings.layernorm.'),
    ('img_encoder.norm.', 'vision_model.layernorm.'),
    ('img_encoder.layers.{i}.blocks.{j}.norm1.', 'vision_model.encoder.stages.{i}.layers.{j}.layer_norm1.'),
    ('img_encoder.layers.{i}.blocks.{j}.norm2.', 'vision_model.encoder.stages.{i}.layers.{j}.layer_norm2.'),
    ('img_encoder.layers.{i}.blocks.{j}.attn.proj.', 'vision_model.encoder.stages.{i}.layers.{j}.self_attn.out_proj.'),
    ('img_encoder.layers.{i}.blocks.{j}.mlp.', 'vision_model.encoder.stages.{i}.layers.{j}.mlp.'),
    ('img_encoder.layers.{i}.downsample.pre_assign_attn.attn.proj.',
     'vision_model.encoder.stages.{i}.downsample.pre_assign_attn.attn.out_proj.'),
    ('img_encoder.layers.{i}.', 'vision_model.encoder.stages.{i}.'),  # group tokens, grouping block, projector
    ('text_encoder.positional_embedding', 'text_model.embeddings.position_embedding.weight'),
    ('text_encoder.token_embedding.', 'text_model.embeddings.token_embedding.'),
    ('text_encoder.ln_final.', 'text_model.final_layer_norm.'),
    ('text_encoder.transformer.resblocks.{i}.ln_1.', 'text_model.encoder.layers.{i}.layer_norm1.'),
    ('text_encoder.transformer.resblocks.{i}.ln_2.', 'text_model.encoder.layers.{i}.layer_norm2.'),
    ('text_encoder.transformer.resblocks.{i}.attn.out_proj.', 'text_model.encoder.layers.{i}.self_attn.out_proj.'),
    ('text_encoder.transformer.resblocks.{i}.mlp.c_fc.', 'text_model.encoder.layers.{i}.mlp.fc1.'),
    ('text_encoder.transformer.resblocks.{i}.mlp.c_proj.', 'text_model.encoder.layers.{i}.mlp.fc2.'),
    ('img_projector.linear_out.', 'visual_projection.3.'),
    ('img_projector.linear_hidden.', 'visual_projection.'),
    ('text_projector.linear_out.', 'text_projection.3.'),
    ('text_projector.linear_hidden.', 'text_projection.'),
]
# fused query-key-value projections (pgseg, one [3C, C] tensor) <-> transformers' q_proj / k_proj / v_proj
_FUSED = [
    ('img_encoder.layers.{i}.blocks.{j}.attn.qkv.{kind}', 'vision_model.encoder.stages.{i}.layers.{j}.self_attn.'),
    ('text_encoder.transformer.resblocks.{i}.attn.in_proj_{kind}', 'text_model.encoder.layers.{i}.self_attn.'),
]


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for field in ('i', 'j'):
        pattern = pattern.replace(re.escape('{' + field + '}'), f'(?P<{field}>\\d+)')
    pattern = pattern.replace(re.escape('{kind}'), '(?P<kind>weight|bias)')
    pattern = pattern.replace(re.escape('{part}'), '(?P<part>[qkv])')
    return re.compile('^' + pattern + ('' if template.endswith('.') else '$'))


def _rename(key: str, to_hf: bool) -> str:
    for pgseg_name, hf_name in _NAMES:
        source, target = (pgseg_name, hf_name) if to_hf else (hf_name, pgseg_name)
        m = _template_regex(source).match(key)
        if m:
            return target.format(**m.groupdict()) + key[m.end():]
    side = 'transformers GroupViT' if to_hf else 'pgseg'
    raise CheckpointError(f'{"pgseg" if to_hf else "transformers GroupViT"} key {key!r} has no {side} counterpart')


def is_hf_groupvit_dir(path: str) -> bool:
    """A folder written by ``transformers``' ``save_pretrained`` for a GroupViT model (told by its files)."""
    if not os.path.isfile(os.path.join(path, HF_CONFIG)):
        return False
    return any(os.path.isfile(os.path.join(path, name)) for name in HF_WEIGHTS)


def resolve_hf_hub(name: str) -> str:
    """``hf-hub:ORG/NAME`` (optionally ``@revision``) -> the local snapshot folder, from the Hugging Face cache only
    (never a download); an error names the cache folder searched."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name
    repo, _, revision = repo.partition('@')
    if repo.count('/') != 1:
        raise CheckpointError(f'{name}: expected hf-hub:ORG/NAME')
    try:
        return snapshot_download(repo, revision=revision or None, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        raise CheckpointError(f'{name}: not in the local Hugging Face cache {HF_HUB_CACHE} (pgseg never downloads; '
                              f'fetch it where a network is available, e.g. `hf download {repo}`, and copy the cache '
                              f'folder, or set HF_HUB_CACHE): {type(exc).__name__}') from None


def read_hf_groupvit(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, state dict under transformers' names) of a GroupViT folder."""
    with open(os.path.join(path, HF_CONFIG)) as f:
        config = json.load(f)
    if config.get('model_type') != 'groupvit':
        raise CheckpointError(f'{os.path.join(path, HF_CONFIG)}: model_type {config.get("model_type")!r}; only '
                              "transformers' GroupViT ('groupvit') folders are read")
    weights = os.path.join(path, HF_WEIGHTS[0])
    if os.path.isfile(weights):
        state = load_safetensors(weights)
    else:
        weights = os.path.join(path, HF_WEIGHTS[1])
        state = torch.load(weights, map_location='cpu', weights_only=True)
    return config, state


def model_config_from_hf(config: dict) -> ModelConfig:
    """transformers' GroupViTConfig (as a dict) -> pgseg's GroupViT :class:`ModelConfig`."""
    v, t = config.get('vision_config', {}), config.get('text_config', {})
    # what pgseg fixes as the official code does: a folder that sets another value cannot load faithfully
    fixed = {'vision_config.hidden_act': (v.get('hidden_act', 'gelu'), 'gelu'),
             'text_config.hidden_act': (t.get('hidden_act', 'quick_gelu'), 'quick_gelu'),
             'vision_config.layer_norm_eps': (v.get('layer_norm_eps', 1e-5), 1e-5),
             'text_config.layer_norm_eps': (t.get('layer_norm_eps', 1e-5), 1e-5),
             'vision_config.assign_mlp_ratio': (list(v.get('assign_mlp_ratio', [0.5, 4])), [0.5, 4]),
             'vision_config.num_channels': (v.get('num_channels', 3), 3),
             'vision_config.intermediate_size / hidden_size': (
                 v.get('intermediate_size', 4 * v.get('hidden_size', 1)) / v.get('hidden_size', 1), 4),
             'text_config.intermediate_size / hidden_size': (
                 t.get('intermediate_size', 4 * t.get('hidden_size', 1)) / t.get('hidden_size', 1), 4)}
    other = [f'{key}={value!r} (pgseg: {expected!r})' for key, (value, expected) in fixed.items() if value != expected]
    if other:
        raise CheckpointError('transformers GroupViT config.json sets what pgseg fixes as the official code does: '
                              + ', '.join(other))
    try:
        depths = list(v['depths'])
        tokens, outputs = list(v['num_group_tokens']), list(v['num_output_groups'])
        width = int(v['hidden_size'])
        values = {
            'arch': 'groupvit',
            'image': {'img_size': int(v['image_size']), 'patch_size': int(v['patch_size']), 'embed_dim': width,
                      'depths': depths, 'embed_factors': [1] * len(depths),
                      'num_heads': [int(v['num_attention_heads'])] * len(depths), 'num_group_tokens': tokens,
                      'num_output_groups': outputs[:len(depths) - 1],
                      'mlp_ratio': float(v['intermediate_size']) / width,
                      'assign_eps': float(v.get('assign_eps', 1.0))},
            'text': {'context_length': int(t['max_position_embeddings']), 'width': int(t['hidden_size']),
                     'layers': int(t['num_hidden_layers']), 'heads': int(t['num_attention_heads']),
                     'vocab_size': int(t['vocab_size'])},
            'output_dim': int(config['projection_dim']),
            'proj_hidden_dim': int(config['projection_intermediate_dim']),
            'multi_label': 0,
        }
    except KeyError as exc:
        raise CheckpointError(f'GroupViT config.json: missing {exc}') from None
    _check_projector_sizes(tokens, outputs)
    return model_config_from_dict(values, where='transformers GroupViT config.json')


def hf_state_to_pgseg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers GroupViT state dict -> pgseg's (official) names and shapes."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith('.position_ids'):  # a buffer of the indices 0..L-1 that older transformers saved
            continue
        for pgseg_template, hf_prefix in _FUSED:
            m = _template_regex(hf_prefix + '{part}_proj.{kind}').match(key)
            if m:
                groups = m.groupdict()
                fused.setdefault(pgseg_template.format(**groups), {})[groups['part']] = value
                break
        else:
            name = _rename(key, to_hf=False)
            if name.startswith(('img_projector.', 'text_projector.')) and name.endswith('.weight') and value.ndim == 2:
                value = value.unsqueeze(-1)  # transformers' linear layers -> the official 1x1 convolutions
            out[name] = value
    for name, parts in fused.items():
        if set(parts) != {'q', 'k', 'v'}:
            raise CheckpointError(f'{name}: q_proj, k_proj and v_proj expected, found {sorted(parts)}')
        out[name] = torch.cat([parts['q'], parts['k'], parts['v']], dim=0)
    return out


def pgseg_state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pgseg's (official) GroupViT state dict -> transformers' names and shapes."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for pgseg_template, hf_prefix in _FUSED:
            m = _template_regex(pgseg_template).match(key)
            if m:
                groups = m.groupdict()
                prefix = hf_prefix.format(**groups)
                for name, part in zip('qkv', value.chunk(3, dim=0)):
                    out[f'{prefix}{name}_proj.{groups["kind"]}'] = part.clone()
                break
        else:
            name = _rename(key, to_hf=True)
            if name.startswith(('visual_projection.', 'text_projection.')) and value.ndim == 3:
                value = value.squeeze(-1)
            out[name] = value
    return out


def _check_projector_sizes(tokens: list[int], outputs: list[int]) -> None:
    """A stage's group projector mixes the previous stage's group tokens (the official rule, pgseg's);
    transformers sizes it from the previous stage's output groups: the two agree only where those counts are equal."""
    for i in range(1, len(tokens)):
        if tokens[i] and tokens[i - 1] != outputs[i - 1]:
            raise CheckpointError(
                f'stage {i - 1}: {tokens[i - 1]} group tokens but {outputs[i - 1]} output groups; the next stage\'s '
                'group projector takes the group tokens (official GroupViT) where transformers takes the output '
                'groups, so transformers cannot express this model')


def hf_config_from_model(cfg: ModelConfig) -> dict:
    """transformers' GroupViTConfig (as config.json's dict) of a pgseg GroupViT config; raises on what it cannot
    express."""
    img, txt = cfg.image, cfg.text
    if img.mlp_ratio != 4:  # the grouping block's MLP is 4 x width in the official code, intermediate_size in HF
        raise CheckpointError(f'image.mlp_ratio={img.mlp_ratio}: transformers GroupViT sizes the grouping block\'s '
                              'MLP from it too, where the official code keeps 4 x width; only 4 converts')
    if len(set(img.num_heads)) != 1 or set(img.embed_factors) != {1}:
        raise CheckpointError('transformers GroupViT has one width and head count for every stage; this model has '
                              f'embed_factors {img.embed_factors}, num_heads {img.num_heads}')
    _check_projector_sizes(img.num_group_tokens, img.num_output_groups)
    # settings of pgseg's that change the forward pass and that transformers' GroupViT has no place for
    official = {'image.assign_temperature': (img.assign_temperature, 1.0), 'image.assign_gain': (img.assign_gain, 1.0),
                'image.hard_assignment': (img.hard_assignment, True), 'image.qkv_bias': (img.qkv_bias, True),
                'image.patch_norm': (img.patch_norm, True), 'proj_num_layers': (cfg.proj_num_layers, 2),
                'image_pooling': (cfg.image_pooling, 'tokens')}
    departures = [f'{key}={value!r} (transformers: {expected!r})' for key, (value, expected) in official.items()
                  if value != expected]
    if departures:
        raise CheckpointError('transformers GroupViT computes only the official forward pass; this model sets '
                              + ', '.join(departures))
    outputs = list(img.num_output_groups) + [img.num_output_groups[-1]]
    return {
        'model_type': 'groupvit', 'architectures': ['GroupViTModel'],
        'projection_dim': cfg.output_dim, 'projection_intermediate_dim': cfg.proj_hidden_dim,
        'logit_scale_init_value': 2.6592,
        'vision_config': {'model_type': 'groupvit_vision_model', 'hidden_size': img.embed_dim,
                          'intermediate_size': int(round(img.embed_dim * img.mlp_ratio)),
                          'depths': list(img.depths), 'num_hidden_layers': sum(img.depths),
                          'num_group_tokens': list(img.num_group_tokens), 'num_output_groups': outputs,
                          'num_attention_heads': img.num_heads[0], 'image_size': img.img_size,
                          'patch_size': img.patch_size, 'num_channels': img.in_chans, 'hidden_act': 'gelu',
                          'layer_norm_eps': 1e-5, 'assign_eps': img.assign_eps, 'assign_mlp_ratio': [0.5, 4]},
        'text_config': {'model_type': 'groupvit_text_model', 'vocab_size': txt.vocab_size,
                        'hidden_size': txt.width, 'intermediate_size': 4 * txt.width,
                        'num_hidden_layers': txt.layers, 'num_attention_heads': txt.heads or max(1, txt.width // 64),
                        'max_position_embeddings': txt.context_length, 'hidden_act': 'quick_gelu',
                        'layer_norm_eps': 1e-5, 'bos_token_id': 49406, 'eos_token_id': 49407, 'pad_token_id': 1},
    }


def summarise_keys(keys: list[str]) -> str:
    """Keys grouped by module for a message: ``img_encoder.layers.0.downsample_spatial.* (9)``."""
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split('.')
        cut = next((i for i, p in enumerate(parts) if p in ('downsample_spatial', 'Atten', 'token_prototypes',
                                                            'mapping_text')), None)
        name = '.'.join(parts[:cut + 1]) + '.*' if cut is not None else key
        groups[name] = groups.get(name, 0) + 1
    return ', '.join(f'{name} ({n})' if n > 1 else name for name, n in groups.items())


def export_hf(path: str, model, groupvit_part: bool = False) -> tuple[str, list[str]]:
    """Write ``model`` as a transformers GroupViT folder (config.json + model.safetensors), atomically. Returns the
    folder and the keys left out. A PGSeg model is refused unless ``groupvit_part``: then its NPR modules are left
    out and the folder holds its GroupViT part."""
    from . import NPR_ONLY_KEY
    cfg: ModelConfig = model.cfg
    if cfg.arch != 'groupvit' and not groupvit_part:
        raise CheckpointError('a PGSeg model cannot be expressed in transformers (no NPR modules there); export its '
                              'GroupViT part explicitly (pgseg-convert --to hf --groupvit-part)')
    config = hf_config_from_model(cfg)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    left_out = sorted(k for k in state if NPR_ONLY_KEY.search(k) or k == 'multi_label_logit_scale')
    hf_state = pgseg_state_to_hf({k: v for k, v in state.items() if k not in left_out})
    if left_out:
        log.warning('not in the transformers folder: %s', summarise_keys(left_out))

    def fill(tmp: str) -> None:
        save_safetensors({k: v.contiguous() for k, v in hf_state.items()}, os.path.join(tmp, HF_WEIGHTS[0]),
                         metadata={'format': 'pt'})
        with open(os.path.join(tmp, HF_CONFIG), 'w') as f:
            json.dump(config, f, indent=2)
    return write_dir_atomically(path, fill), left_out
