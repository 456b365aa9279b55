"""Activation checkpointing that recomputes with the attention kernels of the forward pass.

``GroupSegModel`` picks attention kernels with a context manager around its forward pass (``model.attention``):
pgseg's own kernel choice (``models.attention``) and the SDPA backends. The backward pass recomputes checkpointed
blocks outside that context; a different kernel would save differently shaped tensors and ``torch.utils.checkpoint``
refuses the mismatch. Here the recomputation re-enters the kernels that were active during the forward.
"""
from __future__ import annotations

import contextlib

from torch.nn.attention import _cur_sdpa_kernel_backends, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .attention import attention_kernel, current_attention_kernel

__all__ = ['checkpoint_same_kernels']


def checkpoint_same_kernels(fn, *args, **kwargs):
    backends, kernel = _cur_sdpa_kernel_backends(), current_attention_kernel()

    @contextlib.contextmanager
    def recompute_context():
        with sdpa_kernel(backends), attention_kernel(kernel):
            yield

    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), recompute_context()), **kwargs)
