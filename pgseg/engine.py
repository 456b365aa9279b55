"""One training step, and the state a resumable run carries. Testable without any process group or data files.

Gradient accumulation: the step's ``micro_batches`` each compute their own contrastive loss, whose negatives are the
other pairs of *that* micro-batch (gathered over ranks), and the gradients are averaged. This reaches the memory of a
larger batch, not its loss: the contrastive loss of a batch of N*B pairs has more negatives than N losses of B pairs.
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .distributed import all_ranks_true, all_ranks_true_tensor

__all__ = ['StepResult', 'NonFiniteLossError', 'autocast_for', 'train_step', 'RunState', 'capture_rng', 'restore_rng']


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class StepResult:
    losses: dict[str, torch.Tensor]  # detached, averaged over micro-batches
    grad_norm: torch.Tensor  # before clipping
    applied: bool | torch.Tensor  # False when the step was skipped as non-finite (a 0-dim bool tensor, read lazily,
    # when the decision was taken on the device)


def autocast_for(device: torch.device, precision: str):
    """The autocast context of a resolved precision (``fp32``, ``bf16``, ``fp16``; ``auto`` is resolved once, before
    the steps, by :func:`pgseg.precision.resolve_precision`)."""
    if precision == 'fp32':
        return contextlib.nullcontext()
    if precision not in ('bf16', 'fp16'):
        raise ValueError(f'precision {precision!r}: expected fp32, bf16 or fp16 (resolve auto first: '
                         'pgseg.precision.resolve_precision)')
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}[precision]
    if dtype == torch.float16 and device.type != 'cuda':
        raise ValueError('train.precision=fp16 needs a GPU; use auto on the CPU (bf16 where native, else fp32)')
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(model: torch.nn.Module, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
               optimizer: torch.optim.Optimizer, precision: str = 'fp32', clip_grad: float | None = None,
               scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """Forward and backward over the micro-batches, clip, and step the optimizer unless the loss or the gradient
    is not finite (then the gradients are dropped and the parameters stay as they were)."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    totals: dict[str, torch.Tensor] = {}
    for i, (images, tokens) in enumerate(micro_batches):
        last = i == n - 1
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
        with sync:
            with autocast_for(device, precision):
                losses = model(images, tokens)
            loss = losses['loss'] / n
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + v.detach().float() / n
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else math.inf)
    if scaler is not None:  # fp16: the scaler skips steps with inf gradients and lowers its scale
        loss_ok = all_ranks_true(bool(torch.isfinite(totals['loss']).item()))  # host sync; ranks agree
        if loss_ok:
            scaler.step(optimizer)
        scaler.update()
        applied: bool | torch.Tensor = loss_ok
    else:
        # decided on the device: every rank applies the step only if loss and gradient norm are finite everywhere
        applied = all_ranks_true_tensor(torch.isfinite(totals['loss']) & torch.isfinite(grad_norm))
        if getattr(optimizer, 'defaults', {}).get('fused'):
            # the fused kernel reads found_inf on the device and leaves parameters, moments and step count alone
            # when it is 1: no device-to-host synchronisation in the step
            optimizer.found_inf = (~applied).to(torch.float32)
            try:
                optimizer.step()
            finally:
                optimizer.found_inf = None
        elif bool(applied):  # other optimizers: one host sync
            optimizer.step()
    return StepResult(losses=totals, grad_norm=grad_norm.detach(), applied=applied)


# ---------------------------------------------------------------------------------------------- resumable state
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
