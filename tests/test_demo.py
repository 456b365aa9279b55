"""The demo's curves, drawn with matplotlib: one panel per logged key, four to a row, each with a "step" axis, the raw
values and their moving average, and a marker where the noun losses start."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from pgseg.config import load_config
from pgseg.demo import curves_figure_of_run, noun_losses_start, plot_curves, read_metrics
from pgseg.eval.visualize import ema

MARK = 'noun losses start (step 6)'


def _metrics(tmp_path):
    rows = [{'step': s, 'train/loss': 5.0 - s, 'train/itc': 2.0 / s} for s in range(1, 6)]
    rows += [{'step': s, 'train/loss': 1.0, 'train/itc': 0.5, 'train/grounding': 1.0 / s, 'train/balance': 0.1,
              'train/lr': 1e-3, 'train/npr': 0.3} for s in range(6, 9)]
    path = tmp_path / 'metrics.jsonl'
    path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
    return str(path)


def test_curves_draw_one_matplotlib_panel_per_logged_key(tmp_path):
    fig = curves_figure_of_run(_metrics(tmp_path), noun_start=6)
    assert isinstance(fig.canvas, FigureCanvasAgg)  # the Agg backend, no pyplot figure manager
    shown = [ax for ax in fig.axes if ax.get_visible()]
    # loss, itc, npr, grounding | balance, lr: six panels in two rows of four, the two empty slots hidden
    assert [ax.get_title() for ax in shown] == ['train/loss', 'train/itc', 'train/npr', 'train/grounding',
                                                'train/balance', 'train/lr']
    assert len(fig.axes) == 8
    for ax in shown:
        assert ax.get_xlabel() == 'step'
        assert len(ax.get_xticks()) > 2 and len(ax.get_yticks()) > 2
        assert ax.get_xlim() == (0, 8)  # one x range for all panels
        [mark] = [line for line in ax.lines if line.get_gid() == MARK]
        assert list(mark.get_xdata()) == [6, 6] and mark.get_linestyle() == '--'
    loss = shown[0]
    raw, smooth = [line for line in loss.lines if line.get_gid() != MARK]
    assert raw.get_label() == 'raw' and smooth.get_label().startswith('EMA, half-life')
    assert raw.get_linewidth() < smooth.get_linewidth() and raw.get_alpha() < 1
    assert list(raw.get_xdata()) == list(range(1, 9))
    assert [line.get_label() for line in shown[-1].lines if line.get_gid() != MARK] == ['train/lr']  # a schedule
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[0] == 'raw' and legend[1].startswith('EMA') and legend[2] == MARK


def test_plot_curves_returns_and_saves_an_image_of_the_configured_size(tmp_path):
    img = plot_curves(_metrics(tmp_path), str(tmp_path / 'curves.png'), noun_start=6)
    assert isinstance(img, Image.Image) and img.mode == 'RGB' and img.size == (4 * 360, 2 * 250)
    assert Image.open(tmp_path / 'curves.png').size == img.size
    small = plot_curves(_metrics(tmp_path), per_row=3, panel_px=(200, 150))
    assert small.size == (3 * 200, 2 * 150)
    # the marker is drawn: the dashed red line's colour is in the picture, and not without a start step
    red = np.all(np.abs(np.asarray(img, dtype=int) - (0xc0, 0x39, 0x2b)) < 8, axis=-1)
    assert red.sum() > 100
    plain = np.asarray(plot_curves(_metrics(tmp_path)), dtype=int)
    assert np.all(np.abs(plain - (0xc0, 0x39, 0x2b)) < 8, axis=-1).sum() == 0


def test_a_run_without_metrics_is_one_empty_panel(tmp_path):
    assert read_metrics(str(tmp_path / 'none.jsonl')) == {'train/loss': ([], [])}
    fig = curves_figure_of_run(str(tmp_path / 'none.jsonl'))
    assert [ax.get_title() for ax in fig.axes] == ['train/loss']
    assert 'not logged' in [t.get_text() for t in fig.axes[0].texts]


def test_the_noun_losses_start_step_comes_from_the_model_config():
    cfg = load_config('demo_cpu').model
    assert noun_losses_start(cfg) == 200
    cfg.noun_losses_start_step = 0
    assert noun_losses_start(cfg) is None  # from the first step: nothing to mark
    cfg.noun_losses_start_step, cfg.grounding_weight, cfg.group_word_weight = 300, 0.0, 0.0
    assert noun_losses_start(cfg) is None  # the noun losses are off


def test_ema_weighs_by_steps():
    assert np.allclose(ema([0, 10, 20], [2.0, 2.0, 2.0], half_life=5), 2.0)  # no pull towards 0 at the start
    # a value one half-life back weighs half: (0 * 0.5 + 1) / (0.5 + 1)
    assert ema([0, 7], [0.0, 1.0], half_life=7)[-1] == pytest.approx(2 / 3)
    out = ema([0, 1, 2], [1.0, math.nan, 1.0], half_life=1)
    assert np.allclose(out, 1.0)  # a non-finite value is passed over
