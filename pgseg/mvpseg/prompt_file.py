"""The learned-prompts file (``prompts.pt``): the prompt learner's tensors plus what is needed to use them
elsewhere (the backbone spec, the prompt config, the classes and protocol they were learned on). It loads with
``torch.load(weights_only=True)`` (tensors, strings, numbers, lists and dicts only) and is written atomically."""
from __future__ import annotations

import dataclasses
import os

import torch

from ..checkpoint.format import write_file_atomically
from .backbones import BackboneConfig, DenseBackbone, build_backbone
from .learner import MultiViewPrompts, PromptConfig

__all__ = ['PROMPTS_FORMAT', 'save_prompts', 'load_prompts', 'load_prompt_classifier']

PROMPTS_FORMAT = 'pgseg-mvpseg-prompts'


def save_prompts(path: str, learner: MultiViewPrompts, backbone_cfg: BackboneConfig, meta: dict) -> None:
    payload = {'format': PROMPTS_FORMAT, 'version': 1, 'prompts': dataclasses.asdict(learner.cfg),
               'backbone': dataclasses.asdict(backbone_cfg),
               'state_dict': {k: v.detach().cpu() for k, v in learner.state_dict().items()}, 'meta': meta}
    write_file_atomically(path, lambda tmp: torch.save(payload, tmp))


def load_prompts(path: str, backbone: DenseBackbone | None = None, map_location: str | torch.device = 'cpu'
                 ) -> tuple[MultiViewPrompts, DenseBackbone, dict]:
    """-> (prompt learner, frozen backbone, meta). Without ``backbone``, the one named in the file is built (a pgseg
    checkpoint path or an open_clip spec)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'prompts file not found: {path}')
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get('format') != PROMPTS_FORMAT:
        raise ValueError(f'{path}: not a pgseg prompts file (expected format {PROMPTS_FORMAT!r}, written by '
                         f'pgseg-prompt-train)')
    if backbone is None:
        backbone = build_backbone(BackboneConfig(**payload['backbone']))
    cfg = PromptConfig(**{**payload['prompts'], 'init': None})  # the tensors come from the file
    learner = MultiViewPrompts(cfg, backbone)
    state = payload['state_dict']
    if state['ctx'].shape[-1] != backbone.token_dim:
        raise ValueError(f'{path}: prompts of width {state["ctx"].shape[-1]} do not fit this backbone\'s text width '
                         f'{backbone.token_dim}')
    learner.load_state_dict(state)
    learner.cfg = PromptConfig(**payload['prompts'])
    return learner.to(backbone.device), backbone, payload.get('meta', {})


def load_prompt_classifier(path: str, checkpoint: str | None = None) -> tuple[MultiViewPrompts, DenseBackbone, dict]:
    """A prompts file ready to classify pixels: -> (prompt learner, frozen backbone, meta). ``checkpoint``, when
    given, is the pgseg backbone to use instead of the one the file names (a checkpoint directory or official .pth)."""
    backbone = None
    if checkpoint:
        from ..checkpoint import load_model
        from .backbones import GroupSegDenseBackbone
        backbone = GroupSegDenseBackbone(load_model(checkpoint))
    return load_prompts(path, backbone)
