"""Dataset preparation: COCO-Object label maps, Cityscapes train ids, and image counts against the official ones."""
from __future__ import annotations

import os
import shutil

import numpy as np
from PIL import Image
from tqdm import tqdm

from .datasets import DATASETS, OFFICIAL_COUNTS, LayoutError, SegmentationDataset

__all__ = ['COCO_CATEGORY_IDS', 'coco_stuff_to_object_lut', 'convert_coco_object_from_stuff',
           'convert_coco_object_from_instances', 'CITYSCAPES_ID_TO_TRAIN_ID', 'convert_cityscapes', 'count_images']

# COCO-Stuff-164k ids (0-based, 0-181) that no annotation uses.
_UNUSED_STUFF_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def coco_stuff_to_object_lut() -> np.ndarray:
    """[256] uint8 lookup: COCO-Stuff id -> COCO-Object label (things 1..80, stuff and unlabeled 0), as the official
    converter: used ids -> contiguous train ids 0..170, +1, and every source id above 90 (stuff, 255) -> 0."""
    used = [i for i in range(182) if i not in _UNUSED_STUFF_IDS]
    lut = np.zeros(256, dtype=np.uint8)
    for train_id, source in enumerate(used):
        lut[source] = 0 if source > 90 else train_id + 1
    return lut


def convert_coco_object_from_stuff(coco_root: str, out_root: str, splits=('val2017',)) -> int:
    """``<coco_root>/annotations/<split>/*.png`` (COCO-Stuff-164k) -> ``<out_root>/annotations/<split>/
    <name>_instanceTrainIds.png``; images copied from ``<coco_root>/images/<split>``. Returns files written."""
    lut, n = coco_stuff_to_object_lut(), 0
    for split in splits:
        src = os.path.join(coco_root, 'annotations', split)
        if not os.path.isdir(src):
            raise LayoutError(f'{src} not found: expected the COCO-Stuff-164k label PNGs in annotations/{split}/')
        dst = os.path.join(out_root, 'annotations', split)
        os.makedirs(dst, exist_ok=True)
        # the raw label maps are named by image id (000000000139.png); derived maps beside them (mmseg's
        # *_labelTrainIds.png, this converter's own *_instanceTrainIds.png on a re-run) are not sources
        names = sorted(f for f in os.listdir(src) if f.endswith('.png') and '_' not in f)
        for name in tqdm(names, desc=f'coco-object {split}'):
            Image.fromarray(lut[np.asarray(Image.open(os.path.join(src, name)))]).save(
                os.path.join(dst, name.replace('.png', '_instanceTrainIds.png')))
            n += 1
        _copy_images(os.path.join(coco_root, 'images', split), os.path.join(out_root, 'images', split))
    return n


# COCO's 80 object categories by their fixed ids (1..90 with gaps), in the order of the COCO-Object class list:
# label k (1..80) is COCO_CATEGORY_IDS[k - 1], whatever categories an annotation file lists.
COCO_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
                     32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
                     58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
                     88, 89, 90)


def convert_coco_object_from_instances(annotation_json: str, images_dir: str, out_root: str, split: str) -> int:
    """COCO instance annotations (pycocotools) -> the same label maps as :func:`convert_coco_object_from_stuff`.

    Labels come from COCO's fixed category ids (:data:`COCO_CATEGORY_IDS`), not from the file's own category list,
    so a file that lists only the categories it uses is labelled the same. Painting follows COCO-Stuff's own
    conversion of thing annotations: crowd annotations are left out (their pixels stay 0, as the COCO-Stuff label
    maps leave them unlabelled, which COCO-Object maps to background), and the others are painted in the file's
    order, a later instance over an earlier one where they overlap; 0 elsewhere.
    """
    try:
        from pycocotools.coco import COCO
    except ImportError as exc:
        raise ImportError('converting from instance annotations needs pycocotools: pip install pycocotools') from exc
    coco = COCO(annotation_json)
    index = {c: i + 1 for i, c in enumerate(COCO_CATEGORY_IDS)}
    unknown = sorted({a['category_id'] for a in coco.dataset.get('annotations', [])} - set(index))
    if unknown:
        raise ValueError(f'{annotation_json}: category ids {unknown} are not COCO object categories '
                         f'(expected ids among {COCO_CATEGORY_IDS[0]}..{COCO_CATEGORY_IDS[-1]} of the 80 fixed ones)')
    dst = os.path.join(out_root, 'annotations', split)
    os.makedirs(dst, exist_ok=True)
    n = 0
    for img_id in tqdm(sorted(coco.getImgIds()), desc=f'coco-object {split}'):
        info = coco.loadImgs(img_id)[0]
        label = np.zeros((info['height'], info['width']), dtype=np.uint8)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False)):  # the file's order
            label[coco.annToMask(ann) > 0] = index[ann['category_id']]
        Image.fromarray(label).save(os.path.join(dst, os.path.splitext(info['file_name'])[0] +
                                                 '_instanceTrainIds.png'))
        n += 1
    _copy_images(images_dir, os.path.join(out_root, 'images', split))
    return n


def _copy_images(src: str, dst: str) -> None:
    if os.path.abspath(src) == os.path.abspath(dst) or not os.path.isdir(src):
        return
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if not os.path.exists(os.path.join(dst, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


# Cityscapes labelIds -> trainIds (19 classes, 255 ignore), from the dataset's own label definitions.
CITYSCAPES_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                             25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def convert_cityscapes(root: str, splits=('val',)) -> int:
    """``gtFine/<split>/<city>/*_gtFine_labelIds.png`` -> ``*_gtFine_labelTrainIds.png`` beside them."""
    lut = np.full(256, 255, dtype=np.uint8)
    for k, v in CITYSCAPES_ID_TO_TRAIN_ID.items():
        lut[k] = v
    n = 0
    for split in splits:
        base = os.path.join(root, 'gtFine', split)
        if not os.path.isdir(base):
            raise LayoutError(f'{base} not found: expected cityscapes/gtFine/{split}/<city>/*_gtFine_labelIds.png')
        for folder, _, files in os.walk(base):
            for f in sorted(files):
                if f.endswith('_gtFine_labelIds.png'):
                    label = lut[np.asarray(Image.open(os.path.join(folder, f)))]
                    Image.fromarray(label).save(os.path.join(folder, f.replace('_labelIds', '_labelTrainIds')))
                    n += 1
    return n


def count_images(data_root: str, datasets=None) -> dict:
    """Images found per dataset's evaluation split, against the official counts."""
    report = {}
    for name in datasets or DATASETS:
        try:
            found = len(SegmentationDataset(DATASETS[name], data_root))
            report[name] = {'found': found, 'official': OFFICIAL_COUNTS[name], 'ok': found == OFFICIAL_COUNTS[name]}
        except LayoutError as exc:
            report[name] = {'found': 0, 'official': OFFICIAL_COUNTS[name], 'ok': False, 'error': str(exc)}
    return report

