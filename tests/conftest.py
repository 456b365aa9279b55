"""Shared fixtures: tiny configs and models that build in milliseconds on the CPU."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import pgseg
from pgseg.config import ModelConfig
from pgseg.data.synthetic import SceneConfig
from pgseg.data.synthetic_writers import write_caption_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, 'configs', 'tiny_test.yaml')
CAPTIONS = ['a red circle on grass', 'two dogs', 'a blue square and a yellow star', 'a cat']


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model_config(arch: str = 'pgseg', variant: str = 'paper') -> ModelConfig:
    cfg = copy.deepcopy(pgseg.load_config(TINY_CONFIG).model)
    cfg.arch = arch
    cfg.npr.variant = variant
    return cfg


def tiny_batch(batch: int = 4, size: int = 32, seed: int = 0):
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    tokens = pgseg.tokenize((CAPTIONS * batch)[:batch], context_length=16)
    return images, tokens


@pytest.fixture
def tiny_cfg():
    return tiny_model_config()


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    """A webdataset pattern over 4 tiny caption shards of 8 synthetic 32-pixel scenes each (one set per module)."""
    folder = tmp_path_factory.mktemp('shards')
    write_caption_shards(str(folder), 32, seed=0, samples_per_shard=8, scene=SceneConfig(size=32), progress=False)
    return str(folder / '{00000..00003}.tar')
