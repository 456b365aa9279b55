"""Streaming image-caption batches from webdataset shards (img2dataset layout), deterministic and resumable.

Per epoch, on every rank and DataLoader worker::

    shard list (brace patterns of every source)
      -> order for this epoch: shuffled by Random(seed, epoch) (non-resampled), or drawn with replacement with
         probability proportional to source weight / source shard count (resampled)
      -> planned sample by sample over the streams (sizes known), or split by node, then by worker (sizes unknown)
      -> webdataset's tarfile_samples (corrupt tar members are skipped and counted), or the rows of a file list's
         piece (data/file_list.py: a piece of a CSV / TSV / JSONL list stands for a shard of known size)
      -> shuffle buffer driven by Random(seed, epoch, rank, worker), flushed at the end of each pass
      -> skip the samples this worker already delivered (exact resume)
      -> decode + augment with an RNG seeded by (seed, epoch, rank, worker, sample index); bad samples are skipped,
         counted by reason and logged with shard and key
      -> batches of ``batch_size`` collated inside the worker

Each worker yields exactly its share of ``steps_per_epoch`` batches (worker w of W yields the batches w, w + W, ...
of the rank, the order in which an in-order DataLoader returns them), so every rank runs the same number of steps.
Without resampling and with every shard's size known (sizes.json, or img2dataset's ``<shard>_stats.json``), the
epoch is planned sample by sample (:meth:`TrainStream.epoch_plan`): every sample is read once, however uneven the
shards, the N mod (global batch) left over standing in for damaged samples. Without sizes, shards are split whole
and a worker that runs out continues into a reshuffled pass of its shards (docs/data.md#how-the-stream-reads-them).
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import braceexpand
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from .file_list import file_list_pieces, file_list_samples, is_file_list_url
from .text import CaptionTokenizer
from .transforms import TrainTransform

log = logging.getLogger(__name__)

__all__ = ['ShardSource', 'expand_source', 'read_stats_size', 'stats_path', 'TrainStream', 'StreamPosition',
           'build_train_loader', 'SKIP_REASONS', 'file_list_source', 'source_from_config', 'shard_samples']

SKIP_REASONS = ('bad_image', 'bad_caption', 'missing_image', 'missing_caption', 'bad_tar', 'bad_row')
IMAGE_KEYS = ('jpg', 'jpeg', 'png', 'webp')
CAPTION_KEYS = ('txt', 'text')


@dataclass
class ShardSource:
    name: str
    urls: list[str]
    length: int  # samples in these shards
    weight: float = 1.0
    sizes: list[int] | None = None  # samples per shard, in the order of urls (from the shards' metadata), when known


def expand_source(name: str, pattern: str, length: int | None = None, weight: float = 1.0,
                  require_all: bool = True) -> ShardSource:
    """Expand a brace pattern (``a/{000..009}.tar``; ``::`` separates several patterns), check the files exist, and
    take every shard's sample count from the shards' metadata: ``sizes.json`` beside them (``pgseg-shards sizes``
    writes it), else img2dataset's ``<shard>_stats.json`` ("successes").

    The metadata is the truth of the shards, so it wins: a configured ``length`` that disagrees with its sum is a
    warning naming both numbers, and the epoch is the metadata's. ``length`` counts only where the shards carry no
    metadata (remote shards, shards written by another tool): then every shard's size is unknown and the stream
    splits the shards whole (docs/data.md#how-the-stream-reads-them)."""
    urls = [u for part in pattern.split('::') for u in braceexpand.braceexpand(part)]
    local = [u for u in urls if _is_local(u)]
    missing = [u for u in local if not os.path.exists(u)]
    if missing and (require_all or len(missing) == len(urls)):
        raise FileNotFoundError(f'data source {name!r}: {len(missing)} of {len(urls)} shards of {pattern!r} do not '
                                f'exist (first: {missing[0]}). Check data.sources[].pattern and PGSEG_DATA '
                                '(pgseg-shards sizes FOLDER prints the pattern of the shards a folder holds).')
    gone = set(missing)
    urls = [u for u in urls if u not in gone]
    sizes, where, lacking = _sizes(name, urls)
    if sizes is None:
        if length is None:
            raise FileNotFoundError(f'data source {name!r}: no data.sources[].length in the config and no size for '
                                    f'{lacking}: write sizes.json beside the shards (pgseg-shards sizes FOLDER) or '
                                    'keep img2dataset\'s <shard>_stats.json files beside them, or set '
                                    'data.sources[].length')
        if any(_is_local(u) for u in urls):
            log.warning('data source %r: no size for %s; the configured length %d is used and the shards\' sizes '
                        'are unknown (an img2dataset download still running?)', name, lacking, length)
        return ShardSource(name=name, urls=urls, length=int(length), weight=weight, sizes=None)
    total = sum(sizes)
    if length is not None and int(length) != total:
        log.warning('data source %r: data.sources[].length is %d in the config, but %s count %d samples in its %d '
                    'shards: the epoch uses %d, the shards\' own count (set data.sources[].length to null to silence '
                    'this; train.steps_per_epoch sets an epoch of another length)', name, int(length), where, total,
                    len(urls), total)
    return ShardSource(name=name, urls=urls, length=total, weight=weight, sizes=sizes)


def file_list_source(name: str, path: str, image_column: str = 'filepath', caption_column: str = 'title',
                     weight: float = 1.0, rows_per_piece: int = 1000, length: int | None = None) -> ShardSource:
    """A file list (CSV / TSV / JSONL of image paths and captions) as a source of pieces of ``rows_per_piece`` rows,
    each a shard of known size (data/file_list.py). The list is read and its columns checked now."""
    urls, sizes = file_list_pieces(path, image_column, caption_column, rows_per_piece)
    if length is not None and int(length) != sum(sizes):
        log.warning('data source %r: data.sources[].length is %d in the config, but %s lists %d rows: the epoch uses '
                    'the rows', name, int(length), path, sum(sizes))
    return ShardSource(name=name, urls=urls, length=sum(sizes), weight=weight, sizes=sizes)


def source_from_config(source) -> ShardSource:
    """A :class:`pgseg.config.DataSourceConfig` -> its :class:`ShardSource` (shards or a file list)."""
    if source.type == 'files':
        return file_list_source(source.name, source.pattern, source.image_column, source.caption_column,
                                source.weight, length=source.length)
    return expand_source(source.name, source.pattern, source.length, source.weight)


def shard_samples(urls, handler) -> Iterator[dict]:
    """The samples of shards in order: tar files through webdataset (``handler`` sees a damaged member), file-list
    pieces row by row."""
    for url in urls:
        if is_file_list_url(url):
            yield from file_list_samples(url)
        else:
            yield from tarfile_samples([{'url': url}], handler=handler)


def _is_local(url: str) -> bool:
    return '://' not in url and not url.startswith('pipe:')


def stats_path(shard: str) -> str:
    """img2dataset's statistics file of a shard: ``<dir>/<stem>_stats.json`` for ``<dir>/<stem>.tar``."""
    stem = shard[:-len('.tar')] if shard.endswith('.tar') else os.path.splitext(shard)[0]
    return stem + '_stats.json'


def read_stats_size(shard: str) -> int | None:
    """The samples img2dataset wrote into ``shard``: "successes" of its ``<stem>_stats.json`` (None if there is no
    such file). A file without the key, or not JSON, is an error naming it."""
    path = stats_path(shard)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            stats = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f'{path}: cannot read img2dataset\'s shard statistics: {exc}') from None
    if not isinstance(stats, dict) or not isinstance(stats.get('successes'), int) or stats['successes'] < 0:
        raise ValueError(f'{path}: no sample count "successes" (a count >= 0) in img2dataset\'s shard statistics')
    return stats['successes']


def _sizes(name: str, urls: list[str]) -> tuple[list[int] | None, str, str]:
    """Samples per shard from the shards' metadata, a description of where they come from, and (when some shard has
    none) the first thing that is missing. A folder's ``sizes.json`` lists its shards; without one, each shard's
    ``<stem>_stats.json`` counts it."""
    sizes, listings, sources = [], {}, set()
    for u in urls:
        if not _is_local(u):
            return None, '', f'the remote shard {u}'
        folder = os.path.dirname(u)
        if folder not in listings:
            path = os.path.join(folder, 'sizes.json')
            listings[folder] = None
            if os.path.isfile(path):
                try:
                    with open(path) as f:
                        listings[folder] = json.load(f)
                except (OSError, ValueError) as exc:
                    raise ValueError(f'data source {name!r}: cannot read {path}: {exc}') from None
        base = os.path.basename(u)
        if listings[folder] is not None:
            if base not in listings[folder]:
                raise KeyError(f'data source {name!r}: {base} is not listed in {os.path.join(folder, "sizes.json")} '
                               '(rewrite it: pgseg-shards sizes FOLDER)')
            sizes.append(int(listings[folder][base]))
            sources.add(os.path.join(folder, 'sizes.json'))
            continue
        try:
            n = read_stats_size(u)
        except ValueError as exc:
            raise ValueError(f'data source {name!r}: {exc}') from None
        if n is None:
            return None, '', f'{u} (no {os.path.join(folder, "sizes.json")}, no {stats_path(u)})'
        sizes.append(n)
        sources.add(f"img2dataset's *_stats.json in {folder}")
    return sizes, ', '.join(sorted(sources)), ''


@dataclass
class StreamPosition:
    """Where each worker of this rank stands in the current epoch: samples delivered (after the shuffle buffer,
    counting the ones skipped as bad). Saved in checkpoints for exact resume."""
    epoch: int = 0
    samples: dict[int, int] = field(default_factory=dict)  # worker id -> samples taken from its stream
    batches: dict[int, int] = field(default_factory=dict)  # worker id -> batches it yielded

    def update(self, info: dict) -> None:
        self.samples[info['worker']] = info['delivered']
        self.batches[info['worker']] = info['batches']

    def next_epoch(self) -> None:
        self.epoch += 1
        self.samples.clear()
        self.batches.clear()

    def state_dict(self) -> dict:
        return {'epoch': self.epoch, 'samples': {str(k): v for k, v in self.samples.items()},
                'batches': {str(k): v for k, v in self.batches.items()}}

    @classmethod
    def from_state(cls, state: dict) -> StreamPosition:
        return cls(epoch=int(state['epoch']), samples={int(k): int(v) for k, v in state['samples'].items()},
                   batches={int(k): int(v) for k, v in state['batches'].items()})


def _seed(*parts: int) -> int:
    return hash(tuple(parts)) & 0x7FFFFFFF


class TrainStream(IterableDataset):
    """Yields collated batches ``(images [B, 3, S, S], tokens [B, L] or [B, 1+K, L], info)`` where ``info`` has the
    worker id, its delivered-sample count and its cumulative skip counters."""

    def __init__(self, sources: Sequence[ShardSource], transform: TrainTransform, tokenizer: CaptionTokenizer,
                 batch_size: int, steps_per_epoch: int, seed: int = 0, resampled: bool = False,
                 shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1, num_workers: int = 0):
        super().__init__()
        if batch_size < 1 or steps_per_epoch < 1:
            raise ValueError(f'batch_size and steps_per_epoch must be >= 1, got {batch_size}, {steps_per_epoch}')
        self.sources, self.transform, self.tokenizer = list(sources), transform, tokenizer
        self.batch_size, self.steps_per_epoch, self.seed = batch_size, steps_per_epoch, seed
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.rank, self.world_size, self.num_workers = rank, world_size, max(num_workers, 1)
        self.urls = [u for s in self.sources for u in s.urls]
        if not self.urls:
            raise ValueError('no shards: every data source is empty')
        streams = world_size * self.num_workers
        # every shard's size known and no resampling: each epoch is planned sample by sample (epoch_plan)
        self.sizes = ([n for s in self.sources for n in s.sizes] if not resampled and
                      all(s.sizes is not None for s in self.sources) else None)
        if self.sizes is None and not resampled:
            log.warning('the shards\' sizes are unknown (data.sources[].length set, neither sizes.json nor '
                        'img2dataset\'s <shard>_stats.json beside them): shards are split '
                        'over ranks and workers whole, and uneven shards repeat or leave out samples in an epoch')
        if self.sizes is None and not resampled and len(self.urls) < streams:
            raise ValueError(f'{len(self.urls)} shards cannot feed {world_size} ranks x {self.num_workers} workers '
                             f'= {streams} streams without resampling: use data.num_workers <= '
                             f'{max(1, len(self.urls) // world_size)}, data.resampled=true, or more shards')
        self.position = StreamPosition()

    # ---------------------------------------------------------------- shard order
    def _shard_pass(self, epoch: int, repeat: int, worker: int) -> list[str]:
        """This worker's shards for one pass over the data."""
        if self.resampled:
            rng = random.Random(_seed(self.seed, epoch, repeat, self.rank, worker, 1))
            weights = [s.weight / len(s.urls) for s in self.sources for _ in s.urls]
            n = max(1, len(self.urls) // (self.world_size * self.num_workers))
            return rng.choices(self.urls, weights=weights, k=n)
        order = list(self.urls)
        random.Random(_seed(self.seed, epoch, repeat)).shuffle(order)
        mine = order[self.rank::self.world_size]
        return mine[worker::self.num_workers]

    def epoch_plan(self, epoch: int, worker: int) -> tuple[list[tuple[int, range]], list[tuple[int, range]]]:
        """The samples this rank's ``worker`` reads in ``epoch``, as (shard index, sample indices) pieces: its own
        share, then its spares. Every epoch lays the shards end to end in a shuffled order, N samples in all; the
        streams (rank r, worker w: stream r * W + w) take consecutive stretches of exactly the samples their batches
        need (batches x batch size), so every sample is read once. The rest, fewer than a step's worth (N mod
        global batch), are the spares: stream k may take every (W x world)-th of them from the k-th on, in place of
        the damaged samples it skipped; spares not needed wait for a later epoch's order. (An explicit
        ``train.steps_per_epoch`` longer than the data lays the order out again after itself.)"""
        order = list(range(len(self.urls)))
        random.Random(_seed(self.seed, epoch, 0)).shuffle(order)
        streams = self.world_size * self.num_workers
        need = [self.worker_batches(w) * self.batch_size for w in range(self.num_workers)] * self.world_size
        me = self.rank * self.num_workers + worker
        start, needed, total = sum(need[:me]), sum(need), sum(self.sizes)
        laps = max(1, -(-needed // total))  # the order laid out this many times covers every stream's stretch
        own, spares, offset = [], [], 0
        for shard in order * laps:
            n = self.sizes[shard]
            lo, hi = max(start, offset), min(start + need[me], offset + n)  # this stream's stretch in the shard
            if lo < hi:
                own.append((shard, range(lo - offset, hi - offset)))
            first = max(needed, offset)  # the spares in the shard: every streams-th from position ``me``
            first += (me - (first - needed)) % streams
            if first < offset + n:
                spares.append((shard, range(first - offset, n, streams)))
            offset += n
        return own, spares

    def _planned_samples(self, epoch: int, worker: int, counts: Counter, rng: random.Random) -> Iterator[dict]:
        """The epoch plan's samples: this stream's own (through the shuffle buffer, flushed at their end), then its
        spares, then, should damaged samples outnumber the spares, its own again (logged)."""
        own, spares = self.epoch_plan(epoch, worker)
        yield from self._shuffled(self._read_pieces(own, counts), rng)
        yield from self._read_pieces(spares, counts)
        log.warning('worker %d of rank %d: more damaged samples than spares in epoch %d; reading its samples again',
                    worker, self.rank, epoch)
        while True:
            found = 0
            for sample in self._shuffled(self._read_pieces(own, counts), rng):
                found += 1
                yield sample
            if not found:  # a stretch of samples the shards do not hold: stop loudly instead of spinning
                shards = sorted({self.urls[shard] for shard, _ in own})
                raise RuntimeError(f'worker {worker} of rank {self.rank}: none of its {sum(len(r) for _, r in own)} '
                                   f'samples can be read from {", ".join(shards)}: the shards hold fewer samples than '
                                   'their metadata lists (sizes.json or <shard>_stats.json), or cannot be read; '
                                   'rewrite sizes.json by counting (pgseg-shards sizes --count FOLDER)')

    def _read_pieces(self, pieces: list[tuple[int, range]], counts: Counter) -> Iterator[dict]:
        """The samples ``pieces`` name, shard by shard, read in order (the ones in between are passed over; a damaged
        tar member is counted by every stream that passes over it)."""
        def on_error(exc: Exception) -> bool:
            counts['bad_tar'] += 1
            log.warning('skipping unreadable tar data: %s', exc)
            return True

        for shard, wanted in pieces:
            if not len(wanted):
                continue
            if is_file_list_url(self.urls[shard]):  # rows are read directly: only the wanted ones
                yield from file_list_samples(self.urls[shard], wanted)
                continue
            samples = shard_samples([self.urls[shard]], on_error)
            for i, sample in enumerate(samples):
                if i >= wanted.stop:
                    break
                if i >= wanted.start and (i - wanted.start) % wanted.step == 0:
                    yield sample

    def _samples(self, epoch: int, worker: int, counts: Counter, rng: random.Random) -> Iterator[dict]:
        """This worker's samples for the epoch: planned sample by sample when the shards' sizes are known
        (:meth:`epoch_plan`), else endless passes over its shards (the shuffle buffer flushed at the end of each
        pass, so the first pass is delivered completely before any sample repeats)."""
        if self.sizes is not None:
            yield from self._planned_samples(epoch, worker, counts, rng)
            return

        def on_error(exc: Exception) -> bool:
            counts['bad_tar'] += 1
            log.warning('skipping unreadable tar data: %s', exc)
            return True

        repeat = 0
        while True:
            urls = self._shard_pass(epoch, repeat, worker)
            yield from self._shuffled(shard_samples(urls, on_error), rng)
            repeat += 1

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buf: list[dict] = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    # ---------------------------------------------------------------- decoding
    def _decode(self, sample: dict, rng: random.Random, counts: Counter):
        where = f'{sample.get("__url__", "?")}:{sample.get("__key__", "?")}'
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        caption_key = next((k for k in CAPTION_KEYS if k in sample), None)
        reason = sample.get('__skip__')  # a file list's row that cannot be a sample (bad_row)
        if reason is None and image_key is None:
            reason = 'missing_image'
        elif reason is None and caption_key is None:
            reason = 'missing_caption'
        if reason is None:
            try:
                caption = sample[caption_key].decode('utf-8').strip()
                if not caption:
                    raise ValueError('empty caption')
                tokens = self.tokenizer(caption, rng)
            except (UnicodeDecodeError, ValueError) as exc:
                reason, detail = 'bad_caption', exc
            else:
                try:
                    image = self.transform(sample[image_key], rng)
                    return image, tokens
                except Exception as exc:  # any decode failure of any image library: skip and count
                    reason, detail = 'bad_image', exc
        else:
            detail = {'missing_image': 'no image', 'missing_caption': 'no caption'}.get(reason, 'not a JSON object')
        counts[reason] += 1
        total = sum(counts.values())
        if total <= 20 or total % 1000 == 0:
            log.warning('skipping sample %s (%s: %s); %d skipped so far on this worker', where, reason, detail, total)
        return None

    # ---------------------------------------------------------------- iteration
    def worker_batches(self, worker: int) -> int:
        """Batches worker ``worker`` yields per epoch (in-order DataLoader: batches w, w + W, ...)."""
        return len(range(worker, self.steps_per_epoch, self.num_workers))

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f'TrainStream built for {self.num_workers} workers, DataLoader has {info.num_workers}')
        epoch = self.position.epoch
        skip = self.position.samples.get(worker, 0)
        done = self.position.batches.get(worker, 0)
        counts: Counter = Counter()
        shuffle_rng = random.Random(_seed(self.seed, epoch, self.rank, worker, 2))
        stream = self._samples(epoch, worker, counts, shuffle_rng)
        delivered = 0
        for _ in range(skip):  # exact resume: the same samples, not decoded again
            next(stream)
            delivered += 1
        counts.clear()  # what the passage over them counted (damaged tar members) was counted before the checkpoint
        for batch_index in range(done, self.worker_batches(worker)):
            images, tokens, keys = [], [], []
            while len(images) < self.batch_size:
                sample = next(stream)
                rng = random.Random(_seed(self.seed, epoch, self.rank, worker, 3, delivered))
                delivered += 1
                out = self._decode(sample, rng, counts)
                if out is not None:
                    images.append(out[0])
                    tokens.append(out[1])
                    keys.append(sample['__key__'])
            yield (torch.stack(images), torch.stack(tokens),
                   {'worker': worker, 'delivered': delivered, 'batches': batch_index + 1, 'skipped': dict(counts),
                    'keys': keys})


def build_train_loader(stream: TrainStream, num_workers: int) -> DataLoader:
    """An in-order DataLoader over the stream (batches are collated in the workers). It gets its own generator:
    starting an epoch must not draw from the global RNG, which the model's noise uses (exact resume)."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(stream.seed))
