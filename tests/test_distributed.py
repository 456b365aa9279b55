"""Two gloo processes: the gathered losses and their gradients equal one process on the concatenated batch."""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pgseg.losses import contrastive_loss, multi_label_contrastive_loss
from pgseg.models.npr import momentum_step
from pgseg.runtime.distributed import all_gather_with_grad, all_reduce_mean, all_reduce_sum, get_rank, get_world_size

WORLD, B, K, D = 2, 3, 2, 6


def _full_batch():
    g = torch.Generator().manual_seed(1234)
    return (torch.randn(WORLD * B, D, generator=g), torch.randn(WORLD * B, D, generator=g),
            torch.randn(WORLD * B, K, D, generator=g))


def _single_process_reference():
    img, txt, prompts = (t.clone().requires_grad_() for t in _full_batch())
    scale = torch.tensor(math.log(7.0))
    loss = contrastive_loss(img, txt, scale) + multi_label_contrastive_loss(img, prompts, scale)
    loss.backward()
    return float(loss.detach()), img.grad, txt.grad, prompts.grad


def _worker(rank: int, init_file: str, expected):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    try:
        assert get_rank() == rank and get_world_size() == WORLD
        rows = slice(rank * B, (rank + 1) * B)
        img, txt, prompts = (t[rows].clone().requires_grad_() for t in _full_batch())
        scale = torch.tensor(math.log(7.0))
        loss = contrastive_loss(img, txt, scale) + multi_label_contrastive_loss(img, prompts, scale)
        loss.backward()
        mean_loss = all_reduce_mean(loss.detach())
        ref_loss, g_img, g_txt, g_prompts = expected
        assert abs(float(mean_loss) - ref_loss) < 1e-5, (float(mean_loss), ref_loss)
        # DDP averages gradients over ranks: the local gradient / W must be the single-process gradient rows
        torch.testing.assert_close(img.grad / WORLD, g_img[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(txt.grad / WORLD, g_txt[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(prompts.grad / WORLD, g_prompts[rows], atol=1e-6, rtol=1e-5)
        # a confusion matrix: summed exactly, on the caller's device, the caller's tensor untouched
        conf = torch.full((3, 3), rank + 1, dtype=torch.int64)
        summed = all_reduce_sum(conf)
        assert summed.dtype == torch.int64 and summed.device == conf.device and summed.tolist() == [[3] * 3] * 3
        assert conf.tolist() == [[rank + 1] * 3] * 3
        gathered = all_gather_with_grad(torch.full((2,), float(rank)))
        assert gathered.tolist() == [0.0, 0.0, 1.0, 1.0]
        # prototype momentum follows the mean over the *global* batch: every rank ends with the same buffer
        buffer = torch.ones(1, 2, 3)
        momentum_step(buffer, torch.full((2, 2, 3), float(rank + 1)), momentum=0.5, norm_dim=None)
        torch.testing.assert_close(buffer, torch.full((1, 2, 3), 0.5 + 0.5 * 1.5))
    finally:
        dist.destroy_process_group()


def test_two_process_losses_equal_concatenated_batch(tmp_path):
    expected = _single_process_reference()
    init_file = os.path.join(tmp_path, 'init')
    mp.spawn(_worker, args=(init_file, expected), nprocs=WORLD, join=True)


def test_helpers_answer_for_one_process():
    assert get_rank() == 0 and get_world_size() == 1
    x = torch.randn(3, requires_grad=True)
    assert all_gather_with_grad(x) is x
    torch.testing.assert_close(all_reduce_mean(x.detach()), x.detach())
    counts = torch.tensor([4, 2, 1])
    assert all_reduce_sum(counts).tolist() == [4, 2, 1] and all_reduce_sum(counts) is not counts
