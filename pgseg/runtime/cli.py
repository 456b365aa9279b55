"""The frame every command runs in: logging, the CPU memory settings, expected errors as one line and exit code 2."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from .cpu_memory import configure_cpu_memory
from .distributed import destroy_process_group

__all__ = ['run_command', 'setup_logging', 'setup_cpu_process']


def setup_logging() -> None:
    """INFO on rank 0 (or a single process), WARNING on the other ranks of a torchrun launch."""
    logging.basicConfig(level=logging.INFO if int(os.environ.get('RANK', 0)) == 0 else logging.WARNING,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')


def setup_cpu_process() -> None:
    """Process-wide CPU settings of the training and evaluation commands, before the first large tensor: freed
    blocks kept for reuse and large tensors on huge pages (:mod:`pgseg.runtime.cpu_memory`;
    ``PGSEG_CPU_MALLOC=system`` keeps the system's defaults). Nothing on a GPU process."""
    import torch
    if not torch.cuda.is_available():
        configure_cpu_memory()


def run_command(prog: str, body: Callable[[], None], errors: tuple[type[BaseException], ...]) -> int:
    """A command-line entry point's frame: 0 when ``body`` returns; one of the expected ``errors`` is printed as
    ``<prog>: error: <message>`` and gives 2; the process group (torchrun), if any, is torn down either way."""
    try:
        body()
    except errors as exc:
        print(f'{prog}: error: {exc}', file=sys.stderr)
        return 2
    finally:
        destroy_process_group()
    return 0
