"""One training step: forward, backward, clipping and the optimizer step. Testable without a process group or data.

Gradient accumulation: the step's ``micro_batches`` each compute their own contrastive loss, whose negatives are the
other pairs of *that* micro-batch (gathered over ranks), and the gradients are averaged. This reaches the memory of a
larger batch, not its loss: the contrastive loss of a batch of N*B pairs has more negatives than N losses of B pairs.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from ..runtime.distributed import all_ranks_true, all_ranks_true_tensor

__all__ = ['StepResult', 'autocast_for', 'train_step']


@dataclass
class StepResult:
    losses: dict[str, torch.Tensor]  # detached, averaged over micro-batches
    grad_norm: torch.Tensor  # before clipping
    applied: bool | torch.Tensor  # False when the step was skipped as non-finite (a 0-dim bool tensor, read lazily,
    # when the decision was taken on the device)


def autocast_for(device: torch.device, precision: str):
    """The autocast context of a resolved precision (``fp32``, ``bf16``, ``fp16``; ``auto`` is resolved once, before
    the steps, by :func:`pgseg.runtime.precision.resolve_precision`)."""
    if precision == 'fp32':
        return contextlib.nullcontext()
    if precision not in ('bf16', 'fp16'):
        raise ValueError(f'precision {precision!r}: expected fp32, bf16 or fp16 (resolve auto first: '
                         'pgseg.runtime.precision.resolve_precision)')
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}[precision]
    if dtype == torch.float16 and device.type != 'cuda':
        raise ValueError('train.precision=fp16 needs a GPU; use auto on the CPU (bf16 where native, else fp32)')
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(objective: torch.nn.Module, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
               optimizer: torch.optim.Optimizer, precision: str = 'fp32', clip_grad: float | None = None,
               scaler: torch.amp.GradScaler | None = None, **forward_kwargs) -> StepResult:
    """Forward and backward over the micro-batches, clip, and step the optimizer unless the loss or the gradient
    is not finite (then the gradients are dropped and the parameters stay as they were).

    ``objective(images, tokens, **forward_kwargs)`` (wrapped in DDP or not) returns the losses dict with ``loss``,
    or ``(losses, buffer_updates)``: the updates (the prototype momentum of PGSeg) are applied after each
    micro-batch's backward pass by ``objective.apply_updates``."""
    params = [p for p in objective.parameters() if p.requires_grad]
    device = params[0].device
    inner = objective.module if isinstance(objective, DistributedDataParallel) else objective
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    totals: dict[str, torch.Tensor] = {}
    for i, (images, tokens) in enumerate(micro_batches):
        last = i == n - 1
        ddp = isinstance(objective, DistributedDataParallel)
        sync = objective.no_sync() if ddp and not last else contextlib.nullcontext()
        with sync:
            with autocast_for(device, precision):
                out = objective(images, tokens, **forward_kwargs)
            losses, updates = out if isinstance(out, tuple) else (out, None)
            loss = losses['loss'] / n
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if updates:  # buffers move after the backward pass, never inside a loss
            inner.apply_updates(updates)
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
