"""Helpers the tests import: the tiny config (a model that builds in milliseconds on the CPU) and batches for it."""
from __future__ import annotations

import copy
import os

import torch

import pgseg
from pgseg.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, 'tests', 'fixtures', 'tiny.yaml')
CAPTIONS = ['a red circle on grass', 'two dogs', 'a blue square and a yellow star', 'a cat']


def tiny_model_config(arch: str = 'pgseg', variant: str = 'paper') -> ModelConfig:
    cfg = copy.deepcopy(pgseg.load_config(TINY_CONFIG).model)
    cfg.arch = arch
    cfg.npr.variant = variant
    return cfg


def tiny_batch(batch: int = 4, size: int = 32, seed: int = 0):
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    tokens = pgseg.tokenize((CAPTIONS * batch)[:batch], context_length=16)
    return images, tokens
