"""Shared fixtures: a fixed seed for every test, the tiny model config, tiny caption shards."""
from __future__ import annotations

import pytest
import torch

from pgseg.data.synthetic.scenes import SceneConfig
from pgseg.data.synthetic.writers import write_caption_shards
from tests.helpers import tiny_model_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg():
    return tiny_model_config()


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    """A webdataset pattern over 4 tiny caption shards of 8 synthetic 32-pixel scenes each (one set per module)."""
    folder = tmp_path_factory.mktemp('shards')
    write_caption_shards(str(folder), 32, seed=0, samples_per_shard=8, scene=SceneConfig(size=32), progress=False)
    return str(folder / '{00000..00003}.tar')
