"""The BatchNorm MLP projection head (``ProjectMLP`` in the official code, docs/fidelity.md#projection-heads)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['ProjectionMLP', 'frozen_bn_statistics']


class ProjectionMLP(nn.Module):
    """Linear -> BatchNorm -> ReLU (num_layers-1 times) -> Linear, applied to every token.

    The weights are kept in the official Conv1d layout ``[out, in, 1]`` (keys ``linear_hidden.{0,1}``,
    ``linear_out``) so official checkpoints load name for name; the forward uses plain matmuls.
    BatchNorm normalises over all B*L positions, as the official Conv1d over ``[B, C, L]`` does.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 4096, num_layers: int = 2):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f'ProjectionMLP: num_layers must be >= 1, got {num_layers}')
        layers: list[nn.Module] = []
        for i in range(num_layers - 1):
            layers += [nn.Conv1d(in_dim if i == 0 else hidden_dim, hidden_dim, kernel_size=1),
                       nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        self.linear_hidden = nn.Sequential(*layers)
        self.linear_out = nn.Conv1d(in_dim if num_layers == 1 else hidden_dim, out_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C] or [B, L, C] -> [B, D] or [B, L, D]."""
        lead = x.shape[:-1]
        h = x.reshape(-1, x.shape[-1])  # [B*L, C]
        for layer in self.linear_hidden:
            if isinstance(layer, nn.Conv1d):
                h = F.linear(h, layer.weight.squeeze(-1), layer.bias)
            else:  # BatchNorm1d / SyncBatchNorm take [N, C]; ReLU
                h = layer(h)
        h = F.linear(h, self.linear_out.weight.squeeze(-1), self.linear_out.bias)
        return h.reshape(*lead, h.shape[-1])


@contextmanager
def frozen_bn_statistics(module: nn.Module):
    """Inside the block, training-mode BatchNorm uses batch statistics but leaves its running statistics as they are.

    Used when a projection head embeds something other than what it embeds at inference (PGSeg's paper-variant
    prototypes), so that those batches do not shift the running statistics that inference uses.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
