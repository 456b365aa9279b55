"""The loop both trainers share: the run directory, the cadences (log, checkpoint, stop), the time limit, the
non-finite guard's bookkeeping and the progress bar. A trainer owns its step and its data; each step it calls
:meth:`Harness.step_done`, then the cadences it needs, then :meth:`Harness.should_stop`:

    harness = Harness(run_dir, settings, writer, logger, state)
    while not harness.should_stop():
        result = my_step(next(batches))
        harness.step_done(result.applied)
        if harness.log_due():
            harness.log({...})
        if harness.due(checkpoint_every):
            harness.save(train_state)
    harness.finish(train_state)
"""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .. import __version__
from ..runtime.distributed import broadcast_flag, get_world_size, is_main_process
from .checkpoints import CheckpointWriter
from .logger import MetricsLogger
from .state import RunState

log = logging.getLogger('pgseg.train')

__all__ = ['LoopSettings', 'Harness', 'environment_info', 'write_run_files', 'start_run_record']


@dataclass
class LoopSettings:
    total_steps: int  # the schedule's length
    max_steps: int | None = None  # stop earlier, with a checkpoint, the schedule unchanged
    time_limit_minutes: float | None = None  # stop cleanly, with a checkpoint, once this much wall time has passed
    log_every: int = 10
    max_nonfinite_steps: int = 20  # consecutive skipped steps that end the run (NonFiniteLossError)


def environment_info() -> dict:
    """Versions, git revision, host, world size, devices and the command line: the run's ``env.json``."""
    def version(name):
        try:
            return __import__(name).__version__
        except Exception:
            return None
    try:
        rev = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except Exception:
        rev = None
    return {'pgseg': __version__, 'git_revision': rev, 'python': sys.version.split()[0], 'torch': torch.__version__,
            'timm': version('timm'), 'open_clip': version('open_clip'), 'webdataset': version('webdataset'),
            'world_size': get_world_size(), 'host': platform.node(), 'cuda_devices': torch.cuda.device_count(),
            'torch_threads': torch.get_num_threads(), 'command': sys.argv}


def write_run_files(run_dir: str, config_yaml: str, precision: str) -> None:
    """The run's record, written by rank 0: ``config.yaml`` (the resolved config) and ``env.json``
    (:func:`environment_info` and the precision the run resolved, as every trainer writes it)."""
    os.makedirs(run_dir, exist_ok=True)
    if not is_main_process():
        return
    with open(os.path.join(run_dir, 'config.yaml'), 'w') as f:
        f.write(config_yaml)
    with open(os.path.join(run_dir, 'env.json'), 'w') as f:
        json.dump({**environment_info(), 'precision': precision}, f, indent=1)


def start_run_record(run_dir: str, cfg, precision: str, state: RunState) -> MetricsLogger:
    """The MVP-SEG trainers' start of a run: :func:`write_run_files` (once the run is known to start, so a failed
    start leaves an existing run's record alone) and the metrics logger, resuming the run's wandb id."""
    from ..config import config_to_dict, config_to_yaml
    write_run_files(run_dir, config_to_yaml(cfg), precision)
    logger = MetricsLogger(run_dir, enabled=is_main_process(), wandb_mode=cfg.log.wandb_mode,
                           project=cfg.log.wandb_project, name=cfg.log.wandb_name, tags=cfg.log.wandb_tags,
                           config=json.loads(json.dumps(config_to_dict(cfg))), resume_id=state.wandb_id)
    state.wandb_id = logger.wandb_id or state.wandb_id
    return logger


class Harness:
    """Counts steps, logs, checkpoints and decides when to stop, the same way for every trainer.

    Non-finite steps: each step's ``applied`` flag (a bool, or a 0-dim device tensor decided without a host sync)
    is kept and read only at log and checkpoint time, where a streak of ``max_nonfinite_steps`` raises
    :class:`~pgseg.training.state.NonFiniteLossError`."""

    def __init__(self, run_dir: str, settings: LoopSettings, writer: CheckpointWriter, logger: MetricsLogger,
                 state: RunState):
        self.run_dir, self.settings, self.writer, self.logger, self.state = run_dir, settings, writer, logger, state
        self.start = self.last_log = time.time()
        self.pending: list[bool | torch.Tensor] = []
        self.bar = tqdm(total=settings.total_steps, initial=state.step, disable=not is_main_process(), unit='step',
                        dynamic_ncols=True)

    # ------------------------------------------------------------------ the step
    def step_done(self, applied: bool | torch.Tensor) -> None:
        self.pending.append(applied)
        self.state.step += 1
        self.bar.update(1)

    def due(self, every: int | None) -> bool:
        """Whether a cadence of ``every`` steps falls on this step (never for 0 or None)."""
        return bool(every) and self.state.step % every == 0

    def log_due(self) -> bool:
        return self.due(self.settings.log_every) or self.state.step == 1

    def settle_nonfinite(self) -> None:
        """Read the kept flags in order (a host sync): a streak of non-finite steps raises."""
        for applied in self.pending:
            self.state.count_step(bool(applied), self.settings.max_nonfinite_steps)
        self.pending = []

    # ------------------------------------------------------------------ cadences
    def log(self, values: dict, postfix: dict | None = None, images_per_step: int | None = None) -> None:
        """Log ``values`` at this step with the mean step time since the last log (``train/step_time_s``), the
        non-finite count, and with ``images_per_step`` the throughput (``train/images_per_s``)."""
        self.settle_nonfinite()
        now = time.time()
        step_time = (now - self.last_log) / (1 if self.state.step == 1 else self.settings.log_every)
        self.last_log = now
        values = {**values, 'train/step_time_s': step_time, 'train/nonfinite_steps': self.state.nonfinite_total}
        if images_per_step:
            values['train/images_per_s'] = images_per_step / max(step_time, 1e-9)
            postfix = {**(postfix or {}), 'img_s': f"{values['train/images_per_s']:.1f}"}
        self.logger.log(self.state.step, values)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def save(self, train_state: dict, rank_state: dict | None = None, name: str | None = None) -> str:
        self.settle_nonfinite()
        return self.writer.save(self.state, train_state, rank_state, name)

    def should_stop(self) -> bool:
        """Step limits are the same on every rank. The time limit differs by rank, so rank 0 decides and broadcasts,
        and only on log steps: no collective or host sync on the other steps."""
        s, step = self.settings, self.state.step
        if step >= s.total_steps or (s.max_steps is not None and step >= s.max_steps):
            return True
        if s.time_limit_minutes is None or step % s.log_every:
            return False
        if broadcast_flag(time.time() - self.start > 60 * s.time_limit_minutes):
            log.info('time limit of %.1f minutes reached at step %d: stopping with a checkpoint',
                     s.time_limit_minutes, step)
            return True
        return False

    def finish(self, train_state: dict, rank_state: dict | None = None) -> str:
        """The final checkpoint; closes the bar and the logger."""
        self.bar.close()
        path = self.save(train_state, rank_state)
        if is_main_process():
            log.info('stopped at step %d; checkpoint in %s', self.state.step, self.run_dir)
        return path

    def close(self) -> None:
        self.logger.close()
