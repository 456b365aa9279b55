"""What every loss shares: float32 computation inside autocast, and the clamped temperature of the official code.

Losses run in float32 even inside a bf16/fp16 autocast region: logits scaled by up to 100 need more than bf16's 8
mantissa bits, and the HRS selection compares cosines that differ in the third decimal.
"""
from __future__ import annotations

import functools

import torch

__all__ = ['MAX_LOGIT_SCALE', 'float32', 'clamp_logit_scale']

MAX_LOGIT_SCALE = 100.0


def float32(fn):
    """Run ``fn`` with autocast disabled and its floating-point tensor arguments cast to float32."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in args if torch.is_tensor(a)]
        device_type = tensors[0].device.type if tensors else 'cpu'
        cast = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*cast, **kwargs)
    return wrapper


def clamp_logit_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """exp(log_scale) clamped at 100, as every official temperature."""
    return log_scale.exp().clamp(max=MAX_LOGIT_SCALE)
