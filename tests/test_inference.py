"""Zero-shot scoring: windows, the affinity rule, slide equals one crop when one window covers the image."""
from __future__ import annotations

import math

import torch

import pgseg
from pgseg.eval.inference import crop_logits, group_class_affinity, window_slices
from tests.conftest import tiny_model_config


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
