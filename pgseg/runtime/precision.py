"""Which autocast precision a device runs well, and ``precision: auto``.

bf16 autocast is only fast where the hardware multiplies bf16 natively: GPUs from Ampere on, and CPUs whose oneDNN
has bf16 kernels (AVX-512 BF16 or AMX; AVX-512 cores convert on the fly at a similar speed). Elsewhere a CPU's bf16
matrix products fall back to a reference loop, so a bf16 training step there is tens of times slower than a float32
one (docs/performance.md#avx2-epyc-without-native-bf16).
``auto`` picks bf16 where it is native, otherwise float16 with a grad scaler on a CUDA GPU (the released code's
mixed precision) and float32 on a CPU; an explicit ``bf16`` where it is not native runs as asked, with a warning.
"""
from __future__ import annotations

import logging
import warnings

import torch

from ..config import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ('auto', 'fp32', 'bf16', 'fp16')


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (not through a slow emulation)."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == 'cpu':
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True  # other backends: trust the user's choice


def resolve_precision(precision: str, device: torch.device | str, key: str = 'train.precision',
                      gpu_fallback: str = 'fp16') -> str:
    """The precision to run: ``auto`` resolved for ``device`` (``gpu_fallback`` on a GPU without native bf16: fp16,
    which needs a grad scaler, or fp32); an explicit choice as given, with a warning when it is bf16 on a device
    without native bf16. ``key`` names the setting in the messages."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f'{key}={precision!r}: expected one of {", ".join(PRECISIONS)}')
    native = native_bf16(device)
    if precision == 'auto':
        resolved = 'bf16' if native else (gpu_fallback if device.type == 'cuda' else 'fp32')
        log.info('%s=auto: %s on %s (%s)', key, resolved, device.type,
                 'native bf16' if native else 'no native bf16 matmul')
        return resolved
    if precision == 'fp16' and device.type != 'cuda':  # autocast fp16 and its grad scaler are for GPUs
        raise ConfigError(f'{key}=fp16 needs a GPU (this process runs on the {device.type}); use {key}=auto '
                          f'(bf16 where native, else fp32) or {key}=fp32')
    if precision == 'bf16' and not native:
        fallback = gpu_fallback if device.type == 'cuda' else 'fp32'
        warn_emulated_bf16(device, f'{key}=bf16', f'{key}=auto picks {fallback} here')
    return precision


def warn_emulated_bf16(device: torch.device, what: str, remedy: str) -> None:
    warnings.warn(f'{what} on a {device.type} without native bf16 matrix products: they run on a slow emulation (tens '
                  f'of times slower than fp32 on an AVX2 CPU); {remedy}', RuntimeWarning, stacklevel=3)


def bf16_flag_dtype(enabled: bool, device: torch.device | str, key: str = '--bf16') -> torch.dtype | None:
    """The autocast dtype of an inference command's ``--bf16`` flag (None: float32), warning where bf16 is not
    native on ``device``."""
    if not enabled:
        return None
    if not native_bf16(device):
        warn_emulated_bf16(torch.device(device), key, f'leave out {key} here')
    return torch.bfloat16
