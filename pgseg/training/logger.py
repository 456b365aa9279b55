"""One metrics interface: a JSONL file in the run directory (always) and wandb (imported lazily, offline by default).

Keys are namespaced (``train/loss_itc``, ``eval/voc/miou``). Only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)

__all__ = ['MetricsLogger', 'resolve_wandb_mode']


def resolve_wandb_mode(setting: str, setting_name: str = 'log.wandb_mode') -> tuple[str, str]:
    """(mode, what decided it). The ``WANDB_MODE`` environment variable, when set, wins over the setting (the
    Makefile and CI set it to ``disabled``; docs/configuration.md); when the two disagree a warning names both."""
    env = os.environ.get('WANDB_MODE')
    if env is None or env == setting:
        return setting, setting_name if env is None else f'{setting_name} and WANDB_MODE'
    log.warning('wandb: the environment variable WANDB_MODE=%s wins over %s=%s (unset WANDB_MODE to use the setting)',
                env, setting_name, setting)
    return env, 'WANDB_MODE'


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool = True, wandb_mode: str = 'offline', project: str = 'pgseg',
                 name: str | None = None, tags: list[str] | None = None, config: dict | None = None,
                 resume_id: str | None = None, setting_name: str = 'log.wandb_mode'):
        """``name`` defaults to the run directory's name; ``setting_name`` is how the user set ``wandb_mode`` (a
        config key or a command-line option), for the message when ``WANDB_MODE`` overrides it."""
        self.enabled = enabled
        self.path = os.path.join(run_dir, 'metrics.jsonl')
        self._wandb = None
        self.wandb_id: str | None = None
        # by default a run is named by its directory and the one above ('demo/train' for runs/demo/train)
        self.wandb_name = name or '/'.join(os.path.abspath(run_dir).split(os.sep)[-2:])
        self.wandb_mode = 'disabled'
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.wandb_mode, source = resolve_wandb_mode(wandb_mode, setting_name)
        if self.wandb_mode == 'disabled':
            log.info('wandb: disabled (%s)', source)
            return
        try:
            import wandb
            run = wandb.init(project=project, name=self.wandb_name, tags=tags or None, config=config, dir=run_dir,
                             mode=self.wandb_mode, id=resume_id, resume='allow' if resume_id else None)
            self._wandb, self.wandb_id = wandb, run.id
            log.info('wandb: %s run %r in project %r (mode from %s)', self.wandb_mode, self.wandb_name, project,
                     source)
        except Exception as exc:  # a dashboard problem must not stop training
            log.warning('wandb disabled: %s', exc)

    def log(self, step: int, values: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        """Append a JSON line {step, time, **values}; mirror to wandb (with PIL ``images`` when given)."""
        if not self.enabled:
            return
        row = {'step': step, 'time': time.time(), **{k: _plain(v) for k, v in values.items()}}
        if values:
            with open(self.path, 'a') as f:
                f.write(json.dumps(row) + '\n')
        if self._wandb is not None:
            payload = dict(row)
            payload.pop('time')
            payload.pop('step')
            for key, img in (images or {}).items():
                payload[key] = self._wandb.Image(img)
            self._wandb.log(payload, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _plain(v: Any) -> Any:
    if hasattr(v, 'item'):
        return v.item()
    return v
