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

__all__ = ['MetricsLogger']


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool = True, wandb_mode: str = 'offline', project: str = 'pgseg',
                 name: str | None = None, tags: list[str] | None = None, config: dict | None = None,
                 resume_id: str | None = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, 'metrics.jsonl')
        self._wandb = None
        self.wandb_id: str | None = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        mode = os.environ.get('WANDB_MODE', wandb_mode)
        if mode != 'disabled':
            try:
                import wandb
                run = wandb.init(project=project, name=name, tags=tags or None, config=config, dir=run_dir,
                                 mode=mode, id=resume_id, resume='allow' if resume_id else None)
                self._wandb, self.wandb_id = wandb, run.id
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
