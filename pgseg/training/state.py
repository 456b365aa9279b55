"""The state a resumable run carries besides model, optimizer, scheduler and scaler: counters and every RNG."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ['NonFiniteLossError', 'RunState', 'capture_rng', 'restore_rng']


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def capture_rng() -> dict:
    """Every RNG this process uses, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state['numpy']
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


@dataclass
class RunState:
    """Counters a run carries across restarts (besides model, optimizer, scheduler and scaler)."""
    step: int = 0
    epoch: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples, by reason, summed over ranks and epochs
    best_metric: float | None = None
    wandb_id: str | None = None
    total_steps: int | None = None  # the schedule's length once fitted to the time limit (kept across restarts)

    def count_step(self, applied: bool, max_streak: int) -> None:
        if applied:
            self.nonfinite_streak = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_streak += 1
        if self.nonfinite_streak >= max_streak:
            raise NonFiniteLossError(f'{self.nonfinite_streak} consecutive steps had a non-finite loss or gradient '
                                     f'(last at step {self.step}); lower optim.lr, check the data, or use bf16 '
                                     f'instead of fp16 (train.max_nonfinite_steps={max_streak})')

    def state_dict(self) -> dict:
        return {'step': self.step, 'epoch': self.epoch, 'nonfinite_total': self.nonfinite_total,
                'nonfinite_streak': self.nonfinite_streak, 'skipped': dict(self.skipped),
                'best_metric': self.best_metric, 'wandb_id': self.wandb_id, 'total_steps': self.total_steps}

    @classmethod
    def from_state(cls, state: dict) -> RunState:
        return cls(**state)
