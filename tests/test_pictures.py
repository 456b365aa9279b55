"""Evaluation grids: a row of column titles above the tiles and a legend of the class colours (swatch and name) of
the classes the shown images hold, in pgseg-eval --visualize and the demo's grid.png."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import pgseg
from pgseg.data.synthetic.scenes import SceneConfig
from pgseg.data.synthetic.writers import write_segmentation_set
from pgseg.eval.classes import VOC
from pgseg.eval.datasets import build_dataset
from pgseg.eval.protocols import get_protocol
from pgseg.eval.segmentation import VISUAL_COLUMNS, evaluate_segmentation
from pgseg.eval.visualize import legend_entries, titled_grid, voc_palette
from tests.helpers import tiny_model_config


def test_legend_entries_name_the_present_classes_in_their_colours():
    pred = np.array([[2, 2], [5, 0]])
    label = np.array([[0, 255], [2, 2]])
    entries = legend_entries([pred, label], VOC)
    palette = np.asarray(voc_palette()).reshape(256, 3)
    assert [(k, name) for k, name, _ in entries] == [(0, 'background'), (2, 'bicycle'), (5, 'bottle'),
                                                     (255, 'ignored')]
    assert [c for _, _, c in entries] == [tuple(palette[0]), tuple(palette[2]), tuple(palette[5]), (255, 255, 255)]
    assert legend_entries([np.array([[1]])], VOC)[0][1] == 'aeroplane'  # the prompt's trailing space dropped
    assert legend_entries([np.array([[7]])], ['a', 'b'])[0][1] == 'class 7'


def _dark(region: Image.Image) -> int:
    return int((np.asarray(region.convert('L')) < 128).sum())


def test_titled_grid_has_a_title_row_aligned_columns_and_a_legend():
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    rows = [[Image.new('RGB', (120, 30), c) for c in colours], [Image.new('RGB', (100, 30), c) for c in colours]]
    legend = [(0, 'background', (0, 0, 0)), (1, 'circle', (128, 0, 0)), (255, 'ignored', (255, 255, 255))]
    grid = titled_grid(rows, VISUAL_COLUMNS, legend, font_size=14, gap=2)
    line = 14 + 2 * 4  # the title row
    assert grid.width == 4 * 120 + 3 * 2
    assert grid.height > line + 2 * 30 + 2 + line  # title row, two rows, a legend below
    for c in range(4):
        left = c * 122
        assert _dark(grid.crop((left, 0, left + 120, line))) > 10, VISUAL_COLUMNS[c]  # a title over each column
        assert grid.getpixel((left + 60, line + 15)) == colours[c]  # the first row right below the titles
        assert grid.getpixel((left + 60, line + 30 + 2 + 15)) == colours[c]  # a narrower tile centred in its cell
        assert grid.getpixel((left + 5, line + 30 + 2 + 15)) == (255, 255, 255)
    below = np.asarray(grid.crop((0, line + 62, grid.width, grid.height)))
    assert (np.all(below == (128, 0, 0), axis=-1)).sum() > 50  # the circle's swatch
    assert _dark(Image.fromarray(below)) > 200  # the black swatch and the names
    # tiles narrower than their titles: the columns widen to the titles, which never overlap
    narrow = titled_grid([[Image.new('RGB', (10, 10))] * 4], VISUAL_COLUMNS)
    assert narrow.width > 4 * 10 + 3 * 2 + 150


@pytest.fixture(scope='module')
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('pictures')
    write_segmentation_set(str(root), 'voc', 3, seed=3, scene=SceneConfig(size=32), progress=False)
    return str(root)


def test_evaluation_grid_is_titled_with_a_legend_of_the_shown_classes(voc_root):
    model = pgseg.build_model(tiny_model_config()).eval()
    ds = build_dataset('voc', voc_root)
    m = evaluate_segmentation(model, ds, get_protocol('pgseg', short_side=32, crop_size=32, stride=16),
                              bg_thresh=0.5, num_visuals=2, progress=False)
    grid = m['visual_grid']
    line, tile = 22, 192
    assert grid.width == 4 * tile + 3 * 2
    assert grid.height > line + 2 * tile + 2 + line  # titles, two images, the legend
    assert np.all(np.asarray(grid.crop((0, 0, grid.width, 3))) == 255)  # the title row is white, with text
    assert _dark(grid.crop((0, 0, grid.width, line))) > 40
    # the legend holds the ground truth's classes: their swatches are in the strip below the images
    labels = [ds[i][1] for i in range(2)]
    palette = np.asarray(voc_palette()).reshape(256, 3)
    below = np.asarray(grid.crop((0, line + 2 * tile + 2, grid.width, grid.height)))
    for k in {int(v) for lab in labels for v in np.unique(lab)} - {0, 255}:
        assert np.all(below == palette[k], axis=-1).sum() > 50, ds.classes[k]
