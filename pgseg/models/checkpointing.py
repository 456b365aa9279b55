"""Activation checkpointing that recomputes with the attention kernels of the forward pass.

``GroupSegModel`` picks scaled-dot-product-attention kernels with a context manager around its forward pass
(``model.attention``). The backward pass recomputes checkpointed blocks outside that context; a different kernel
would save differently shaped tensors and ``torch.utils.checkpoint`` refuses the mismatch. Here the recomputation
re-enters the backends that were active during the forward.
"""
from __future__ import annotations

import contextlib

from torch.nn.attention import _cur_sdpa_kernel_backends, sdpa_kernel
from torch.utils.checkpoint import checkpoint

__all__ = ['checkpoint_same_kernels']


def checkpoint_same_kernels(fn, *args, **kwargs):
    backends = _cur_sdpa_kernel_backends()
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), sdpa_kernel(backends)), **kwargs)
