"""Training crops of an official-layout dataset for both MVP-SEG stages, and their batch sampler.

A label lookup table decides what each ground-truth class becomes:

* prompt learning (:func:`seen_only_labels`, the inductive setting): seen classes are renumbered to their seen
  position and unseen pixels become ignore (255), so no unseen mask is ever seen;
* MVP-SEG+ transfer (:func:`suppressed_unseen_labels`, the transductive setting, docs/mvpseg.md#mvp-seg):
  seen classes keep their index among all classes and unseen pixels become **unlabelled** (-1 in the batch): they
  are trained on, with pseudo-labels, rather than ignored.

Augmentation as MaskCLIP+ (mmseg's pipeline): random rescale (ratio range around ``base_size``), random crop
(padding with ignore; with ``cat_max_ratio``, up to 10 tries for a crop whose largest category covers less than that
share of the labelled pixels), horizontal flip, and optionally mmseg's photometric distortion. Every random choice
comes from (seed, epoch, index): batches are reproducible and a resumed run continues exactly.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..eval.datasets import SegmentationDataset

__all__ = ['IGNORE', 'UNLABELLED', 'seen_only_labels', 'suppressed_unseen_labels', 'photometric_distortion',
           'CropDataset', 'EpochBatchSampler', 'crop_loader']

IGNORE = 255  # no loss
UNLABELLED = -1  # a pixel of an unseen class with its label suppressed: it takes a pseudo-label
_UNLABELLED_U8 = 254  # UNLABELLED while the label is a uint8 image
CROP_TRIES = 10  # mmseg's RandomCrop: tries before the category ratio cap gives up


def seen_only_labels(seen: Sequence[int]) -> np.ndarray:
    """Lookup table for prompt learning: seen class ``seen[j]`` -> j, everything else -> ignore."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for new, old in enumerate(seen):
        lut[old] = new
    return lut


def suppressed_unseen_labels(unseen: Sequence[int]) -> np.ndarray:
    """Lookup table for the transductive transfer: classes keep their index, unseen ones become unlabelled."""
    lut = np.arange(256, dtype=np.uint8)
    lut[list(unseen)] = _UNLABELLED_U8
    lut[IGNORE] = IGNORE
    return lut


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on a uint8 RGB image [H, W, 3], each part with probability 1/2: brightness
    + U(-32, 32); contrast x U(0.5, 1.5) (before or after the colour parts, at random); saturation x U(0.5, 1.5)
    and hue + U(-18, 18) degrees of OpenCV's 180 (through torchvision's colour operations). As mmseg, each of
    brightness and contrast is clipped to 0..255 and truncated to uint8 at once."""
    def convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    x = image
    if rng.random() < 0.5:
        x = convert(x, beta=rng.uniform(-32, 32))
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    if contrast is not None and contrast_first:
        x = convert(x, alpha=contrast)
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    hue = rng.integers(-18, 19) / 180.0 if rng.random() < 0.5 else None
    if saturation is not None or hue is not None:
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)
        if saturation is not None:
            t = TF.adjust_saturation(t, float(saturation))
        if hue is not None:
            t = TF.adjust_hue(t, float(hue))
        x = t.permute(1, 2, 0).numpy()
    if contrast is not None and not contrast_first:
        x = convert(x, alpha=contrast)
    return np.ascontiguousarray(x)


class CropDataset(Dataset):
    """``dataset[(epoch, index)] -> (image [3, S, S] float in [0, 1], label [S, S] int64)``: the label after the
    lookup table ``lut`` (see the module's doc), with 255 = ignore and -1 = unlabelled."""

    def __init__(self, dataset: SegmentationDataset, lut: np.ndarray, crop_size: int, base_size: int | None = None,
                 scale_range: Sequence[float] = (0.5, 2.0), seed: int = 0, cat_max_ratio: float | None = None,
                 photometric: bool = False):
        self.dataset, self.lut, self.crop, self.seed = dataset, lut, crop_size, seed
        self.base = base_size or crop_size
        self.scale_range = tuple(scale_range)
        self.cat_max_ratio, self.photometric = cat_max_ratio, photometric

    def __len__(self) -> int:
        return len(self.dataset)

    def _crop_corner(self, label: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        S = self.crop
        for _ in range(CROP_TRIES if self.cat_max_ratio else 1):
            top = int(rng.integers(0, label.shape[0] - S + 1))
            left = int(rng.integers(0, label.shape[1] - S + 1))
            if not self.cat_max_ratio:
                break
            window = label[top:top + S, left:left + S]
            counts = np.bincount(window[window != IGNORE].ravel(), minlength=256)
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return top, left

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
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
        top, left = self._crop_corner(label, rng)
        image, label = image[top:top + S, left:left + S], label[top:top + S, left:left + S]
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0  # a writable copy
        y = torch.from_numpy(np.array(label)).long()
        return x, y.masked_fill(y == _UNLABELLED_U8, UNLABELLED)


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

    def __len__(self) -> int:
        return self.batches_per_epoch


def crop_loader(dataset: CropDataset, batch_size: int, rank: int, world: int, seed: int, step: int,
                num_workers: int, device: torch.device) -> DataLoader:
    """The trainers' loader: :class:`EpochBatchSampler` batches starting where ``step`` steps left off, with a
    generator of its own (iterating the loader must not draw from the global RNG, which a resume restores)."""
    per_epoch = EpochBatchSampler(len(dataset), batch_size, rank, world).batches_per_epoch
    sampler = EpochBatchSampler(len(dataset), batch_size, rank, world, seed,
                                start_epoch=step // per_epoch, start_batch=step % per_epoch)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=device.type == 'cuda',
                      prefetch_factor=4 if num_workers else None, generator=torch.Generator().manual_seed(seed))
