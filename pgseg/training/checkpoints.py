"""A run directory's checkpoints, for both trainers: ``ckpt-<step>`` written atomically by rank 0 with every rank's
RNG and data position, the newest ``keep_last`` kept (``ckpt-best`` apart), and the rule that picks where to resume.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
from typing import Callable, TypeVar

import torch

from ..checkpoint import STATE_NAME, CheckpointError, list_checkpoints, write_dir_atomically
from ..runtime.distributed import (
    all_gather_object,
    all_ranks_true,
    barrier,
    broadcast_flag,
    get_world_size,
    is_main_process,
)
from .state import RunState, capture_rng, restore_rng

__all__ = ['CheckpointWriter', 'claim_run_directory', 'RunDirectoryBusy', 'resume_candidates', 'load_resume_point',
           'restore_rank', 'prune_checkpoints']

log = logging.getLogger(__name__)
T = TypeVar('T')


def resume_candidates(resume: str | None, run_dir: str, marker: str = STATE_NAME) -> list[str]:
    """The checkpoints to try, in order: with ``auto`` every complete ``ckpt-<step>`` of ``run_dir``, newest first
    (a damaged one gives way to the one before it); an explicit directory alone; none for ``none``."""
    if resume in (None, '', 'none', 'null'):
        return []
    if resume == 'auto':
        return list_checkpoints(run_dir, marker)
    if not os.path.isdir(resume):
        raise CheckpointError(f'checkpoint.resume={resume!r}: no such checkpoint directory')
    if not os.path.isfile(os.path.join(resume, marker)):
        raise CheckpointError(f'checkpoint.resume={resume!r}: no {marker} there (not a training checkpoint)')
    return [resume]


def load_resume_point(resume: str | None, run_dir: str, load: Callable[[str], T], marker: str = STATE_NAME
                      ) -> tuple[str, T] | None:
    """``(path, load(path))`` of the checkpoint a run continues from, or None for a fresh start. With ``auto`` a
    checkpoint that cannot be read (a truncated file) is reported and the previous complete one is tried; an explicit
    checkpoint that cannot be read is a :class:`CheckpointError` naming it. Every rank resumes from the same one: rank
    0's list of candidates is every rank's, and a candidate is taken only if every rank could read it."""
    mine = resume_candidates(resume, run_dir, marker)  # on every rank: a bad explicit path stops them all
    candidates = all_gather_object(mine)[0]
    for path in candidates:
        try:
            loaded, error = load(path), None
        except CheckpointError as exc:
            loaded, error = None, exc
        if all_ranks_true(error is None):
            return path, loaded
        if resume != 'auto':
            raise error or CheckpointError(f'{path}: another rank cannot read this checkpoint')
        log.warning('cannot resume from %s (%s); trying the checkpoint before it', path,
                    error or 'another rank cannot read it')
    if candidates:
        raise CheckpointError(f'checkpoint.resume=auto: none of the {len(candidates)} checkpoints in {run_dir} can be '
                              f'read; resume from none (checkpoint.resume=none) to start afresh')
    return None


def restore_rank(saved: dict, rank: int, world: int) -> dict | None:
    """Restore this rank's RNG from a training state saved by as many ranks, and return the rank's saved entry
    (RNG and, for pretraining, the data position); None when the world size differs (nothing restored)."""
    if saved['world_size'] != world:
        return None
    mine = saved['ranks'][rank]
    if 'rng' not in mine:  # an entry that is the RNG state alone (MVP-SEG checkpoints written before 2026-12)
        mine = {'rng': mine}
    restore_rng(mine['rng'])
    return mine


class CheckpointWriter:
    """Gathers every rank's RNG and data position, then rank 0 writes ``ckpt-<step>`` (or ``name``) atomically and
    prunes old ones; every rank waits for the write.

    ``write_files(folder)`` writes the trainer's own files (pretraining: weights and config; MVP-SEG: the prompts);
    the writer adds ``train_state.pt``: the run counters, the trainer's ``train_state`` (optimizer, schedule, ...),
    every rank's entry and the world size."""

    def __init__(self, run_dir: str, keep_last: int, write_files: Callable[[str], None]):
        self.run_dir, self.keep_last, self.write_files = run_dir, keep_last, write_files

    def save(self, state: RunState, train_state: dict, rank_state: dict | None = None, name: str | None = None) -> str:
        ranks = all_gather_object({'rng': capture_rng(), **(rank_state or {})})
        path = os.path.join(self.run_dir, name or f'ckpt-{state.step:08d}')
        if is_main_process():
            def fill(folder: str) -> None:
                self.write_files(folder)
                torch.save({'run': state.state_dict(), **train_state, 'ranks': ranks, 'world_size': get_world_size()},
                           os.path.join(folder, STATE_NAME))
            write_dir_atomically(path, fill)
            prune_checkpoints(self.run_dir, self.keep_last)
        barrier()
        return path


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` ``ckpt-<step>`` directories (``ckpt-best`` and others stay)."""
    run_dir = os.fspath(run_dir)
    steps = sorted((int(n[5:]), n) for n in os.listdir(run_dir) if n.startswith('ckpt-') and n[5:].isdigit())
    for _, old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)


# a temporary that an atomic write leaves when its process dies mid-write: checkpoint.format.write_dir_atomically's
# folders, write_file_atomically's files (.<name>.<8 random characters>.tmp) and the older prompts writer's
_TEMPORARY = re.compile(r'^\.(ckpt-[^/]*\.(tmp|old)-.+|.+\.[a-z0-9_]{8}\.tmp|prompts-.+\.tmp)$')
LOCK_NAME = '.pgseg-run.lock'


class RunDirectoryBusy(CheckpointError):
    """Another live run holds the run directory."""


@contextlib.contextmanager
def claim_run_directory(run_dir: str):
    """Hold ``run_dir`` for one run. Rank 0 takes an exclusive lock on ``<run_dir>/.pgseg-run.lock`` (released by the
    operating system when the process ends, however it ends): a second run started in the same directory, say beside
    the ranks of a launcher that was killed, stops on every rank with an error naming the live one. Holding it, rank
    0 removes the temporaries that atomic writes of dead runs left behind (``.ckpt-<step>.tmp-*``,
    ``.ckpt-<step>.old-*``, ``.prompts-*.tmp``)."""
    fd, busy = None, ''
    if is_main_process():
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = os.pread(fd, 64, 0).decode(errors='replace').strip() or 'unknown'
            os.close(fd)
    if not broadcast_flag(not busy):  # every rank stops, not only the one that found the lock taken
        owner = f'process {busy}' if busy else 'seen by rank 0'
        raise RunDirectoryBusy(f'{run_dir}: another run ({owner}) is training in this directory; stop it, or give '
                               f'this run its own train.output_dir')
    try:
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
            _remove_temporaries(run_dir)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _remove_temporaries(run_dir: str) -> None:
    removed = [name for name in os.listdir(run_dir) if _TEMPORARY.match(name)]
    for name in removed:
        target = os.path.join(run_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            os.remove(target)
    if removed:
        log.info('removed %d temporaries of interrupted writes in %s: %s', len(removed), run_dir,
                 ', '.join(sorted(removed)))
