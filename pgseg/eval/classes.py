"""Class names of the evaluation datasets, exactly as the official code and mmseg list them: they are the prompts.

The lists below are PGSeg's; each protocol names the code whose names it uses (``Protocol.class_names``), and
:func:`prompt_names` gives a dataset's names under it (docs/protocols.md#class-names)."""
from __future__ import annotations

# a labelled set in an official layout that is not an official dataset (a synthetic set, a user's own) lists its
# class names in this file beside it; the readers take them from there
CLASSES_FILE = 'pgseg_classes.json'

VOC = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow', 'table',
       'dog', 'horse', 'motorbike', 'person', 'plant', 'sheep', 'sofa', 'train', 'monitor')

CONTEXT = ('background', 'airplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book', 'bottle',
           'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth', 'computer', 'cow', 'cup',
           'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground', 'horse', 'keyboard',
           'light', 'motorbike', 'mountain', 'mouse', 'person', 'plate', 'platform', 'plant', 'road', 'rock', 'sheep',
           'shelves', 'sidewalk', 'sign', 'sky', 'snow', 'sofa', 'table', 'track', 'train', 'tree', 'truck',
           'monitor', 'wall', 'water', 'window', 'wood')

# PGSeg's list has 'aeroplane ' (with a trailing space; GroupViT: 'airplane'); the space vanishes in tokenisation.
COCO_OBJECT = ('background', 'person', 'bicycle', 'car', 'motorcycle', 'aeroplane ', 'bus', 'train', 'truck', 'boat',
               'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse',
               'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie',
               'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove',
               'skateboard', 'surfboard', 'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon',
               'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut',
               'cake', 'chair', 'couch', 'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse',
               'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book',
               'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush')

COCO_STUFF = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant',
    'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard',
    'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli',
    'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant', 'bed', 'dining table', 'toilet',
    'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush', 'banner',
    'blanket', 'branch', 'bridge', 'building-other', 'bush', 'cabinet', 'cage', 'cardboard', 'carpet',
    'ceiling-other', 'ceiling-tile', 'cloth', 'clothes', 'clouds', 'counter', 'cupboard', 'curtain', 'desk-stuff',
    'dirt', 'door-stuff', 'fence', 'floor-marble', 'floor-other', 'floor-stone', 'floor-tile', 'floor-wood', 'flower',
    'fog', 'food-other', 'fruit', 'furniture-other', 'grass', 'gravel', 'ground-other', 'hill', 'house', 'leaves',
    'light', 'mat', 'metal', 'mirror-stuff', 'moss', 'mountain', 'mud', 'napkin', 'net', 'paper', 'pavement',
    'pillow', 'plant-other', 'plastic', 'platform', 'playingfield', 'railing', 'railroad', 'river', 'road', 'rock',
    'roof', 'rug', 'salad', 'sand', 'sea', 'shelf', 'sky-other', 'skyscraper', 'snow', 'solid-other', 'stairs',
    'stone', 'straw', 'structural-other', 'table', 'tent', 'textile-other', 'towel', 'tree', 'vegetable',
    'wall-brick', 'wall-concrete', 'wall-other', 'wall-panel', 'wall-stone', 'wall-tile', 'wall-wood', 'water-other',
    'waterdrops', 'window-blind', 'window-other', 'wood')

CITYSCAPES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign', 'vegetation',
              'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train', 'motorcycle', 'bicycle')

ADE20K = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed ', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk', 'rock',
    'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers',
    'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs', 'runway',
    'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind',
    'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm', 'kitchen island',
    'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel', 'light', 'truck', 'tower',
    'chandelier', 'awning', 'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track', 'apparel',
    'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van', 'ship',
    'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel', 'basket',
    'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank', 'trade name',
    'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture', 'hood',
    'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor',
    'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag')

# Where a code's prompt names differ from PGSeg's lists above: dataset -> {PGSeg's name: that code's name}.
_MMSEG_VOC = {'table': 'diningtable', 'plant': 'pottedplant', 'monitor': 'tvmonitor'}
_MMSEG_CONTEXT = {'airplane': 'aeroplane', 'plant': 'pottedplant', 'monitor': 'tvmonitor'}
NAMINGS: dict[str, dict[str, dict[str, str]]] = {
    'pgseg': {},
    'groupvit': {'coco_object': {'aeroplane ': 'airplane'}},
    # mmseg's dataset classes, which the 8-benchmark code (TCL) uses unchanged; COCO-Object's from its own list
    'mmseg': {'voc': _MMSEG_VOC, 'voc20': _MMSEG_VOC, 'context': _MMSEG_CONTEXT, 'context59': _MMSEG_CONTEXT,
              'coco_object': {'aeroplane ': 'airplane'}},
}


# SCLIP-family name files: several queries per class where the file lists synonyms (a class scores the best of its
# queries), background of VOC and COCO-Object as 26 stuff words; COCO-Stuff, ADE20K and Cityscapes names are written
# without spaces ('trafficlight'). By dataset: {PGSeg's name: the queries}.
_SCLIP_BACKGROUND = ('sky', 'wall', 'tree', 'wood', 'grass', 'road', 'sea', 'river', 'mountain', 'sands', 'desk', 'bed',
                     'building', 'cloud', 'lamp', 'door', 'window', 'wardrobe', 'ceiling', 'shelf', 'curtain', 'stair',
                     'floor', 'hill', 'rail', 'fence')
_SCLIP_PERSON = ('person', 'person in shirt', 'person in jeans', 'person in dress', 'person in sweater',
                 'person in skirt', 'person in jacket')
_SCLIP_VOC = {'background': _SCLIP_BACKGROUND, 'boat': ('ship',), 'plant': ('pottedplant',), 'person': _SCLIP_PERSON,
              'monitor': ('television monitor', 'tv monitor', 'monitor', 'television', 'screen')}
SCLIP_QUERIES: dict[str, dict[str, tuple[str, ...]]] = {
    'voc': _SCLIP_VOC, 'voc20': _SCLIP_VOC,
    'context': {k: (v,) for k, v in _MMSEG_CONTEXT.items()},
    'context59': {k: (v,) for k, v in _MMSEG_CONTEXT.items()},
    'coco_object': {'background': _SCLIP_BACKGROUND, 'person': _SCLIP_PERSON + ('body',), 'aeroplane ': ('airplane',)},
}
_SCLIP_NO_SPACES = ('coco_stuff', 'ade20k', 'cityscapes')


def query_names(dataset: str, names, naming: str) -> list[tuple[str, ...]]:
    """Per class of an official dataset, the text queries it is scored by: one (the protocol's name) for every
    naming but ``'sclip'``, whose name files give several for some classes."""
    if naming != 'sclip':
        return [(n,) for n in prompt_names(dataset, names, naming)]
    renames = SCLIP_QUERIES.get(dataset, {})
    out = []
    for n in names:
        queries = renames.get(n, (n.strip(),))
        out.append(tuple(q.replace(' ', '') for q in queries) if dataset in _SCLIP_NO_SPACES else queries)
    return out


def prompt_names(dataset: str, names, naming: str) -> tuple[str, ...]:
    """The class names of an official dataset (``names``, as its reader lists them) under a protocol's naming."""
    if naming not in NAMINGS:
        raise ValueError(f'unknown class naming {naming!r}; choose from {", ".join(NAMINGS)} (and sclip, which gives '
                         'several queries per class: query_names)')
    renames = NAMINGS[naming].get(dataset, {})
    return tuple(renames.get(n, n) for n in names)


assert len(VOC) == 21 and len(CONTEXT) == 60 and len(COCO_OBJECT) == 81
assert len(COCO_STUFF) == 171 and len(CITYSCAPES) == 19 and len(ADE20K) == 150
