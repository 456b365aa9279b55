"""Procedural scenes of named shapes, for tests and the CPU demo: deterministic by seed, no download.

A scene is a textured background with one to several objects of named classes (random size, position, rotation,
colour, texture; later objects occlude earlier ones). :func:`render_scene` returns the image, the class-index mask and
the list of objects; :func:`caption_for` describes the objects in words (synonyms, counts, plurals, colours,
relations, distractor words). Writers for img2dataset shards and the segmentation layouts live in
:mod:`pgseg.data.synthetic.writers`.

Colours: with ``hue_jitter`` below 180 each class keeps its own hue (plus jitter), the "class-tied colour" design the
demo notes found necessary for recognition to emerge quickly; 180 makes colour carry no class information.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

__all__ = ['SHAPES', 'DEFAULT_CLASSES', 'SceneConfig', 'SceneObject', 'Scene', 'render_scene', 'caption_for',
           'colour_name', 'allowed_class_sets']


def _rot(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


# Each shape: (x, y) coordinates relative to the centre in units of the object radius (rotated) -> inside mask.
def _circle(x, y):
    return x * x + y * y < 1.0


def _square(x, y):
    return (np.abs(x) < 0.78) & (np.abs(y) < 0.78)


def _triangle(x, y):
    # equilateral, circumradius 1, apex up
    return (y > -0.5) & (np.sqrt(3) * np.abs(x) < 1.0 - y)


def _star(x, y):
    r, t = np.sqrt(x * x + y * y), np.arctan2(y, x)
    # 5 points: radius alternates between 1 and 0.42 along the angle
    phase = np.mod(t * 5 / (2 * np.pi), 1.0)
    edge = 0.42 + 0.58 * np.abs(1 - 2 * phase) ** 1.6
    return r < edge


def _cross(x, y):
    return ((np.abs(x) < 0.3) & (np.abs(y) < 0.95)) | ((np.abs(y) < 0.3) & (np.abs(x) < 0.95))


def _ring(x, y):
    r2 = x * x + y * y
    return (r2 < 1.0) & (r2 > 0.5 ** 2)


def _heart(x, y):
    x, y = 1.25 * x, 1.25 * y + 0.2
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 < 0


def _crescent(x, y):
    return (x * x + y * y < 1.0) & ((x - 0.45) ** 2 + (y - 0.15) ** 2 > 0.8 ** 2)


def _hexagon(x, y):
    ax, ay = np.abs(x), np.abs(y)
    return (ay < 0.87) & (0.87 * ax + 0.5 * ay < 0.87)


def _diamond(x, y):
    return np.abs(x) / 0.7 + np.abs(y) < 1.0


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    'circle': _circle, 'square': _square, 'triangle': _triangle, 'star': _star, 'cross': _cross, 'ring': _ring,
    'heart': _heart, 'crescent': _crescent, 'hexagon': _hexagon, 'diamond': _diamond,
}
DEFAULT_CLASSES = ('circle', 'square', 'triangle', 'star', 'cross', 'ring', 'heart', 'crescent')

SYNONYMS = {
    'circle': ['circle', 'disc', 'round dot'], 'square': ['square', 'box', 'block'],
    'triangle': ['triangle', 'wedge'], 'star': ['star'], 'cross': ['cross', 'plus sign'],
    'ring': ['ring', 'hoop', 'donut'], 'heart': ['heart'], 'crescent': ['crescent', 'moon'],
    'hexagon': ['hexagon'], 'diamond': ['diamond', 'rhombus'],
}
_PLURAL = {'box': 'boxes', 'cross': 'crosses', 'plus sign': 'plus signs', 'rhombus': 'rhombi'}
_COUNT = {1: 'a', 2: 'two', 3: 'three', 4: 'four', 5: 'five'}
_COLOURS = [(0, 'red'), (30, 'orange'), (55, 'yellow'), (90, 'lime'), (125, 'green'), (170, 'teal'),
            (200, 'cyan'), (225, 'blue'), (265, 'purple'), (300, 'magenta'), (335, 'pink'), (360, 'red')]
_TEMPLATES = [
    '{objs}', 'a picture of {objs}', 'a photo of {objs}', 'there is {objs}', 'an image showing {objs}',
    'look at {objs}', 'a drawing with {objs}', 'a close-up of {objs}', 'some shapes: {objs}', 'I see {objs}',
    'here: {objs}', 'a snapshot of {objs}',
]
# Named background kinds: each has its own look and its own words, as real scenes have ("a dog on the grass"), so
# that the groups covering the background have something of their own to encode.
BACKGROUNDS = ('grass', 'sky', 'sand', 'water', 'brick', 'snow', 'noise')
_BACKGROUND_PHRASES = {
    'grass': ['on the grass', 'on a lawn', 'in a green field'], 'sky': ['in the sky', 'against a blue sky'],
    'sand': ['on the sand', 'on a beach'], 'water': ['in the water', 'floating on water'],
    'brick': ['on a brick wall', 'in front of bricks'], 'snow': ['in the snow', 'on snowy ground'],
    'noise': ['on a noisy background', 'on a messy pattern'],
}


@dataclass
class SceneConfig:
    size: int = 64
    classes: Sequence[str] = DEFAULT_CLASSES
    min_objects: int = 1
    max_objects: int = 3
    min_radius: float = 0.12  # of the image side
    max_radius: float = 0.28
    hue_jitter: float = 15.0  # degrees around the class hue; 180 = colour unrelated to class
    forbidden_pairs: Sequence[tuple[str, str]] = ()  # class pairs that never appear together
    required_pair: tuple[str, str] | None = None  # force both classes of this pair into every scene
    boundary_width: int = 1  # pixels of 255 'ignore' band around objects in VOC-style labels (0 = none)
    backgrounds: Sequence[str] = BACKGROUNDS  # background kinds drawn uniformly
    background_in_caption: float = 0.8  # probability that the caption names the background

    def __post_init__(self):
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            raise ValueError(f'synthetic scenes: unknown class(es) {unknown}; choose from {sorted(SHAPES)}')
        unknown = [b for b in self.backgrounds if b not in BACKGROUNDS]
        if unknown or not self.backgrounds:
            raise ValueError(f'synthetic scenes: unknown or no background kinds {unknown}; choose from {BACKGROUNDS}')
        if not 0 < self.min_radius <= self.max_radius <= 0.5:
            raise ValueError(f'synthetic scenes: need 0 < min_radius <= max_radius <= 0.5 (fractions of the image '
                             f'side), got {self.min_radius}, {self.max_radius}')
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f'synthetic scenes: need 1 <= min_objects <= max_objects, got '
                             f'{self.min_objects}, {self.max_objects}')


@dataclass
class SceneObject:
    cls: str
    hue: float
    cx: float
    cy: float
    radius: float


@dataclass
class Scene:
    image: np.ndarray  # [H, W, 3] uint8 RGB
    mask: np.ndarray  # [H, W] uint8 class index: 0 background, k = classes[k - 1]
    boundary: np.ndarray  # [H, W] bool: a band around each visible object's edge
    objects: list[SceneObject] = field(default_factory=list)
    background: str = 'noise'


def _class_hue(index: int, num: int) -> float:
    return (360.0 * index / num) % 360.0


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (h in degrees, s, v in [0, 1]) -> float RGB in [0, 1], stacked on the last axis."""
    h = np.mod(h, 360.0) / 60.0
    c = v * s
    x = c * (1 - np.abs(np.mod(h, 2) - 1))
    z = np.zeros_like(h)
    i = np.floor(h).astype(int) % 6
    r = np.choose(i, [c, x, z, z, x, c])
    g = np.choose(i, [x, c, c, x, z, z])
    b = np.choose(i, [z, z, x, c, c, x])
    m = v - c
    return np.stack([r + m, g + m, b + m], axis=-1)


def colour_name(hue: float) -> str:
    return min(_COLOURS, key=lambda hc: abs(hc[0] - (hue % 360)))[1]


def allowed_class_sets(classes: Sequence[str], forbidden: Sequence[tuple[str, str]]):
    """A predicate: may these classes appear together?"""
    bad = {frozenset(p) for p in forbidden}
    return lambda present: not any(frozenset((a, b)) in bad for a in present for b in present if a != b)


def _smooth_noise(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """Blocky noise upsampled by ``cell`` and blurred once: [H, W] in about [-1, 1]."""
    coarse = rng.normal(0, 1, size=(size // cell + 2, size // cell + 2))
    up = np.kron(coarse, np.ones((cell, cell)))[:size + cell, :size + cell]
    k = cell
    blur = (up[:-k, :-k] + up[k:, :-k] + up[:-k, k:] + up[k:, k:]) / 4
    return blur[:size, :size]


def _named_background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """float RGB [H, W, 3] in [0, 1] for a background kind."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    fine = rng.normal(0, 1, size=(size, size))
    if kind == 'noise':
        return _background(rng, size)
    if kind == 'grass':
        blades = np.repeat(rng.normal(0, 1, size=(size // 3 + 1, size)), 3, axis=0)[:size]
        h = 100 + 12 * _smooth_noise(rng, size, 8) + 6 * blades
        return _hsv_to_rgb(h, np.full_like(h, 0.6), np.clip(0.42 + 0.08 * blades + 0.04 * fine, 0, 1))
    if kind == 'sky':
        clouds = np.clip(_smooth_noise(rng, size, 8) - 0.3, 0, 1)
        sky = _hsv_to_rgb(np.full_like(yy, 210.0), 0.55 - 0.3 * yy, np.full_like(yy, 0.92))
        return np.clip(sky * (1 - clouds[..., None]) + clouds[..., None] * 0.97, 0, 1)
    if kind == 'sand':
        h = 40 + 4 * _smooth_noise(rng, size, 8)
        return _hsv_to_rgb(h, np.full_like(h, 0.35), np.clip(0.8 + 0.06 * fine, 0, 1))
    if kind == 'water':
        waves = np.sin(yy * size / rng.uniform(2.5, 4.0) + 2 * _smooth_noise(rng, size, 8))
        return _hsv_to_rgb(195 + 8 * waves, np.full_like(yy, 0.7), np.clip(0.55 + 0.12 * waves + 0.03 * fine, 0, 1))
    if kind == 'brick':
        row = (np.arange(size) // 6)
        offset = (row % 2) * 6
        mortar = ((np.arange(size)[:, None] % 6) == 0) | (((np.arange(size)[None, :] + offset[:, None]) % 12) == 0)
        brick = _hsv_to_rgb(np.full_like(yy, 12.0) + 5 * fine, np.full_like(yy, 0.65), np.full_like(yy, 0.55))
        return np.where(mortar[..., None], 0.75, brick)
    if kind == 'snow':
        v = np.clip(0.93 + 0.04 * _smooth_noise(rng, size, 8) + 0.02 * fine, 0, 1)
        return _hsv_to_rgb(np.full_like(v, 210.0), np.full_like(v, 0.06), v)
    raise ValueError(f'unknown background kind {kind!r}')


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation colour noise with a gradient and blotches: float RGB [H, W, 3]."""
    base = _hsv_to_rgb(np.array(rng.uniform(0, 360)), np.array(rng.uniform(0.0, 0.25)),
                       np.array(rng.uniform(0.3, 0.8)))
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(-0.25, 0.25)
    coarse = rng.normal(0, rng.uniform(0.02, 0.12), size=(size // 8 + 1, size // 8 + 1, 3))
    coarse = np.kron(coarse, np.ones((8, 8, 1)))[:size, :size]
    fine = rng.normal(0, rng.uniform(0.01, 0.08), size=(size, size, 3))
    return np.clip(base + grad + coarse + fine, 0, 1)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A multiplicative texture [H, W, 1]: flat, stripes, or speckle."""
    kind = rng.integers(3)
    if kind == 0:
        return np.ones((size, size, 1))
    if kind == 1:
        yy, xx = np.mgrid[0:size, 0:size]
        a, period = rng.uniform(0, np.pi), rng.uniform(3, 8)
        stripes = 0.5 + 0.5 * np.sin((np.cos(a) * xx + np.sin(a) * yy) * 2 * np.pi / period)
        return (0.8 + 0.25 * stripes)[..., None]
    return (1.0 + rng.normal(0, 0.12, size=(size, size, 1)))


def _pick_classes(rng: np.random.Generator, cfg: SceneConfig) -> list[str]:
    allowed = allowed_class_sets(cfg.classes, cfg.forbidden_pairs)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(100):
        picked = list(cfg.required_pair) if cfg.required_pair else []
        while len(picked) < max(n, len(picked)):
            picked.append(str(rng.choice(list(cfg.classes))))
        if allowed(set(picked)):
            rng.shuffle(picked)
            return picked
    raise ValueError('synthetic scenes: could not draw a class set that respects forbidden_pairs')


def render_scene(rng: np.random.Generator, cfg: SceneConfig) -> Scene:
    size = cfg.size
    background = str(rng.choice(list(cfg.backgrounds)))
    image = _named_background(rng, background, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    objects = []
    for name in _pick_classes(rng, cfg):
        k = list(cfg.classes).index(name)
        radius = rng.uniform(cfg.min_radius, cfg.max_radius)
        cx, cy = rng.uniform(radius * 0.6, 1 - radius * 0.6, size=2)
        x, y = _rot((xx - cx) / radius, (cy - yy) / radius, rng.uniform(0, 2 * np.pi))
        inside = SHAPES[name](x, y)
        if inside.sum() < 4:
            continue
        hue = (_class_hue(k, len(cfg.classes)) + rng.uniform(-cfg.hue_jitter, cfg.hue_jitter)) % 360
        colour = _hsv_to_rgb(np.array(hue), np.array(rng.uniform(0.55, 1.0)), np.array(rng.uniform(0.55, 1.0)))
        fill = np.clip(colour * _texture(rng, size), 0, 1)
        image[inside] = fill[inside]
        mask[inside] = k + 1
        objects.append(SceneObject(name, hue, float(cx), float(cy), float(radius)))
    # keep only objects still visible after occlusion
    visible = set(np.unique(mask).tolist()) - {0}
    objects = [o for o in objects if list(cfg.classes).index(o.cls) + 1 in visible]
    boundary = _boundary(mask, cfg.boundary_width)
    return Scene(image=(image * 255).round().astype(np.uint8), mask=mask, boundary=boundary, objects=objects,
                 background=background)


def _boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` of a label change (VOC marks object outlines as 255)."""
    if width <= 0:
        return np.zeros_like(mask, dtype=bool)
    edge = np.zeros_like(mask, dtype=bool)
    edge[:-1] |= mask[:-1] != mask[1:]
    edge[1:] |= mask[:-1] != mask[1:]
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:, 1:] |= mask[:, :-1] != mask[:, 1:]
    out = edge.copy()
    for _ in range(width - 1):
        grown = out.copy()
        grown[:-1] |= out[1:]
        grown[1:] |= out[:-1]
        grown[:, :-1] |= out[:, 1:]
        grown[:, 1:] |= out[:, :-1]
        out = grown
    return out


def _noun(word: str, count: int) -> str:
    if count == 1:
        return word
    return _PLURAL.get(word, word + 's')


def _describe_group(rng: np.random.Generator, cls: str, hues: list[float]) -> str:
    word = str(rng.choice(SYNONYMS[cls]))
    count = len(hues)
    colour = colour_name(hues[0]) if rng.random() < 0.6 else ''
    if count > 1 and len({colour_name(h) for h in hues}) > 1:
        colour = ''
    parts = [_COUNT.get(count, str(count))] if count > 1 or rng.random() < 0.8 else ['one']
    if colour:
        parts.append(colour)
    parts.append(_noun(word, count))
    if parts[0] == 'a' and parts[1][0] in 'aeiou':
        parts[0] = 'an'
    return ' '.join(parts)


def caption_for(rng: np.random.Generator, objects: Sequence[SceneObject], background: str | None = None,
                background_probability: float = 0.8) -> str:
    """A caption naming every visible object class, in random order, with counts and optional colours, and (with
    ``background_probability``) the background kind."""
    place = ''
    if background is not None and rng.random() < background_probability:
        place = ' ' + str(rng.choice(_BACKGROUND_PHRASES[background]))
    if not objects:
        return 'nothing but ' + {'noise': 'texture'}.get(background or 'noise', background or 'texture')
    groups: dict[str, list[float]] = {}
    for o in objects:
        groups.setdefault(o.cls, []).append(o.hue)
    names = list(groups)
    rng.shuffle(names)
    phrases = [_describe_group(rng, c, groups[c]) for c in names]
    if len(phrases) == 1:
        objs = phrases[0]
    elif len(phrases) == 2 and rng.random() < 0.4:
        objs = f'{phrases[0]} {rng.choice(["next to", "near", "and", "beside", "with"])} {phrases[1]}'
    else:
        objs = ', '.join(phrases[:-1]) + ' and ' + phrases[-1]
    return str(rng.choice(_TEMPLATES)).format(objs=objs + place)
