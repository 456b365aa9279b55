"""Keep freed memory in the process for reuse (glibc malloc), for CPU training and evaluation.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it to the
system on free. A training step allocates and frees hundreds of tensors of 50-200 MB (attention matrices, the NPR
heads' 4096-wide activations), so each one is faulted in page by page again, every step: on the development machine
a bf16 copy of a 52 MB tensor took 18.6 ms instead of 4.2 ms, and the paper model's bf16 step 11.5 s instead of 9.9 s
(README, Performance). With mmap off and no trimming, freed blocks stay on the heap and the next step reuses them;
the cost is that the process keeps its peak heap (peak RSS +8% for that step).

``init_distributed`` applies it to every CPU process of pgseg's commands; ``PGSEG_CPU_MALLOC=system`` keeps glibc's
defaults. Elsewhere (no glibc) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

__all__ = ['retain_freed_memory', 'ENV_VAR']

ENV_VAR = 'PGSEG_CPU_MALLOC'
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_applied = False
log = logging.getLogger(__name__)


def retain_freed_memory() -> bool:
    """Turn off glibc's mmap for large blocks and its heap trimming, once per process. Returns whether the setting is
    in effect (False without glibc, or with ``PGSEG_CPU_MALLOC=system``)."""
    global _applied
    if _applied:
        return True
    choice = os.environ.get(ENV_VAR, 'retain')
    if choice not in ('retain', 'system'):
        raise ValueError(f"{ENV_VAR} must be 'retain' or 'system', got {choice!r}")
    if choice == 'system':
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)):
        log.warning('mallopt refused the settings; CPU steps re-fault their large tensors every step')
        return False
    _applied = True
    return True
