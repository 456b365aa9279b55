"""The demo's curves: one panel per logged key, four to a row."""
from __future__ import annotations

import json

from PIL import Image

from pgseg.demo import plot_curves


def test_curves_draw_one_panel_per_logged_key(tmp_path):
    rows = [{'step': s, 'train/loss': 5.0 - s, 'train/itc': 2.0 / s} for s in range(1, 6)]
    rows += [{'step': s, 'train/loss': 1.0, 'train/itc': 0.5, 'train/grounding': 1.0 / s, 'train/balance': 0.1,
              'train/lr': 1e-3, 'train/npr': 0.3} for s in range(6, 9)]
    path = tmp_path / 'metrics.jsonl'
    path.write_text('\n'.join(json.dumps(r) for r in rows))
    plot_curves(str(path), str(tmp_path / 'curves.png'))
    img = Image.open(tmp_path / 'curves.png')
    assert img.size == (4 * 360, 2 * 220)  # loss, itc, npr, grounding | balance, lr: six panels in two rows
    # a line was drawn in the grounding panel (fourth of the first row), none in the empty slots of the second row
    blue = [(x, y) for x in range(3 * 360, 4 * 360) for y in range(220) if img.getpixel((x, y)) == (30, 90, 200)]
    white = (255, 255, 255)
    empty = [(x, y) for x in range(2 * 360, 4 * 360) for y in range(220, 440) if img.getpixel((x, y)) != white]
    assert blue and not empty
