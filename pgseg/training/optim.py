"""AdamW with parameter groups and timm's cosine schedule with warmup (docs/fidelity.md#training-loop)."""
from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler

from ..config import OptimConfig

__all__ = ['param_groups', 'build_optimizer', 'scaled_lrs', 'build_scheduler']


def param_groups(model: torch.nn.Module, weight_decay: float, decay_set: str = 'pgseg') -> list[dict]:
    """Two groups: decayed and not.

    ``pgseg``: no decay on norms, biases, 0-dim parameters (logit scales), position embeddings and group tokens
    (``model.no_weight_decay()``). ``official``: the release's rule, no decay only where ``ndim == 1`` or the name
    ends with ``.bias`` (so logit scales, position embeddings and group tokens are decayed).
    """
    skip = set(model.no_weight_decay()) if decay_set == 'pgseg' and hasattr(model, 'no_weight_decay') else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if decay_set == 'official':
            plain = p.ndim == 1 or name.endswith('.bias')
        else:
            plain = p.ndim <= 1 or name.endswith('.bias') or name in skip
        (no_decay if plain else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_set)
    # the fused kernel (CPU and CUDA): one pass over all parameters, several times faster than the per-tensor loop on
    # the CPU (docs/performance.md#earlier-changes)
    fused = all(p.dtype.is_floating_point and p.device.type in ('cpu', 'cuda') for g in groups for p in g['params'])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def scaled_lrs(cfg: OptimConfig, global_batch: int) -> tuple[float, float, float]:
    """(lr, warmup_lr, min_lr), multiplied by global_batch / 4096 when ``scale_lr_with_batch`` (GroupViT)."""
    factor = global_batch / 4096 if cfg.scale_lr_with_batch else 1.0
    return cfg.lr * factor, cfg.warmup_lr * factor, cfg.min_lr * factor


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, warmup_lr: float,
                    min_lr: float, warmup_prefix: bool = True) -> CosineLRScheduler:
    """Stepped per iteration with ``step_update(step)``. ``warmup_prefix=False`` reproduces the release: the cosine
    is evaluated at the absolute step, so the LR drops when warmup ends
    (docs/fidelity.md#learning-rate-schedule)."""
    return CosineLRScheduler(optimizer, t_initial=_cosine_steps(total_steps, warmup_steps, warmup_prefix),
                             lr_min=min_lr, warmup_t=warmup_steps,
                             warmup_lr_init=warmup_lr, warmup_prefix=warmup_prefix, t_in_epochs=False,
                             cycle_limit=1)


def shorten_schedule(scheduler: CosineLRScheduler, total_steps: int, warmup_steps: int,
                     warmup_prefix: bool = True) -> None:
    """Make the cosine of ``build_scheduler`` end at ``total_steps`` instead (same warmup, same end LR)."""
    scheduler.t_initial = _cosine_steps(total_steps, warmup_steps, warmup_prefix)


def _cosine_steps(total_steps: int, warmup_steps: int, warmup_prefix: bool) -> int:
    """The cosine's length: after the warmup (``warmup_prefix``) or counted from step 0 (the release)."""
    return max(1, total_steps - warmup_steps) if warmup_prefix else max(1, total_steps)
