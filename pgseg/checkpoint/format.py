"""pgseg's checkpoint format, a directory::

    model.safetensors   weights (official key names)
    config.yaml         the resolved config (at least its ``model`` section)
    train_state.pt      optional: optimizer, scheduler, scaler, step, RNG, data position; loads with weights_only=True

written to a temporary sibling and renamed into place, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Callable

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from ..config import ConfigError, ModelConfig, TrainConfig, config_to_yaml, load_model_config
from .errors import CheckpointError

__all__ = ['WEIGHTS_NAME', 'CONFIG_NAME', 'STATE_NAME', 'is_pgseg_dir', 'write_dir_atomically', 'write_model_files',
           'save_checkpoint', 'load_checkpoint', 'read_train_state', 'read_checkpoint_file', 'find_latest',
           'list_checkpoints']

WEIGHTS_NAME, CONFIG_NAME, STATE_NAME = 'model.safetensors', 'config.yaml', 'train_state.pt'


def is_pgseg_dir(path: str) -> bool:
    """pgseg's own format: ``model.safetensors`` and ``config.yaml`` (a transformers folder has config.json)."""
    return os.path.isfile(os.path.join(path, WEIGHTS_NAME)) and os.path.isfile(os.path.join(path, CONFIG_NAME))


def write_file_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Create the file ``path`` whole or not at all: ``write(tmp)`` writes a temporary sibling, which then replaces
    ``path``. Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=os.path.dirname(path))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)  # mkstemp makes the file private (0600): give it the permissions open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_dir_atomically(path: str | os.PathLike, fill: Callable[[str], None]) -> str:
    """Create the directory ``path`` whole or not at all: ``fill(tmp)`` writes the files into a temporary sibling,
    which is then renamed into place (an existing ``path`` is replaced). Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.tmp-', dir=parent)
    try:
        fill(tmp)
        if os.path.exists(path):  # replace an older checkpoint of the same name: move it aside first
            old = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.old-', dir=parent)
            os.rename(path, os.path.join(old, 'ckpt'))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, config: TrainConfig | ModelConfig,
                    train_state: dict | None = None) -> str:
    """Write a pgseg checkpoint directory atomically (temporary sibling, then rename). Returns the path."""
    def fill(tmp: str) -> None:
        write_model_files(tmp, model, config)
        if train_state is not None:
            torch.save(train_state, os.path.join(tmp, STATE_NAME))
    return write_dir_atomically(path, fill)


def write_model_files(folder: str, model: torch.nn.Module, config: TrainConfig | ModelConfig) -> None:
    """``model.safetensors`` and ``config.yaml`` of ``model`` (unwrapped from DDP) into ``folder``."""
    model = getattr(model, 'module', model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(state, os.path.join(folder, WEIGHTS_NAME), metadata={'format': 'pgseg'})
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(model=config)
    with open(os.path.join(folder, CONFIG_NAME), 'w') as f:
        f.write(config_to_yaml(cfg))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig, dict | None]:
    """Read a pgseg checkpoint directory -> (state dict, model config, training state or None)."""
    path = os.fspath(path)
    if not is_pgseg_dir(path):
        raise CheckpointError(f'{path}: not a pgseg checkpoint directory (expected {WEIGHTS_NAME} and {CONFIG_NAME})')
    try:
        model_cfg = load_model_config(os.path.join(path, CONFIG_NAME))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    state = read_checkpoint_file(path, WEIGHTS_NAME, load_safetensors)
    train_state = None
    if os.path.isfile(os.path.join(path, STATE_NAME)):
        train_state = read_train_state(path)
    return state, model_cfg, train_state


def read_train_state(path: str | os.PathLike) -> dict:
    """The training state of checkpoint directory ``path`` (``train_state.pt``, weights-only)."""
    return read_checkpoint_file(path, STATE_NAME, lambda f: torch.load(f, map_location='cpu', weights_only=True))


def read_checkpoint_file(folder: str | os.PathLike, name: str, reader: Callable[[str], object]):
    """``reader(folder/name)``; a damaged file (truncated, garbage) is a CheckpointError naming it."""
    file = os.path.join(os.fspath(folder), name)
    try:
        return reader(file)
    except FileNotFoundError:
        raise CheckpointError(f'{folder}: {name} is missing') from None
    except Exception as exc:  # safetensors, pickle and zip readers each raise their own types for a damaged file
        raise CheckpointError(f'{folder}: {name} cannot be read ({type(exc).__name__}: '
                              f'{str(exc).splitlines()[0] if str(exc) else "damaged"})') from None


def find_latest(run_dir: str | os.PathLike, marker: str = WEIGHTS_NAME) -> str | None:
    """The newest complete checkpoint directory ``ckpt-<step>`` in ``run_dir`` (by step; complete = it holds
    ``marker``), or None."""
    found = list_checkpoints(run_dir, marker)
    return found[0] if found else None


def list_checkpoints(run_dir: str | os.PathLike, marker: str = WEIGHTS_NAME) -> list[str]:
    """The complete checkpoint directories ``ckpt-<step>`` of ``run_dir`` (they hold ``marker``), newest first."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = re.fullmatch(r'ckpt-(\d+)', name)
        if m and os.path.isfile(os.path.join(run_dir, name, marker)):
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]
