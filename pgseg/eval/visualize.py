"""Pictures: label maps in the VOC palette, group-assignment maps over images (training dashboards, evaluation
grids with column titles and a class legend), training curves (matplotlib, Agg backend, no pyplot state)."""
from __future__ import annotations

import colorsys
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ['denormalize', 'voc_palette', 'label_image', 'group_palette', 'group_map_grid', 'legend_entries',
           'titled_grid', 'ema', 'curves_figure', 'figure_image']


def denormalize(images: torch.Tensor) -> np.ndarray:
    """Normalised [B, 3, H, W] -> uint8 [B, H, W, 3]. (ImageNet statistics on [0, 1] and mmseg's on [0, 255] give the
    same normalised values.)"""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    x = (images.float() * std + mean).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def voc_palette() -> list[int]:
    """The standard Pascal VOC colour map (bit-interleaved), flattened to 768 values."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def label_image(label: np.ndarray, num_classes: int) -> Image.Image:
    """Class indices [H, W] -> RGB with the VOC palette; 255 (ignore) in white."""
    palette = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3).copy()
    palette[255] = 255
    return Image.fromarray(palette[np.asarray(label).astype(np.uint8)])


def group_palette(n: int, seed: int = 3) -> np.ndarray:
    """n distinct colours [n, 3] uint8 (golden-ratio hues; stable for a given n)."""
    rng = np.random.default_rng(seed)
    colours = [colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.55 + 0.45 * rng.random(), 0.7 + 0.3 * rng.random())
               for k in range(n)]
    return (np.asarray(colours) * 255).round().astype(np.uint8)


def group_map_grid(images: torch.Tensor, group_maps: Sequence[torch.Tensor], grid: tuple[int, int],
                   alpha: float = 0.55, max_images: int = 8) -> Image.Image:
    """Rows: input, then one overlay per grouping stage (each patch coloured by the group that wins it)."""
    images = images[:max_images]
    pics = denormalize(images)
    B, H, W = pics.shape[:3]
    rows = [np.concatenate(list(pics), axis=1)]
    for maps in group_maps:
        maps = maps[:B].float()
        G = maps.shape[-1]
        winner = maps.transpose(1, 2).reshape(B, G, *grid)
        winner = F.interpolate(winner, size=(H, W), mode='bilinear', align_corners=False).argmax(1).cpu().numpy()
        colours = group_palette(G)[winner]  # [B, H, W, 3]
        overlay = (alpha * colours + (1 - alpha) * pics).astype(np.uint8)
        rows.append(np.concatenate(list(overlay), axis=1))
    return Image.fromarray(np.concatenate(rows, axis=0))


# ------------------------------------------------------------------------------------------ titled grids
IGNORE_INDEX = 255


def _font(size: int):
    """Pillow's scalable default font (Pillow >= 10.1 with FreeType), else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def legend_entries(label_maps: Iterable[np.ndarray], class_names: Sequence[str]) -> list[tuple[int, str, tuple]]:
    """The classes present in any of ``label_maps`` as (index, name, RGB colour of :func:`label_image`), by index;
    255 (ignore, drawn white) is the entry "ignored". An index beyond ``class_names`` is named by its number."""
    present = set()
    for m in label_maps:
        present.update(int(v) for v in np.unique(np.asarray(m)))
    palette = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)
    entries = []
    for k in sorted(present):
        if k == IGNORE_INDEX:
            entries.append((k, 'ignored', (255, 255, 255)))
        else:
            name = class_names[k].strip() if 0 <= k < len(class_names) else f'class {k}'
            entries.append((k, name, tuple(int(c) for c in palette[k])))
    return entries


def titled_grid(rows: Sequence[Sequence[Image.Image]], titles: Sequence[str],
                legend: Sequence[tuple[int, str, tuple]] = (), font_size: int = 14, gap: int = 2) -> Image.Image:
    """Tiles in a grid under a row of column titles, with a legend of class colours (swatch and name, wrapped to
    the grid's width) below; ``gap`` white pixels between cells. Columns are as wide as their widest tile (or
    title); a narrower tile is centred in its cell."""
    ncols = max(len(titles), max((len(r) for r in rows), default=0))
    font, pad = _font(font_size), max(3, font_size // 3)
    line = font_size + 2 * pad  # the height of a line of text: the title row, each legend row
    measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    title_w = [int(math.ceil(measure.textlength(t, font=font))) + 2 * pad for t in titles]
    widths = [max([r[c].width for r in rows if c < len(r)] + title_w[c:c + 1] + [1]) for c in range(ncols)]
    heights = [max([t.height for t in r] + [1]) for r in rows]
    lefts = [sum(widths[:c]) + c * gap for c in range(ncols)]
    tops = [line + sum(heights[:r]) + r * gap for r in range(len(rows))]
    width = lefts[-1] + widths[-1] if ncols else 1
    # the legend's layout: entries left to right, wrapped to the grid's width
    placed, x, y = [], pad, 0
    for _, name, colour in legend:
        w = font_size + pad + int(math.ceil(measure.textlength(name, font=font))) + 3 * pad
        if x + w > width and x > pad:
            x, y = pad, y + line
        placed.append((x, y, name, colour))
        x += w
    body = (tops[-1] + heights[-1]) if rows else line
    grid = Image.new('RGB', (width, body + ((y + line + pad) if legend else 0)), 'white')
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(titles):
        draw.text((lefts[c] + (widths[c] - measure.textlength(title, font=font)) / 2, pad), title, fill='black',
                  font=font)
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            grid.paste(tile.convert('RGB'), (lefts[c] + (widths[c] - tile.width) // 2,
                                             tops[r] + (heights[r] - tile.height) // 2))
    for x, y, name, colour in placed:
        top = body + pad + y
        draw.rectangle((x, top, x + font_size, top + font_size), fill=colour, outline=(96, 96, 96))
        draw.text((x + font_size + pad, top), name, fill='black', font=font)
    return grid


# ------------------------------------------------------------------------------------------ training curves
def ema(steps: Sequence[float], values: Sequence[float], half_life: float) -> np.ndarray:
    """Exponential moving average over training steps: at each point, the mean of the values so far, a value ``d``
    steps back weighing ``0.5 ** (d / half_life)`` (so it follows time, not the logging interval, and is not pulled
    towards 0 at the start). Non-finite values are passed over."""
    out = np.empty(len(values))
    total = weight = 0.0
    prev = None
    for i, (s, v) in enumerate(zip(steps, values)):
        if prev is not None:
            decay = 0.5 ** ((s - prev) / max(half_life, 1e-9))
            total, weight = total * decay, weight * decay
        prev = s
        if math.isfinite(v):
            total, weight = total + v, weight + 1.0
        out[i] = total / weight if weight else math.nan
    return out


def curves_figure(series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                  marks: Mapping[str, float] | None = None, per_row: int = 4,
                  panel_px: tuple[int, int] = (360, 250), dpi: int = 100, half_life: float | None = None,
                  unsmoothed: Iterable[str] = ('train/lr',)):
    """One panel per series ``name -> (steps, values)``, ``per_row`` panels a row, each ``panel_px`` pixels at
    ``dpi``: the raw values as a thin light line, their :func:`ema` as a bold one (``half_life`` in steps; default
    1/30 of the steps covered; none for the ``unsmoothed`` series, schedules rather than noisy measurements), a
    dashed vertical line at each of ``marks`` (label -> step), "step" on every x axis, one x range for all.
    A :class:`matplotlib.figure.Figure` drawn by the Agg backend (no pyplot state); :func:`figure_image` renders it.
    A series without points is a panel that says so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    names, marks = list(series), dict(marks or {})
    if not names:
        raise ValueError('no series to draw')
    nrows, ncols = -(-len(names) // per_row), min(per_row, len(names))
    fig = Figure(figsize=(ncols * panel_px[0] / dpi, nrows * panel_px[1] / dpi), dpi=dpi, layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    all_steps = [s for steps, _ in series.values() for s in steps] + list(marks.values())
    lo, hi = (min(0, min(all_steps)), max(all_steps)) if all_steps else (0, 1)
    if half_life is None:
        half_life = max(1.0, (hi - lo) / 30)
    hl = f'{half_life:.0f}' if half_life >= 10 else f'{half_life:.2g}'
    colours = {'raw': '#1f5fbf', 'mark': '#c0392b'}
    skip = set(unsmoothed)
    for ax, name in zip(axes, names):
        steps, values = (np.asarray(a, dtype=float) for a in series[name])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel('step', fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3, linewidth=0.5)
        ax.set_xlim(lo, hi if hi > lo else lo + 1)
        if len(steps):
            if name in skip:
                ax.plot(steps, values, color=colours['raw'], linewidth=1.4, label=name)
            else:
                ax.plot(steps, values, color=colours['raw'], linewidth=0.7, alpha=0.35, label='raw')
                ax.plot(steps, ema(steps, values, half_life), color=colours['raw'], linewidth=1.6,
                        label=f'EMA, half-life {hl} steps')
        else:
            ax.text(0.5, 0.5, 'not logged', transform=ax.transAxes, ha='center', va='center', color='grey')
        for label, step in marks.items():
            line = ax.axvline(step, color=colours['mark'], linestyle='--', linewidth=1.0, label=label)
            line.set_gid(label)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colours['raw'], linewidth=0.7, alpha=0.35, label='raw'),
               Line2D([], [], color=colours['raw'], linewidth=1.6, label=f'EMA, half-life {hl} steps')]
    handles += [Line2D([], [], color=colours['mark'], linestyle='--', linewidth=1.0, label=label) for label in marks]
    fig.legend(handles=handles, loc='outside upper center', ncols=len(handles), fontsize=8, frameon=False)
    return fig


def figure_image(fig) -> Image.Image:
    """A matplotlib figure rendered by the Agg backend as an RGB PIL image of the figure's size in pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())
