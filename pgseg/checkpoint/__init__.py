"""Checkpoints: load any model file (pgseg's directory format, an official ``.pth``, a transformers GroupViT folder
or ``hf-hub:ORG/NAME`` from the local cache) strictly by key.

:mod:`.format` writes and reads pgseg's directories atomically; :mod:`.official` reads the official files without
running any code they hold; :mod:`.huggingface` reads and writes transformers' GroupViT folders. Run directories
(``ckpt-<step>``, resume, pruning) belong to the training harness
(:mod:`pgseg.training.checkpoints`).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from ..config import ConfigError, model_config_from_dict
from .errors import CheckpointError, UnsafeCheckpointError
from .format import (
    CONFIG_NAME,
    STATE_NAME,
    WEIGHTS_NAME,
    find_latest,
    is_pgseg_dir,
    list_checkpoints,
    load_checkpoint,
    read_train_state,
    save_checkpoint,
    write_dir_atomically,
)
from .huggingface import HF_PREFIX, export_hf, is_hf_groupvit_dir, resolve_hf_hub
from .official import infer_model_config, model_config_from_official, read_official_checkpoint

log = logging.getLogger(__name__)

__all__ = ['UnsafeCheckpointError', 'CheckpointError', 'LoadReport', 'read_official_checkpoint',
           'model_config_from_official', 'infer_model_config', 'load_state_into', 'save_checkpoint',
           'load_checkpoint', 'load_model', 'find_latest', 'list_checkpoints', 'read_train_state',
           'write_dir_atomically', 'NPR_ONLY_KEY', 'WEIGHTS_NAME', 'export_hf', 'describe_format', 'HF_PREFIX',
           'CONFIG_NAME', 'STATE_NAME']

# Keys a GroupViT file lacks when loaded into the PGSeg architecture, plus pgseg's paper buffers
# (docs/fidelity.md#groupvit-versus-pgseg-checkpoints).
NPR_ONLY_KEY = re.compile(r'(^img_encoder\.logit_scale$|\.downsample_spatial\.|^img_encoder\.mapping_text\.|'
                          r'^text_encoder\.Atten\.|^text_encoder\.token_prototypes\.)')


@dataclass
class LoadReport:
    fresh: list[str]  # model keys the file did not provide (left at initialisation)
    ignored: list[str]  # file keys the model has no place for

    def summary(self) -> str:
        lines = []
        if self.fresh:
            lines.append(f'{len(self.fresh)} entries start fresh: ' + ', '.join(self.fresh))
        if self.ignored:
            lines.append(f'{len(self.ignored)} entries ignored: ' + ', '.join(self.ignored))
        return '; '.join(lines) or 'all keys matched'


def load_state_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = 'checkpoint',
                    allow_npr_fresh: bool = False, allow_npr_ignored: bool = False) -> LoadReport:
    """Copy ``state_dict`` into ``model`` strictly: every key must match in name and shape.

    ``allow_npr_fresh`` lets PGSeg-only entries (NPR modules, their temperature, text prototypes) start fresh, the
    official fine-tuning recipe that starts PGSeg from a GroupViT file. ``allow_npr_ignored`` lets the file carry such
    entries that the model lacks (an official PGSeg file into pgseg's paper variant). Everything else must match.
    """
    own = model.state_dict()
    fresh = sorted(k for k in own if k not in state_dict)
    ignored = sorted(k for k in state_dict if k not in own)
    bad_fresh = [k for k in fresh if not (allow_npr_fresh and NPR_ONLY_KEY.search(k))]
    bad_ignored = [k for k in ignored if not (allow_npr_ignored and NPR_ONLY_KEY.search(k))]
    if bad_fresh or bad_ignored:
        raise CheckpointError(f'{source}: keys do not match the model. Missing from the file: '
                              f'{bad_fresh[:10]}{" ..." if len(bad_fresh) > 10 else ""}; not in the model: '
                              f'{bad_ignored[:10]}{" ..." if len(bad_ignored) > 10 else ""}')
    shapes = [f'{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}' for k, v in state_dict.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        raise CheckpointError(f'{source}: shape mismatch: ' + '; '.join(shapes[:10]))
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    report = LoadReport(fresh=fresh, ignored=ignored)
    if fresh or ignored:
        log.warning('%s: %s', source, report.summary())
    return report


def describe_format(path: str) -> str:
    """Which model format ``path`` holds, told by its files: ``'hf-hub'`` (a cache name), ``'pgseg'``,
    ``'transformers'``, ``'directory'`` (a folder that is neither) or ``'official'`` (a file)."""
    if path.startswith(HF_PREFIX):
        return 'hf-hub'
    if is_pgseg_dir(path):
        return 'pgseg'
    if is_hf_groupvit_dir(path):
        return 'transformers'
    return 'directory' if os.path.isdir(path) else 'official'


def load_model(path: str | os.PathLike, map_location: str | torch.device = 'cpu', npr_variant: str | None = None,
               overrides: dict | None = None):
    """Build the model a checkpoint describes and load its weights; returns it in eval mode.

    ``path``: a pgseg checkpoint directory (``model.safetensors`` + ``config.yaml``; a training run directory gives
    its newest ``ckpt-<step>``), an official GroupViT / PGSeg
    ``.pth`` file, a transformers GroupViT folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``),
    or ``hf-hub:ORG/NAME`` (a transformers GroupViT from the local Hugging Face cache; never downloaded). The format
    is told by the files (:func:`describe_format`). Official PGSeg files load as the ``reference`` NPR variant (their
    keys); pass ``npr_variant='paper'`` to fine-tune them with the fixed loss (the release's scalar text prototypes and
    unused ``mapping_text`` are then reported as ignored).
    """
    from ..models.groupseg import GroupSegModel
    from .huggingface import hf_state_to_pgseg, model_config_from_hf, read_hf_groupvit

    path = os.fspath(path)
    kind = describe_format(path)
    if kind == 'hf-hub':
        path = resolve_hf_hub(path)
        kind = describe_format(path)
        if kind != 'transformers':
            raise CheckpointError(f'{path}: the cached repository is not a transformers GroupViT folder '
                                  '(config.json and model.safetensors or pytorch_model.bin)')
    if kind == 'pgseg':
        state, cfg, _ = load_checkpoint(path)
        source = path
    elif kind == 'transformers':
        hf_config, hf_state = read_hf_groupvit(path)
        cfg = model_config_from_hf(hf_config)
        state = hf_state_to_pgseg(hf_state)
        source = f'{path} (transformers GroupViT)'
    elif kind == 'directory' and find_latest(path):  # a training run directory: its newest checkpoint
        path = find_latest(path)
        log.info('loading the newest checkpoint of the run: %s', path)
        state, cfg, _ = load_checkpoint(path)
        source = path
    elif kind == 'directory':
        raise CheckpointError(f'{path}: a folder, but not a model: expected pgseg\'s model.safetensors + config.yaml, '
                              "or transformers' config.json + model.safetensors (or pytorch_model.bin)")
    else:
        official = read_official_checkpoint(path)
        state = official.state_dict
        try:
            cfg = (model_config_from_official(official.config, state) if official.config is not None
                   else infer_model_config(state))
        except ConfigError as exc:
            raise CheckpointError(f'{path}: {exc}') from None
        source = f'{path} (official format)'
    if npr_variant is not None or overrides:
        values = OmegaConf.to_container(OmegaConf.structured(cfg))
        if npr_variant is not None:
            values['npr']['variant'] = npr_variant
        cfg = model_config_from_dict(OmegaConf.merge(values, overrides or {}), where='load_model overrides')
    model = GroupSegModel(cfg)
    load_state_into(model, state, source=source, allow_npr_fresh=npr_variant is not None,
                    allow_npr_ignored=npr_variant is not None)
    return model.to(map_location).eval()
