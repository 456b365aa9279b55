"""Streaming image-caption batches from webdataset shards (img2dataset layout), deterministic and resumable.

Per epoch, on every rank and DataLoader worker::

    shard list (brace patterns of every source)
      -> order for this epoch: shuffled by Random(seed, epoch) (non-resampled), or drawn with replacement with
         probability proportional to source weight / source shard count (resampled)
      -> split by node (rank::world), then by worker (worker::num_workers)
      -> webdataset's tarfile_samples (corrupt tar members are skipped and counted)
      -> shuffle buffer driven by Random(seed, epoch, rank, worker), flushed at the end of each pass
      -> skip the samples this worker already delivered (exact resume)
      -> decode + augment with an RNG seeded by (seed, epoch, rank, worker, sample index); bad samples are skipped,
         counted by reason and logged with shard and key
      -> batches of ``batch_size`` collated inside the worker

Each worker yields exactly its share of ``steps_per_epoch`` batches (worker w of W yields the batches w, w + W, ...
of the rank, the order in which an in-order DataLoader returns them), continuing into a reshuffled pass of its shards
if it runs out, so every rank runs the same number of steps. Without resampling, and when the shards divide evenly,
every sample is seen exactly once per epoch.
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

from .text import CaptionTokenizer
from .transforms import TrainTransform

log = logging.getLogger(__name__)

__all__ = ['ShardSource', 'expand_source', 'TrainStream', 'StreamPosition', 'build_train_loader', 'SKIP_REASONS']

SKIP_REASONS = ('bad_image', 'bad_caption', 'missing_image', 'missing_caption', 'bad_tar')
IMAGE_KEYS = ('jpg', 'jpeg', 'png', 'webp')
CAPTION_KEYS = ('txt', 'text')


@dataclass
class ShardSource:
    name: str
    urls: list[str]
    length: int  # samples in these shards
    weight: float = 1.0


def expand_source(name: str, pattern: str, length: int | None = None, weight: float = 1.0,
                  require_all: bool = True) -> ShardSource:
    """Expand a brace pattern (``a/{000..009}.tar``; ``::`` separates several patterns), check the files exist, and
    take the sample count from ``length`` or from ``sizes.json`` beside the shards."""
    urls = [u for part in pattern.split('::') for u in braceexpand.braceexpand(part)]
    local = [u for u in urls if '://' not in u and not u.startswith('pipe:')]
    missing = [u for u in local if not os.path.exists(u)]
    if missing and (require_all or len(missing) == len(urls)):
        raise FileNotFoundError(f'data source {name!r}: {len(missing)} of {len(urls)} shards of {pattern!r} do not '
                                f'exist (first: {missing[0]}). Check data.sources[].pattern and PGSEG_DATA.')
    urls = [u for u in urls if u not in set(missing)]
    if length is None:
        length = _length_from_sizes(name, urls)
    return ShardSource(name=name, urls=urls, length=int(length), weight=weight)


def _length_from_sizes(name: str, urls: list[str]) -> int:
    total, cache = 0, {}
    for u in urls:
        folder = os.path.dirname(u)
        if folder not in cache:
            path = os.path.join(folder, 'sizes.json')
            if not os.path.isfile(path):
                raise FileNotFoundError(f'data source {name!r}: no length in the config and no {path}; set '
                                        f'data.sources[].length or write sizes.json ({{"shard.tar": count, ...}})')
            with open(path) as f:
                cache[folder] = json.load(f)
        base = os.path.basename(u)
        if base not in cache[folder]:
            raise KeyError(f'data source {name!r}: {base} is not listed in {os.path.join(folder, "sizes.json")}')
        total += int(cache[folder][base])
    return total


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
        if not resampled and len(self.urls) < streams:
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

    def _samples(self, epoch: int, worker: int, counts: Counter, rng: random.Random) -> Iterator[dict]:
        """Endless passes over this worker's shards; the shuffle buffer is flushed at the end of each pass, so the
        first pass is delivered completely before any sample repeats."""
        def on_error(exc: Exception) -> bool:
            counts['bad_tar'] += 1
            log.warning('skipping unreadable tar data: %s', exc)
            return True

        repeat = 0
        while True:
            urls = self._shard_pass(epoch, repeat, worker)
            yield from self._shuffled(tarfile_samples(({'url': u} for u in urls), handler=on_error), rng)
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
        reason = None
        if image_key is None:
            reason = 'missing_image'
        elif caption_key is None:
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
            detail = 'no ' + ('image' if reason == 'missing_image' else 'caption')
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
