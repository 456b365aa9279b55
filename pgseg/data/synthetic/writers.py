"""Write synthetic scenes to disk: image-caption shards in img2dataset's layout, and segmentation sets in the exact
on-disk layouts of Pascal VOC 2012, Pascal Context and COCO-Object (docs/fidelity.md#evaluation-datasets).

Every writer is deterministic: the scene of sample i depends only on (seed, i).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import asdict
from typing import Literal, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from ...eval.classes import CLASSES_FILE
from ...eval.visualize import voc_palette
from .scenes import Scene, SceneConfig, caption_for, render_scene

__all__ = ['write_caption_shards', 'write_segmentation_set', 'scene_rng', 'parse_pairs', 'parse_classes',
           'check_scene_matches']

Layout = Literal['voc', 'context', 'coco_object']


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def _jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='JPEG', quality=quality)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_caption_shards(out_dir: str, num_samples: int, seed: int = 0, samples_per_shard: int = 1000,
                         scene: SceneConfig | None = None, progress: bool = True) -> list[str]:
    """Shards ``{00000..}.tar`` holding ``{key}.jpg``, ``{key}.txt``, ``{key}.json`` per sample (img2dataset's
    layout; key = 5-digit shard + 4-digit index), and ``sizes.json`` mapping shard file name to sample count.
    No pixel labels are written: the JSON has what img2dataset writes plus the seed."""
    scene = scene or SceneConfig()
    if samples_per_shard > 10000:
        raise ValueError('samples_per_shard must be at most 10000 (4-digit sample index in the key)')
    os.makedirs(out_dir, exist_ok=True)
    sizes: dict[str, int] = {}
    paths = []
    num_shards = (num_samples + samples_per_shard - 1) // samples_per_shard
    bar = tqdm(total=num_samples, desc=f'caption shards -> {out_dir}', disable=not progress, unit='img')
    for shard in range(num_shards):
        name = f'{shard:05d}.tar'
        tmp = os.path.join(out_dir, f'.{name}.tmp')
        count = min(samples_per_shard, num_samples - shard * samples_per_shard)
        with tarfile.open(tmp, 'w') as tar:
            for i in range(count):
                index = shard * samples_per_shard + i
                rng = scene_rng(seed, index)
                s = render_scene(rng, scene)
                caption = caption_for(rng, s.objects, s.background, scene.background_in_caption)
                key = f'{shard:05d}{i:04d}'
                meta = {'key': key, 'caption': caption, 'url': None, 'status': 'success', 'width': scene.size,
                        'height': scene.size, 'synthetic_seed': seed, 'synthetic_index': index,
                        'background': s.background}
                _add(tar, f'{key}.jpg', _jpeg(s.image))
                _add(tar, f'{key}.txt', caption.encode('utf-8'))
                _add(tar, f'{key}.json', json.dumps(meta).encode('utf-8'))
                bar.update(1)
        os.replace(tmp, os.path.join(out_dir, name))
        sizes[name] = count
        paths.append(os.path.join(out_dir, name))
    bar.close()
    with open(os.path.join(out_dir, 'sizes.json'), 'w') as f:
        json.dump(sizes, f, indent=1)
    with open(os.path.join(out_dir, CLASSES_FILE), 'w') as f:
        json.dump({'classes': list(scene.classes), 'scene': _scene_dict(scene)}, f, indent=1)
    return paths


def _scene_dict(scene: SceneConfig) -> dict:
    d = asdict(scene)
    d['classes'] = list(scene.classes)
    d['forbidden_pairs'] = [list(p) for p in scene.forbidden_pairs]
    d['backgrounds'] = list(scene.backgrounds)
    return d


def check_scene_matches(directory: str, scene: SceneConfig) -> None:
    """Raise ValueError when the synthetic set in ``directory`` was written with another scene design than ``scene``
    (data made by an earlier run with other settings must not be reused silently)."""
    path = os.path.join(directory, CLASSES_FILE)
    if not os.path.isfile(path):
        raise ValueError(f'{path}: missing; this is not a pgseg-synth directory (delete {directory} to regenerate)')
    with open(path) as f:
        stored = json.load(f).get('scene', {})
    wanted = json.loads(json.dumps(_scene_dict(scene)))  # tuples -> lists, as stored
    diff = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
    if diff:
        detail = ', '.join(f'{k}: has {a!r}, expected {b!r}' for k, (a, b) in sorted(diff.items()))
        raise ValueError(f'{path}: written with another scene design ({detail}); delete {directory} to regenerate '
                         f'it, or point --data elsewhere')


def write_segmentation_set(root: str, layout: Layout, num_images: int, seed: int = 1000,
                           scene: SceneConfig | None = None, split: str = 'val', progress: bool = True) -> str:
    """A labelled synthetic set under ``root`` in an official layout. Returns the dataset directory.

    - ``voc``: ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass}``, ``ImageSets/Segmentation/<split>.txt``;
      palette PNG labels, 0 background, k = class k, 255 on object outlines.
    - ``context``: ``VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext}``,
      ``ImageSets/SegmentationContext/<split>.txt``; grey PNG labels as mmseg's converter writes.
    - ``coco_object``: ``coco/images/<split>2017/*.jpg``, ``coco/annotations/<split>2017/*_instanceTrainIds.png``;
      no split file, no ignore label.
    """
    scene = scene or SceneConfig()
    if layout == 'voc':
        base = os.path.join(root, 'VOCdevkit', 'VOC2012')
        img_dir, ann_dir, list_file = 'JPEGImages', 'SegmentationClass', f'ImageSets/Segmentation/{split}.txt'
    elif layout == 'context':
        base = os.path.join(root, 'VOCdevkit', 'VOC2010')
        img_dir, ann_dir = 'JPEGImages', 'SegmentationClassContext'
        list_file = f'ImageSets/SegmentationContext/{split}.txt'
    elif layout == 'coco_object':
        base = os.path.join(root, 'coco')
        img_dir, ann_dir, list_file = f'images/{split}2017', f'annotations/{split}2017', None
    else:
        raise ValueError(f"layout must be 'voc', 'context' or 'coco_object', got {layout!r}")
    os.makedirs(os.path.join(base, img_dir), exist_ok=True)
    os.makedirs(os.path.join(base, ann_dir), exist_ok=True)
    if list_file is not None:  # splits share the image folder: their ids must not collide
        list_dir = os.path.dirname(os.path.join(base, list_file))
        first = f'{2000 + seed % 1000:04d}_{0:06d}'
        for other in os.listdir(list_dir) if os.path.isdir(list_dir) else []:
            if other != os.path.basename(list_file) and other.endswith('.txt'):
                if first in {line.strip() for line in open(os.path.join(list_dir, other))}:
                    raise ValueError(f'seed {seed} gives image ids ({first}, ...) that split {other[:-4]!r} in '
                                     f'{base} already uses; pick a seed that differs from its seed modulo 1000')
    palette = voc_palette()
    ids = []
    for i in tqdm(range(num_images), desc=f'{layout} {split} -> {base}', disable=not progress, unit='img'):
        s: Scene = render_scene(scene_rng(seed, i), scene)
        if layout == 'coco_object':
            name = f'{seed * 1_000_000 + i:012d}'
            label_name = f'{name}_instanceTrainIds.png'
        else:
            name = f'{2000 + seed % 1000:04d}_{i:06d}'
            label_name = f'{name}.png'
        label = s.mask.copy()
        if layout == 'voc':
            label[s.boundary] = 255
            png = Image.fromarray(label, mode='P')
            png.putpalette(palette)
        else:
            png = Image.fromarray(label, mode='L')
        Image.fromarray(s.image).save(os.path.join(base, img_dir, f'{name}.jpg'), quality=92)
        png.save(os.path.join(base, ann_dir, label_name))
        ids.append(name)
    if list_file is not None:
        os.makedirs(os.path.dirname(os.path.join(base, list_file)), exist_ok=True)
        with open(os.path.join(base, list_file), 'w') as f:
            f.write('\n'.join(ids) + '\n')
    with open(os.path.join(base, CLASSES_FILE), 'w') as f:
        json.dump({'classes': ['background', *scene.classes], 'layout': layout, 'split': split, 'seed': seed,
                   'scene': _scene_dict(scene)}, f, indent=1)
    return base


def parse_pairs(text: str | None) -> list[tuple[str, str]]:
    """'circle+star,square+heart' -> [('circle', 'star'), ('square', 'heart')]."""
    if not text:
        return []
    pairs = []
    for item in text.split(','):
        parts = [p.strip() for p in item.split('+')]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"class pair {item!r} must look like 'circle+star'")
        pairs.append((parts[0], parts[1]))
    return pairs


def parse_classes(text: str | None, default: Sequence[str]) -> tuple[str, ...]:
    """Comma-separated class names (a command-line value) -> a tuple; ``default`` when empty."""
    return tuple(c.strip() for c in text.split(',')) if text else tuple(default)
