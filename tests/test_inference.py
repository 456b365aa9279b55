"""Zero-shot scoring: windows, the affinity rule, slide equals one crop when one window covers the image."""
from __future__ import annotations

import math
import os

import torch

import pgseg
from pgseg.eval.inference import crop_logits, group_class_affinity, window_slices
from tests.helpers import ROOT, tiny_model_config


def test_window_slices_match_mmseg():
    assert window_slices(448, 448, 224) == [(0, 448)]
    assert window_slices(600, 448, 224) == [(0, 448), (152, 600)]
    assert window_slices(900, 448, 224) == [(0, 448), (224, 672), (448, 896), (452, 900)]
    assert window_slices(300, 448, 224) == [(0, 300)]  # a side shorter than the crop


def test_affinity_is_restricted_to_top_classes():
    torch.manual_seed(0)
    groups, image = torch.randn(2, 4, 8), torch.randn(2, 8)
    classes = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)
    aff = group_class_affinity(groups, image, classes, torch.tensor(math.log(10.0)), topk=3)
    assert aff.shape == (2, 4, 7)
    assert ((aff > 0).sum(-1) <= 3).all()  # at most the image's top-3 classes score
    assert (aff <= 1).all() and (aff >= 0).all()


def test_slide_equals_single_crop_when_one_window_covers():
    model = pgseg.build_model(tiny_model_config()).eval()
    image = torch.randn(1, 3, 40, 56)
    classes = model.class_embeddings(['cat', 'dog', 'sky'])
    slide = pgseg.slide_logits(model, image, classes, bg_thresh=0.9, crop_size=64, stride=32)
    whole = crop_logits(model, image, classes, bg_thresh=0.9)
    assert slide.shape == (1, 4, 40, 56)
    torch.testing.assert_close(slide, whole)
    bg = slide[0, 0]
    assert set(bg.unique().tolist()) <= {0.0, 1.0}


def test_overlapping_windows_average():
    model = pgseg.build_model(tiny_model_config()).eval()
    image = torch.randn(1, 3, 32, 48)
    classes = model.class_embeddings(['cat', 'dog'])
    slide = pgseg.slide_logits(model, image, classes, crop_size=32, stride=16, crops_per_batch=1)
    left = crop_logits(model, image[..., 0:32], classes)
    right = crop_logits(model, image[..., 16:48], classes)
    torch.testing.assert_close(slide[..., :16], left[..., :16])  # covered by the first window only
    torch.testing.assert_close(slide[..., 16:32], (left[..., 16:32] + right[..., :16]) / 2)
    torch.testing.assert_close(slide[..., 32:], right[..., 16:])


def test_channel_argmax_equals_argmax_including_ties():
    from pgseg.eval.inference import channel_argmax
    x = torch.randn(2, 8, 9, 7)
    x[0, 2, 1, 1] = x[0, 6, 1, 1] = 50.0  # a tie: the first index wins, as torch.argmax
    x[1, :, 3, 3] = 0.0  # all equal
    assert torch.equal(channel_argmax(x), x.argmax(dim=1))
    assert channel_argmax(x)[0, 1, 1] == 2 and channel_argmax(x)[1, 3, 3] == 0


def test_parity_ties_recovers_the_winners_behind_a_pixel():
    """scripts/parity_ties.py infers which group won each window at a pixel from the pixel's averaged scores: from
    our own slide scores it recovers our winners, and from scores built with a runner-up it names that runner-up."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('parity_ties', os.path.join(ROOT, 'scripts', 'parity_ties.py'))
    ties = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ties)
    torch.manual_seed(0)
    model = pgseg.build_model(tiny_model_config()).eval()
    classes = model.class_embeddings(['cat', 'dog', 'sky'])
    # an image with a pixel covered by both windows (cols 0-32 and 16-48) whose right-window scores differ from those
    # 16 columns on, so that a wrong window offset shows
    for seed in range(50):
        image = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(seed))
        right = crop_logits(model, image[..., 16:48], classes, bg_thresh=0.9)[0]
        differs = ((right[:, :, :16] - right[:, :, 16:]).abs().amax(dim=0) > 1e-3).nonzero()  # [n, 2]
        if len(differs):
            break
    assert len(differs), 'no image among 50 seeds with distinct scores across the overlap'
    pixel = (int(differs[0, 0]), int(differs[0, 1]) + 16)
    slide = pgseg.slide_logits(model, image, classes, bg_thresh=0.9, crop_size=32, stride=16)
    models = {'float32': (model, torch.float32)}
    report = ties.explain_pixel(models, image, classes, 0.9, pixel, slide[0, :, pixel[0], pixel[1]], crop_size=32,
                                stride=16)
    leaders = [lead['float32'] for _, lead in report['windows']]
    assert [w for w, _ in report['windows']] == [((0, 32), (0, 32)), ((0, 32), (16, 48))]
    assert report['fixture_winners'] == [g1 for g1, _, _ in leaders] and report['fixture_fit'] < 1e-6
    assert all(gap >= 0 for _, _, gap in leaders)
    # a fixture whose first window chose its runner-up
    cands = [ties.window_candidates(model, image, classes, 0.9, w, pixel) for w, _ in report['windows']]
    for ((y0, y1), (x0, x1)), c in zip([w for w, _ in report['windows']], cands):  # the leader's scores: the crop's
        crop = crop_logits(model, image[..., y0:y1, x0:x1], classes, bg_thresh=0.9)[0, :, pixel[0] - y0, pixel[1] - x0]
        torch.testing.assert_close(c[0][2].float(), crop)
    flipped = (cands[0][1][2] + cands[1][0][2]) / 2
    report = ties.explain_pixel(models, image, classes, 0.9, pixel, flipped, crop_size=32, stride=16)
    assert report['fixture_winners'] == [leaders[0][1], leaders[1][0]]
