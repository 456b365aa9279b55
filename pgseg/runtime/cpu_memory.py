"""CPU memory for training and evaluation: freed blocks kept for reuse (glibc), large tensors on huge pages.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it to the
system on free. A training step allocates and frees hundreds of tensors of 50-200 MB (attention matrices, the NPR
heads' 4096-wide activations), so each one is faulted in again, 4 KiB at a time, every step. Two settings:

- *retain*: ``mallopt`` turns off mmap for large blocks and heap trimming, so freed blocks stay on the heap, already
  faulted in, and the next step reuses them;
- *huge pages*: PyTorch's ``THP_MEM_ALLOC_ENABLE`` aligns allocations of 2 MiB and more to 2 MiB and advises
  transparent huge pages for them (when the kernel's THP mode is ``madvise`` or ``always``): 512 times fewer faults
  for what the heap still has to grow, and fewer TLB misses.

The process keeps its peak heap: the first steps grow it (slowly where the host backs memory lazily), later steps
fault nothing in. Timings: docs/performance.md#cpu-memory-settings, docs/performance.md#first-touch-memory.
``init_distributed`` applies both to every CPU process of pgseg's commands; ``PGSEG_CPU_MALLOC=system`` keeps the
defaults. The huge-page setting must come before the process's first large tensor (PyTorch reads it once); without
glibc the retain setting does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

__all__ = ['configure_cpu_memory', 'ENV_VAR']

ENV_VAR = 'PGSEG_CPU_MALLOC'
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_state: dict[str, bool] | None = None
log = logging.getLogger(__name__)


def configure_cpu_memory() -> dict[str, bool]:
    """Apply both settings once per process; returns which are in effect: ``{'retain': ..., 'huge_pages': ...}``
    (both False with ``PGSEG_CPU_MALLOC=system``)."""
    global _state
    if _state is not None:
        return _state
    choice = os.environ.get(ENV_VAR, 'retain')
    if choice not in ('retain', 'system'):
        raise ValueError(f"{ENV_VAR} must be 'retain' or 'system', got {choice!r}")
    if choice == 'system':
        _state = {'retain': False, 'huge_pages': False}
        return _state
    _state = {'retain': _retain_freed_blocks(), 'huge_pages': _huge_pages_for_large_tensors()}
    return _state


def _retain_freed_blocks() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)):
        log.warning('mallopt refused the settings; CPU steps fault their large tensors in again every step')
        return False
    return True


def _huge_pages_for_large_tensors() -> bool:
    """Set PyTorch's THP_MEM_ALLOC_ENABLE (unless the user set it) and check that it took: a large tensor, once
    written, adds to the process's AnonHugePages."""
    import torch
    os.environ.setdefault('THP_MEM_ALLOC_ENABLE', '1')
    if os.environ['THP_MEM_ALLOC_ENABLE'] != '1':
        return False
    before = _anon_huge_pages_kb()
    probe = torch.ones(8 << 20, dtype=torch.uint8)
    in_effect = before is not None and (_anon_huge_pages_kb() or 0) > before
    del probe
    if not in_effect:
        log.info('huge pages for large tensors not in effect (kernel THP mode never, no huge page free, or a large '
                 'CPU tensor was allocated before pgseg.runtime.cpu_memory ran: set THP_MEM_ALLOC_ENABLE=1 in the '
                 'environment instead)')
    return in_effect


def _anon_huge_pages_kb() -> int | None:
    try:
        with open('/proc/self/smaps_rollup') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('AnonHugePages:'))
    except (OSError, StopIteration, ValueError):
        return None
