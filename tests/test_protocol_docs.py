"""docs/protocols.md's tables say what the code does: each protocol's row, and the SCLIP settings per dataset."""
from __future__ import annotations

import os

from pgseg.eval.protocols import PROTOCOLS
from pgseg.eval.templates import get_templates
from pgseg.eval.training_free import CLIP_PROTOCOLS

DOC = os.path.join(os.path.dirname(__file__), '..', 'docs', 'protocols.md')
PAMR = {'off': 'off', 'window': 'in each window', 'image': 'on the full-size scores'}


def _table(header: str) -> list[list[str]]:
    """The rows (cells stripped) of the table whose header line starts with ``header``."""
    lines = open(DOC).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:  # past the header and the rule
        if not line.startswith('|'):
            break
        rows.append([cell.strip() for cell in line.strip('|').split('|')])
    return rows


def test_the_protocol_table_matches_the_code():
    rows = {r[0].strip('`'): r for r in _table('| protocol | reproduces |')}
    assert set(rows) == set(PROTOCOLS) | set(CLIP_PROTOCOLS)
    for name, p in PROTOCOLS.items():
        background = (f'constant {p.bg_score}' if p.bg_score is not None else
                      'adaptive: ' + ', '.join(f'{k} {v}' for k, v in p.bg_thresh.items()))
        expected = [f'`{name}`', p.reproduces, background, f'`{p.templates}` ({len(get_templates(p.templates))})',
                    f'`{p.class_names}`', f'{p.short_side} / {p.long_side}, {p.crop_size}/{p.stride}', PAMR[p.pamr]]
        assert rows[name] == expected, name
    for name, p in CLIP_PROTOCOLS.items():
        expected = [f'`{name}`', p.reproduces, 'probability threshold per dataset',
                    f'`{p.templates}` ({len(get_templates(p.templates))})', f'`{p.class_names}`',
                    f'per dataset / {p.long_side}, {p.crop_size}/{p.stride}', 'off']
        assert rows[name] == expected, name


def test_the_sclip_settings_table_matches_the_code():
    rows = _table('| dataset | short side | logit scale |')
    p = CLIP_PROTOCOLS['sclip']

    def cell(v):
        return '-' if v is None or v == 0.0 else f'{v:g}'
    assert [r[0] for r in rows] == ['voc', 'voc20', 'context', 'context59', 'coco_object', 'coco_stuff', 'cityscapes',
                                    'ade20k']
    for r in rows:
        s = p.settings_for(r[0])
        assert r == [r[0], str(s['short_side']), cell(s['logit_scale']), cell(s['prob_thd']), cell(s['area_thd'])]
