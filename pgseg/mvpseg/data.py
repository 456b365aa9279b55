"""Training data for prompt learning: labelled images of an official-layout dataset, seen classes only.

Labels are remapped to seen-class positions; pixels of unseen classes become ignore (255), so no unseen mask is
ever seen (the inductive setting: images are kept, unseen pixels carry no loss). Augmentation as MaskCLIP+: random
rescale (ratio range around ``base_size``), random crop (padding with ignore), horizontal flip. Every random choice
comes from (seed, epoch, index): batches are reproducible and a resumed run continues exactly.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..eval.datasets import SegmentationDataset

__all__ = ['SeenPixelDataset', 'EpochBatchSampler']


class SeenPixelDataset(Dataset):
    """``dataset[(epoch, index)] -> (image [3, S, S] float in [0, 1], label [S, S] int64: seen position or 255)``."""

    def __init__(self, dataset: SegmentationDataset, seen: Sequence[int], crop_size: int, base_size: int | None = None,
                 scale_range: Sequence[float] = (0.5, 2.0), seed: int = 0):
        self.dataset, self.crop, self.seed = dataset, crop_size, seed
        self.base = base_size or crop_size
        self.scale_range = tuple(scale_range)
        self.lut = np.full(256, 255, dtype=np.uint8)
        for new, old in enumerate(seen):
            self.lut[old] = new

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = item
        rng = np.random.default_rng([self.seed, epoch, index])
        image, label, _ = self.dataset[index]
        label = self.lut[label]
        w, h = image.size
        scale = rng.uniform(*self.scale_range) * self.base / min(w, h)
        size = (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
        image = np.asarray(image.resize(size, Image.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
        S = self.crop
        ph, pw = max(S - size[1], 0), max(S - size[0], 0)
        if ph or pw:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=255)
        top = int(rng.integers(0, image.shape[0] - S + 1))
        left = int(rng.integers(0, image.shape[1] - S + 1))
        image, label = image[top:top + S, left:left + S], label[top:top + S, left:left + S]
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        return x, torch.from_numpy(np.ascontiguousarray(label)).long()


class EpochBatchSampler(Sampler):
    """Batches of (epoch, index): each epoch a seeded permutation, split over ranks (rank, rank + W, ...), cut into
    full batches; starts at (``start_epoch``, ``start_batch``) and runs forever (the trainer counts steps)."""

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_epoch: int = 0, start_batch: int = 0):
        self.n, self.batch, self.rank, self.world, self.seed = num_items, batch_size, rank, world_size, seed
        self.start_epoch, self.start_batch = start_epoch, start_batch
        if self.batches_per_epoch < 1:
            raise ValueError(f'{num_items} training images make no batch of {batch_size} per rank on {world_size} '
                             f'rank(s); lower data.batch_size')

    @property
    def batches_per_epoch(self) -> int:
        return (self.n // self.world) // self.batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, first = self.start_epoch, self.start_batch
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            mine = order[self.rank::self.world].tolist()
            for b in range(first, self.batches_per_epoch):
                yield [(epoch, i) for i in mine[b * self.batch:(b + 1) * self.batch]]
            epoch, first = epoch + 1, 0

    def __len__(self) -> int:  # per epoch
        return self.batches_per_epoch
