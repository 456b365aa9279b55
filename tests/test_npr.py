"""NPR: EM properties, matching direction, HRS selection."""
from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from pgseg.losses import hrs_mask
from pgseg.models.matching import hungarian_indices, match_async
from pgseg.models.npr import ImagePrototypes, ScalarTextPrototypes, em_prototypes, init_prototypes


def test_em_prototypes_are_unit_and_responsibilities_column_normalised():
    x = torch.randn(3, 50, 16)
    mu, z = em_prototypes(x, init_prototypes(5, 16, norm_dim=2), num_iters=10)
    assert mu.shape == (3, 5, 16) and z.shape == (3, 50, 5)
    torch.testing.assert_close(mu.norm(dim=-1), torch.ones(3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.sum(dim=1), torch.ones(3, 5), atol=1e-4, rtol=0)
    assert not mu.requires_grad


def test_em_recovers_separated_clusters():
    centers = F.normalize(torch.randn(4, 32), dim=-1) * 8
    x = (centers.repeat_interleave(30, 0) + 0.3 * torch.randn(120, 32)).unsqueeze(0)
    init = F.normalize(centers + 2.0 * torch.randn(4, 32), dim=-1).unsqueeze(0)  # a rough start near each cluster
    mu, _ = em_prototypes(x, init, num_iters=10)
    cos = F.normalize(centers, dim=-1) @ mu[0].t()
    assert (cos.diagonal() > 0.99).all()


def test_em_ignores_masked_tokens():
    x = torch.randn(2, 10, 8)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 6:] = False
    init = init_prototypes(3, 8, norm_dim=2)
    mu_masked, z = em_prototypes(x, init, 5, mask=mask)
    mu_cut, _ = em_prototypes(x[:, :6], init, 5)
    torch.testing.assert_close(mu_masked, mu_cut)
    assert z[:, 6:].abs().max() == 0


def test_image_prototypes_reconstruction_residual():
    npr = ImagePrototypes(dim=8, out_dim=8, num_prototypes=4, hidden_dim=16).eval()
    x = torch.randn(2, 12, 8, requires_grad=True)
    mu, recon = npr(x)
    assert mu.shape == (2, 4, 8) and recon.shape == (2, 12, 8)
    recon.sum().backward()
    assert x.grad is None  # the reconstruction is a constant of the input: only mapping_x learns from it
    assert npr.mapping_x.linear_out.weight.grad is not None


def test_scalar_text_prototypes_normalised_jointly():
    mu = ScalarTextPrototypes(8)(torch.randn(5, 64))
    assert mu.shape == (5, 8, 1)
    torch.testing.assert_close(mu.squeeze(-1).norm(dim=1), torch.ones(5), atol=1e-5, rtol=0)


def test_matching_minimises_or_maximises_exactly():
    """Against brute force over every permutation: the release minimises the total similarity, the fix maximises."""
    sim = np.random.default_rng(0).normal(size=(4, 5, 5)).astype(np.float32)
    perms = list(itertools.permutations(range(5)))
    for b in range(4):
        totals = [sim[b, range(5), list(p)].sum() for p in perms]
        assert tuple(hungarian_indices(sim[b:b + 1], maximize=False)[0]) == perms[int(np.argmin(totals))]
        assert tuple(hungarian_indices(sim[b:b + 1], maximize=True)[0]) == perms[int(np.argmax(totals))]


def test_async_matching_equals_exact_solver():
    sim = torch.randn(6, 9, 9)
    idx = match_async(sim, maximize=True).indices()
    assert idx.dtype == torch.long and idx.shape == (6, 9)
    assert np.array_equal(idx.numpy(), hungarian_indices(sim.numpy(), maximize=True))
    for b in range(6):  # a permutation whose total beats the identity
        assert sorted(idx[b].tolist()) == list(range(9))
        assert sim[b, torch.arange(9), idx[b]].sum() >= sim[b].diagonal().sum() - 1e-6


def test_hrs_column0_versus_diagonal():
    sim = torch.tensor([[[1.0, 0.0, 0.5],
                         [0.0, 1.0, 0.5],
                         [0.05, 0.2, 1.0]]])
    # column 0 normalised over rows: [1, 0, 0.05] -> only row 0 passes 0.1
    assert hrs_mask(sim, 0.1, 'column0').tolist() == [[True, False, False]]
    # diagonal: every pair is the best in its column
    assert hrs_mask(sim, 0.1, 'diagonal').tolist() == [[True, True, True]]
