"""Readers for the zero-shot segmentation benchmarks in their official on-disk layouts
(docs/fidelity.md#evaluation-datasets).

Each reader lists (image, label) pairs and returns labels with ``ignore = 255``, after the dataset's label reduction
(datasets without a background class map label 0 to ignore and shift the rest down, as mmseg's
``reduce_zero_label``). A folder written by ``pgseg-synth`` carries ``pgseg_classes.json``; its class names then
replace the official ones.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import classes as C
from .classes import CLASSES_FILE

__all__ = ['DatasetSpec', 'DATASETS', 'SegmentationDataset', 'build_dataset', 'LayoutError', 'OFFICIAL_COUNTS']


class LayoutError(FileNotFoundError):
    """The dataset is not where, or not how, the reader expects it; the message shows the expected layout."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classes: tuple[str, ...]
    base: str  # folder under the data root
    images: str  # glob or pattern relative to base, with {split} and {id}
    labels: str
    split_file: str | None  # relative to base, lists ids; None = every image in the image folder (sorted)
    reduce_zero_label: bool = False
    default_split: str = 'val'

    @property
    def with_background(self) -> bool:
        return self.classes[0] == 'background'

    def layout(self, root: str) -> str:
        lines = [f'{os.path.join(root, self.base)}/', f'  {self.images}', f'  {self.labels}']
        if self.split_file:
            lines.append(f'  {self.split_file}')
        return '\n'.join(lines)


DATASETS: dict[str, DatasetSpec] = {
    'voc': DatasetSpec('voc', C.VOC, 'VOCdevkit/VOC2012', 'JPEGImages/{id}.jpg', 'SegmentationClass/{id}.png',
                       'ImageSets/Segmentation/{split}.txt'),
    'voc20': DatasetSpec('voc20', C.VOC[1:], 'VOCdevkit/VOC2012', 'JPEGImages/{id}.jpg', 'SegmentationClass/{id}.png',
                         'ImageSets/Segmentation/{split}.txt', reduce_zero_label=True),
    'context': DatasetSpec('context', C.CONTEXT, 'VOCdevkit/VOC2010', 'JPEGImages/{id}.jpg',
                           'SegmentationClassContext/{id}.png', 'ImageSets/SegmentationContext/{split}.txt'),
    'context59': DatasetSpec('context59', C.CONTEXT[1:], 'VOCdevkit/VOC2010', 'JPEGImages/{id}.jpg',
                             'SegmentationClassContext/{id}.png', 'ImageSets/SegmentationContext/{split}.txt',
                             reduce_zero_label=True),
    'coco_object': DatasetSpec('coco_object', C.COCO_OBJECT, 'coco', 'images/{split}2017/{id}.jpg',
                               'annotations/{split}2017/{id}_instanceTrainIds.png', None),
    'coco_stuff': DatasetSpec('coco_stuff', C.COCO_STUFF, 'coco_stuff164k', 'images/{split}2017/{id}.jpg',
                              'annotations/{split}2017/{id}_labelTrainIds.png', None),
    'cityscapes': DatasetSpec('cityscapes', C.CITYSCAPES, 'cityscapes', 'leftImg8bit/{split}/{id}_leftImg8bit.png',
                              'gtFine/{split}/{id}_gtFine_labelTrainIds.png', None),
    'ade20k': DatasetSpec('ade20k', C.ADE20K, 'ADEChallengeData2016', 'images/{split}/{id}.jpg',
                          'annotations/{split}/{id}.png', None, reduce_zero_label=True, default_split='validation'),
}

# Official image counts per split (the layout check in eval/prepare.py compares against them).
OFFICIAL_COUNTS = {'voc': 1449, 'voc20': 1449, 'context': 5105, 'context59': 5105, 'coco_object': 5000,
                   'coco_stuff': 5000, 'cityscapes': 500, 'ade20k': 2000}


class SegmentationDataset:
    """``dataset[i] -> (RGB PIL image, label uint8 [H, W] with 255 = ignore, image id)``."""

    def __init__(self, spec: DatasetSpec, root: str, split: str | None = None, classes: tuple[str, ...] | None = None):
        self.spec, self.root = spec, root
        self.split = split or spec.default_split
        self.base = os.path.join(root, spec.base)
        self.classes = classes or self._synthetic_classes() or spec.classes
        self.ids = self._list_ids()

    def _synthetic_classes(self) -> tuple[str, ...] | None:
        path = os.path.join(self.base, CLASSES_FILE)
        if not os.path.isfile(path):
            return None
        names = tuple(json.load(open(path))['classes'])
        if self.spec.reduce_zero_label and names and names[0] == 'background':
            names = names[1:]
        return names

    def _list_ids(self) -> list[str]:
        if not os.path.isdir(self.base):
            raise LayoutError(f'{self.spec.name}: {self.base} does not exist. Expected layout:\n'
                              f'{self.spec.layout(self.root)}')
        if self.spec.split_file:
            path = os.path.join(self.base, self.spec.split_file.format(split=self.split))
            if not os.path.isfile(path):
                raise LayoutError(f'{self.spec.name}: split file {path} not found. Expected layout:\n'
                                  f'{self.spec.layout(self.root)}')
            ids = [line.strip() for line in open(path) if line.strip()]
        else:  # every image under the image folder (sub-folders too, e.g. Cityscapes' cities), sorted
            prefix, suffix = os.path.join(self.base, self.spec.images.format(split=self.split, id='\0')).split('\0')
            ids = []
            for folder, _, files in os.walk(prefix):
                for f in files:
                    path = os.path.join(folder, f)
                    if path.endswith(suffix):
                        ids.append(path[len(prefix):len(path) - len(suffix)])
            ids.sort()
        if not ids:
            raise LayoutError(f'{self.spec.name}: no images for split {self.split!r} under {self.base}. Expected '
                              f'layout:\n{self.spec.layout(self.root)}')
        missing = [i for i in ids[:50] if not os.path.isfile(self.label_path(i))]
        if missing:
            raise LayoutError(f'{self.spec.name}: label {self.label_path(missing[0])} not found. Expected layout:\n'
                              f'{self.spec.layout(self.root)}')
        return ids

    def image_path(self, image_id: str) -> str:
        return os.path.join(self.base, self.spec.images.format(split=self.split, id=image_id))

    def label_path(self, image_id: str) -> str:
        return os.path.join(self.base, self.spec.labels.format(split=self.split, id=image_id))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def load_label(self, image_id: str) -> np.ndarray:
        label = np.array(Image.open(self.label_path(image_id)))  # palette PNGs keep their indices
        if label.ndim != 2:
            raise ValueError(f'{self.label_path(image_id)}: expected a single-channel label image')
        label = label.astype(np.uint8)
        if self.spec.reduce_zero_label:
            label = np.where(label == 0, 255, label.astype(np.int16) - 1).astype(np.uint8)
            label[label == 254] = 255  # 255 - 1 stays ignore
        return label

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image = Image.open(self.image_path(image_id)).convert('RGB')
        return image, self.load_label(image_id), image_id


def build_dataset(name: str, root: str, split: str | None = None) -> SegmentationDataset:
    if name not in DATASETS:
        raise ValueError(f'unknown dataset {name!r}; choose from {", ".join(DATASETS)}')
    return SegmentationDataset(DATASETS[name], root, split)
