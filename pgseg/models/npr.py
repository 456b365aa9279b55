"""PGSeg's non-learnable prototypes (NPR): EM estimates from source features (docs/fidelity.md#image-prototypes,
docs/fidelity.md#text-prototypes-in-the-release).

The EM is a normalised soft k-means with dot-product affinities (no covariances, no priors):

    E-step  a[l, g] = softmax_g(x_l . mu_g)
            z[l, g] = a[l, g] / (1e-6 + sum_l' a[l', g])        (each prototype's column sums to ~1)
    M-step  mu_g    = sum_l z[l, g] x_l, then L2-normalised (per prototype, or jointly for the scalar text NPR)

It runs under ``no_grad`` in float32 (also under autocast). Prototype buffers start each batch's EM; with
``momentum_update`` they follow the batch means (the paper; the released code never updates the image ones).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..runtime.distributed import all_reduce_mean
from .projection import ProjectionMLP

__all__ = ['em_prototypes', 'ImagePrototypes', 'ScalarTextPrototypes', 'TokenPrototypes', 'init_prototypes',
           'momentum_step']

_EPS = 1e-6


def init_prototypes(num: int, dim: int, norm_dim: int) -> torch.Tensor:
    """Random unit prototypes [1, num, dim] drawn as the official code does: N(0, sqrt(2/k)), then L2-normalised."""
    k = dim if norm_dim == 2 else num
    mu = torch.randn(1, num, dim) * math.sqrt(2.0 / k)
    return mu / (_EPS + mu.norm(dim=norm_dim, keepdim=True))


@torch.no_grad()
def em_prototypes(x: torch.Tensor, mu_init: torch.Tensor, num_iters: int, norm_dim: int = 2,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``num_iters`` EM steps.

    Args:
        x: [B, L, C] source features.
        mu_init: [1 or B, G, C] starting prototypes.
        norm_dim: 2 normalises each prototype over channels; 1 normalises over the prototype axis.
        mask: optional [B, L] bool, True for tokens that take part (padding masked out).

    Returns:
        mu [B, G, C] after the last M-step, z [B, L, G] the column-normalised responsibilities of the last E-step.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        mu = mu_init.float().expand(x.shape[0], -1, -1)
        z = x.new_zeros(x.shape[0], x.shape[1], mu.shape[1])
        for _ in range(num_iters):
            a = torch.softmax(x @ mu.transpose(1, 2), dim=-1)  # [B, L, G]
            if mask is not None:
                a = a * mask.unsqueeze(-1).to(a.dtype)
            z = a / (_EPS + a.sum(dim=1, keepdim=True))
            mu = z.transpose(1, 2) @ x  # [B, G, C]
            mu = mu / (_EPS + mu.norm(dim=norm_dim, keepdim=True))
    return mu, z


@torch.no_grad()
def momentum_step(buffer: torch.Tensor, batch_prototypes: torch.Tensor, momentum: float,
                  norm_dim: int | None) -> None:
    """buffer <- m buffer + (1 - m) mean over the global batch (all ranks); re-normalised over ``norm_dim`` if given."""
    mean = all_reduce_mean(batch_prototypes.float().mean(dim=0, keepdim=True))
    mu = momentum * buffer + (1 - momentum) * mean
    if norm_dim is not None:
        mu = mu / (_EPS + mu.norm(dim=norm_dim, keepdim=True))
    buffer.copy_(mu)


class ImagePrototypes(nn.Module):
    """Image NPR of one grouping stage: EM prototypes of the stage's input tokens, and the reconstruction residual.

    The reconstruction ``mapping_x(z @ mu)`` is added to the image tokens before the grouping block, in training and
    at inference alike: it is part of the official inference network (docs/fidelity.md#npr-in-the-inference-network).
    Keys: ``mu``, ``mapping_x.*``.
    """

    def __init__(self, dim: int, out_dim: int, num_prototypes: int, num_iters: int = 10, momentum: float = 0.9,
                 hidden_dim: int = 4096):
        super().__init__()
        self.num_iters, self.momentum = num_iters, momentum
        self.register_buffer('mu', init_prototypes(num_prototypes, out_dim, norm_dim=2))
        self.mapping_x = ProjectionMLP(dim, out_dim, hidden_dim=hidden_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, L, C] -> (prototypes [B, G, C] without gradient, reconstruction residual [B, L, C])."""
        mu, z = em_prototypes(x, self.mu, self.num_iters, norm_dim=2)
        with torch.autocast(device_type=x.device.type, enabled=False):
            recon = (z @ mu).to(x.dtype)  # [B, L, C], constant w.r.t. the network
        return mu, self.mapping_x(recon)

    def momentum_update(self, batch_prototypes: torch.Tensor) -> None:
        """Paper variant: follow the global batch mean, re-normalised per prototype."""
        momentum_step(self.mu, batch_prototypes, self.momentum, norm_dim=2)


class ScalarTextPrototypes(nn.Module):
    """The released code's text NPR (key ``text_encoder.Atten.mu`` [1, K, 1]): the EOT feature's C channels are
    clustered as C scalar points into K scalar prototypes normalised jointly. Reference variant only
    (docs/fidelity.md#text-prototypes-in-the-release)."""

    def __init__(self, num_prototypes: int = 8, num_iters: int = 10, momentum: float = 0.9):
        super().__init__()
        self.num_iters, self.momentum = num_iters, momentum
        self.register_buffer('mu', init_prototypes(num_prototypes, 1, norm_dim=1))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled: [B, C] EOT features -> scalar prototypes [B, K, 1] (no gradient)."""
        mu, _ = em_prototypes(pooled.detach().unsqueeze(-1), self.mu, self.num_iters, norm_dim=1)
        return mu

    def momentum_update(self, batch_prototypes: torch.Tensor) -> None:
        """As released: no re-normalisation after the update. Called in training only (the release also did it in
        eval, which made text encoding mutate the model)."""
        momentum_step(self.mu, batch_prototypes, self.momentum, norm_dim=None)


class TokenPrototypes(nn.Module):
    """Paper-variant text NPR: K prototypes per caption from its valid token features (padding and SOT excluded).

    The responsibilities come from EM without gradient; the returned prototypes are the responsibility-weighted
    means of the token features *with* gradient, so the text tower learns from the prototype loss.
    """

    def __init__(self, width: int, num_prototypes: int = 8, num_iters: int = 10, momentum: float = 0.9):
        super().__init__()
        self.num_iters, self.momentum = num_iters, momentum
        self.register_buffer('mu', init_prototypes(num_prototypes, width, norm_dim=2))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: [B, L, C] features after ln_final, mask: [B, L] valid tokens -> (prototypes [B, K, C] with
        gradient, EM prototypes [B, K, C] without gradient for the momentum update)."""
        mu, z = em_prototypes(tokens.detach(), self.mu, self.num_iters, norm_dim=2, mask=mask)
        protos = z.to(tokens.dtype).transpose(1, 2) @ tokens  # [B, K, C]
        return protos, mu

    def momentum_update(self, batch_prototypes: torch.Tensor) -> None:
        momentum_step(self.mu, batch_prototypes, self.momentum, norm_dim=2)
