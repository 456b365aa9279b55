"""Batched Hungarian matching of group tokens to prototypes, kept off the critical path of a training step.

The released code solves B assignment problems per stage with scipy, in a Python loop, after a blocking copy to
the host. Here the similarity matrices are copied to pinned host memory without blocking, and a worker thread
waits for that copy and runs the exact solver (scipy's ``linear_sum_assignment``, the same solver and so the same
tie-breaking as the release), while the main thread keeps queuing device work (the rest of the encoders and the
contrastive loss). ``MatchHandle.indices()`` joins the worker when the loss needs the result.
"""
from __future__ import annotations

import atexit
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ['MatchHandle', 'match_async', 'match_all_async', 'join_all', 'hungarian_indices', 'MatchStats',
           'MATCH_STATS']

_POOL: ThreadPoolExecutor | None = None


@dataclass
class MatchStats:
    """What the matchings cost this process since the last :meth:`reset`: the solver's seconds (in the worker
    thread), the seconds the training step waited for results (the step's only host wait; hidden behind the text
    tower on the CPU, the first thing to watch on a fast GPU: docs/performance.md), and the problems solved."""
    solve_s: float = 0.0
    wait_s: float = 0.0
    problems: int = 0

    def reset(self) -> None:
        self.solve_s, self.wait_s, self.problems = 0.0, 0.0, 0


MATCH_STATS = MatchStats()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix='pgseg-match')
        atexit.register(_POOL.shutdown, wait=False)
    return _POOL


def hungarian_indices(sim: np.ndarray, maximize: bool) -> np.ndarray:
    """sim: [B, G, G] -> column index matched to each row, [B, G] int64 (exact, per problem)."""
    start = time.perf_counter()
    # a non-finite similarity (a diverging step) must not raise on one rank only: the loss turns non-finite instead,
    # and the trainer skips the step on every rank
    sim = np.nan_to_num(sim, nan=0.0, posinf=1.0, neginf=-1.0)
    out = np.empty(sim.shape[:2], dtype=np.int64)
    for b in range(sim.shape[0]):
        rows, cols = linear_sum_assignment(sim[b], maximize=maximize)
        out[b, rows] = cols
    MATCH_STATS.solve_s += time.perf_counter() - start
    MATCH_STATS.problems += sim.shape[0]
    return out


class MatchHandle:
    """A matching in flight; ``indices()`` returns the [B, G] column indices on the similarity's device."""

    def __init__(self, future: Future, device: torch.device):
        self._future, self._device = future, device

    @torch.compiler.disable  # a host wait: under torch.compile, one clean graph break instead of tracing into it
    def indices(self) -> torch.Tensor:
        start = time.perf_counter()
        idx = torch.from_numpy(self._future.result())
        MATCH_STATS.wait_s += time.perf_counter() - start
        if self._device.type == 'cuda':
            return idx.pin_memory().to(self._device, non_blocking=True)
        return idx.to(self._device)


@torch.compiler.disable  # host work and a thread pool: one graph break under torch.compile
@torch.no_grad()
def match_async(sim: torch.Tensor, maximize: bool) -> MatchHandle:
    """Start solving the assignment problems ``sim`` [B, G, G] (rows: queries, columns: targets)."""
    sim = sim.detach().float()
    if sim.device.type == 'cuda':
        host = torch.empty(sim.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(sim, non_blocking=True)
        ready = torch.cuda.Event(blocking=True)  # the worker sleeps instead of spinning
        ready.record()
        device = sim.device

        def solve() -> np.ndarray:
            torch.cuda.set_device(device)  # no stray context on GPU 0 from this thread
            ready.synchronize()  # waits in the worker, not in the main thread
            return hungarian_indices(host.numpy(), maximize)
    else:
        host = sim.cpu().numpy().copy()  # the caller may reuse the tensor's memory

        def solve() -> np.ndarray:
            return hungarian_indices(host, maximize)
    return MatchHandle(_pool().submit(solve), sim.device)


@torch.compiler.disable  # one graph break for all of them: a break inside a loop makes dynamo skip the whole frame
def match_all_async(sims: Sequence[torch.Tensor], maximize: bool) -> list[MatchHandle]:
    """:func:`match_async` of each similarity [B, G, G] in ``sims``."""
    return [match_async(sim, maximize) for sim in sims]


@torch.compiler.disable
def join_all(handles: Sequence[MatchHandle]) -> list[torch.Tensor]:
    """The indices of each matching in ``handles``, waiting for them in order."""
    return [h.indices() for h in handles]
