"""Official GroupViT / PGSeg ``.pth`` files: read safely, and the model config they describe.

They are pickles holding ``model`` (a state dict) and ``config`` (an OmegaConf ``DictConfig``). They are read with a
restricted unpickler: tensor storage and plain containers are allowed, the OmegaConf objects become inert stubs that
are turned into plain dicts, and any other global is refused with an error naming it, before anything is
constructed. Nothing in the file can run code.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ModelConfig, model_config_from_dict
from .errors import CheckpointError, UnsafeCheckpointError

__all__ = ['OfficialCheckpoint', 'read_official_checkpoint', 'model_config_from_official', 'infer_model_config']


_ALLOWED_GLOBALS = {
    ('torch._utils', '_rebuild_tensor'), ('torch._utils', '_rebuild_tensor_v2'), ('torch', 'Size'), ('torch', 'device'),
    ('collections', 'OrderedDict'), ('collections', 'defaultdict'),
    *(('builtins', n) for n in ('dict', 'list', 'tuple', 'set', 'frozenset', 'int', 'float', 'str', 'bool', 'bytes',
                                'complex', 'slice', 'bytearray')),
    *(('torch', n) for n in ('float32', 'float64', 'float16', 'bfloat16', 'int64', 'int32', 'int16', 'int8', 'uint8',
                             'bool')),
}
# Configuration objects of the training harness: replaced by inert stubs, never imported.
_STUBBED_MODULES = ('omegaconf', 'typing')


class _Stub:
    """Stands in for a pickled config object: stores the constructor arguments and state, runs nothing."""
    __slots__ = ('args', 'state')
    qualname = 'stub'

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f'<stub {self.qualname}>'


_STUB_TYPES: dict[str, type] = {}


def _stub_type(module: str, name: str) -> type:
    key = f'{module}.{name}'
    if key not in _STUB_TYPES:
        _STUB_TYPES[key] = type(name, (_Stub,), {'__slots__': (), 'qualname': key})
    return _STUB_TYPES[key]


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == '__builtin__':  # protocol-2 files written by Python 2 era tools name builtins this way
            module, name = 'builtins', {'long': 'int', 'unicode': 'str'}.get(name, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module.split('.')[0] in _STUBBED_MODULES:
            return _stub_type(module, name)
        raise UnsafeCheckpointError(
            f'refusing to load global {module}.{name}: official checkpoints hold only tensors, plain containers '
            f'and OmegaConf configs. If you trust this file, convert it with the code that wrote it.')


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an ``Unpickler`` and ``load``."""
    Unpickler = _RestrictedUnpickler
    __name__ = 'pgseg_restricted_pickle'

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def _plain(obj: Any) -> Any:
    """Stubbed OmegaConf containers and nodes -> plain dicts, lists and values."""
    if isinstance(obj, _Stub):
        state = obj.state if isinstance(obj.state, dict) else {}
        if '_content' in state:
            return _plain(state['_content'])
        if '_val' in state:
            return _plain(state['_val'])
        return None
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


@dataclass
class OfficialCheckpoint:
    state_dict: dict[str, torch.Tensor]
    config: dict | None  # the pickled OmegaConf config as plain data, if the file has one
    meta: dict = field(default_factory=dict)  # epoch, metrics, ... when present


def read_official_checkpoint(path: str | os.PathLike) -> OfficialCheckpoint:
    """Read an official GroupViT / PGSeg ``.pth`` safely (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    if not zipfile.is_zipfile(path):  # torch's legacy (tar) reader would extract members: never go there
        raise CheckpointError(f'{path}: not a PyTorch zip checkpoint (torch.save format of torch >= 1.6)')
    try:
        raw = torch.load(path, map_location='cpu', weights_only=False, pickle_module=_RestrictedPickleModule)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f'{path}: {exc}') from None
    except Exception as exc:
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})') from None
    try:
        if not isinstance(raw, dict):
            raise CheckpointError(f'expected a dict at the top level, found {type(raw).__name__}')
        state = raw.get('model', raw)
        if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
            raise CheckpointError("'model' is not a state dict of named tensors")
        state = {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state.items()}
        config = _resolve_references(_plain(raw['config'])) if 'config' in raw else None
        meta = {k: _plain(v) for k, v in raw.items() if k in ('epoch', 'metrics', 'max_accuracy', 'max_miou')}
    except (CheckpointError, RecursionError, AttributeError, TypeError) as exc:
        raise CheckpointError(f'{path}: malformed checkpoint: {exc}') from None
    return OfficialCheckpoint(state_dict=state, config=config, meta=meta)


_REFERENCE = re.compile(r'^\$\{([A-Za-z0-9_.]+)\}$')


def _resolve_references(config: Any) -> Any:
    """Resolve plain ``${a.b.c}`` node references inside the config (the released configs pickle them unresolved,
    e.g. ``model.multi_label: ${data.text_aug.multi_label}``). Resolvers such as ``${oc.env:...}`` are never
    evaluated: a value that is not a plain reference to an existing key becomes None, and the architecture falls
    back on what the tensors show."""
    def lookup(dotted: str, depth: int) -> Any:
        node = config
        for part in dotted.split('.'):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return walk(node, depth + 1)

    def walk(node: Any, depth: int = 0) -> Any:
        if depth > 20:
            return None  # a reference cycle
        if isinstance(node, dict):
            return {k: walk(v, depth) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, depth) for v in node]
        if isinstance(node, str) and '${' in node:
            m = _REFERENCE.match(node)
            return lookup(m.group(1), depth) if m else None
        return node

    return walk(config)


# ---------------------------------------------------------------------------------------------- official -> config
def model_config_from_official(config: dict, state_dict: dict[str, torch.Tensor]) -> ModelConfig:
    """Translate the official ``config.model`` section to a :class:`ModelConfig` (reference NPR variant, so that
    the official keys match one to one)."""
    m = config.get('model', config)
    img, txt = m.get('img_encoder', {}), m.get('text_encoder', {})
    img_type = str(img.get('type', ''))
    arch = 'pgseg' if img_type == 'PGSeg' or 'img_encoder.layers.0.downsample_spatial.mu' in state_dict else 'groupvit'
    image = {k: img[k] for k in ('img_size', 'patch_size', 'embed_dim', 'embed_factors', 'depths', 'num_heads',
                                 'num_group_tokens', 'num_output_groups', 'drop_rate', 'drop_path_rate',
                                 'attn_drop_rate', 'mlp_ratio', 'qkv_bias', 'patch_norm', 'hard_assignment')
             if img.get(k) is not None}
    text = {k: txt[k] for k in ('context_length', 'width', 'layers', 'vocab_size') if txt.get(k) is not None}
    values: dict[str, Any] = {'arch': arch, 'image': image, 'text': text}
    for key in ('output_dim', 'contrast_temperature', 'proj_num_layers', 'multi_label', 'share_temperature',
                'multi_label_loss_weight'):
        if m.get(key) is not None:
            values[key] = m[key]
    if 'multi_label' not in values:  # unresolvable in the file: the tensors tell whether the loss was on
        values['multi_label'] = 1 if 'multi_label_logit_scale' in state_dict else 0
    _add_shape_facts(values, state_dict)
    return model_config_from_dict(values, where='official checkpoint config')


def _add_shape_facts(values: dict, state_dict: dict[str, torch.Tensor]) -> None:
    """Sizes the official config never states but the tensors show: projection and NPR widths, prototype counts."""
    proj = state_dict.get('img_projector.linear_hidden.0.weight')
    if proj is not None:
        values['proj_hidden_dim'] = int(proj.shape[0])
    if values['arch'] == 'pgseg':
        npr = values.setdefault('npr', {})
        npr['variant'] = 'reference'
        mu = state_dict.get('text_encoder.Atten.mu')
        if mu is not None:
            npr['num_text_prototypes'] = int(mu.shape[1])
        mapping = state_dict.get('img_encoder.layers.0.downsample_spatial.mapping_x.linear_hidden.0.weight')
        if mapping is not None:
            npr['mapping_hidden_dim'] = int(mapping.shape[0])


def infer_model_config(state_dict: dict[str, torch.Tensor]) -> ModelConfig:
    """Best-effort config from tensor shapes alone, for files without a config. Head counts cannot be read from
    shapes: they follow the official rule (width // 64)."""
    s = state_dict
    try:
        embed = s['img_encoder.pos_embed'].shape[-1]
        patch = s['img_encoder.patch_embed.proj.weight'].shape[-1]
        side = int(round(s['img_encoder.pos_embed'].shape[1] ** 0.5))
        n_stages = 1 + max(int(k.split('.')[2]) for k in s if k.startswith('img_encoder.layers.'))
        depths = [1 + max([int(k.split('.')[4]) for k in s if k.startswith(f'img_encoder.layers.{i}.blocks.')],
                          default=-1) for i in range(n_stages)]
        groups = [s[f'img_encoder.layers.{i}.group_token'].shape[1] if f'img_encoder.layers.{i}.group_token' in s
                  else 0 for i in range(n_stages)]
        outs = [s[f'img_encoder.layers.{i}.downsample.mlp_inter.fc2.weight'].shape[0] for i in range(n_stages - 1)]
        width = s['text_encoder.positional_embedding'].shape[1]
        layers = 1 + max(int(k.split('.')[3]) for k in s if k.startswith('text_encoder.transformer.resblocks.'))
        values = {
            'arch': 'pgseg' if 'img_encoder.layers.0.downsample_spatial.mu' in s else 'groupvit',
            'image': {'img_size': side * patch, 'patch_size': patch, 'embed_dim': embed, 'depths': depths,
                      'embed_factors': [1] * n_stages, 'num_heads': [max(1, embed // 64)] * n_stages,
                      'num_group_tokens': groups, 'num_output_groups': outs},
            'text': {'context_length': s['text_encoder.positional_embedding'].shape[0], 'width': width,
                     'layers': layers, 'vocab_size': s['text_encoder.token_embedding.weight'].shape[0]},
            'output_dim': s['img_projector.linear_out.weight'].shape[0],
            'multi_label': 1 if 'multi_label_logit_scale' in s else 0,
        }
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f'cannot infer the architecture from the state dict (missing {exc})') from None
    _add_shape_facts(values, s)
    return model_config_from_dict(values, where='inferred from tensor shapes')
