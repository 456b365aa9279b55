"""Scaled dot-product attention for the image tower and the grouping blocks, with the kernel chosen per forward pass.

``GroupSegModel.attention_kernels`` (``model.attention``) picks the kernel with :func:`attention_kernel`:

- ``'fused'``: ``F.scaled_dot_product_attention``; PyTorch picks flash / memory-efficient / cuDNN where they apply.
- ``'math'`` (``model.attention: math``): two batched matmuls and a softmax with autograd's own backward: the
  logits and the softmax in float32, the product with v in v's dtype (bf16 under a bf16 autocast). On the CPU under
  bf16 training it is faster than the flash kernel, whose backward is slow, and than SDPA's math backend, which
  computes everything in float32 there (docs/performance.md#attention-on-the-cpu); ``model.attention: math`` also
  selects SDPA's math backend for the text tower.
- ``'shifted'`` (``model.attention: shifted``): the same products in v's dtype throughout (bf16 under a bf16
  autocast), each row's logits computed around an estimate of its maximum: a first product without gradient gives
  the row maxima, and the second (``baddbmm``) adds minus that maximum inside its float32 accumulation, before the
  result is rounded. The logits near the maximum, the ones the softmax weighs, are then small and keep bf16's
  relative precision as absolute precision; plain bf16 logits lose about 0.1 of a logit of 30.
  Against float64 it is as close as the CPU flash kernel; on the CPU it runs one bf16 attention about 3x faster
  than ``'math'``, whose float32 softmax and casts move four times the bytes, and the whole training step 1.1-1.2x
  faster (docs/performance.md#attention-on-the-cpu).

:class:`Attention` is timm's ViT attention (same parameters, same keys) calling :func:`scaled_dot_product_attention`,
so timm's ``Block`` builds it through ``attn_layer``.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention

__all__ = ['Attention', 'AttentionKernel', 'attention_kernel', 'current_attention_kernel',
           'scaled_dot_product_attention']

AttentionKernel = Literal['fused', 'math', 'shifted']
KERNELS = ('fused', 'math', 'shifted')
_KERNEL: contextvars.ContextVar[str] = contextvars.ContextVar('pgseg_attention_kernel', default='fused')


@contextlib.contextmanager
def attention_kernel(kernel: AttentionKernel) -> Iterator[None]:
    """Inside the block, :func:`scaled_dot_product_attention` uses ``kernel``."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")
    token = _KERNEL.set(kernel)
    try:
        yield
    finally:
        _KERNEL.reset(token)


def current_attention_kernel() -> str:
    return _KERNEL.get()


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 dropout_p: float = 0.0) -> torch.Tensor:
    """q: [B, h, S, c], k and v: [B, h, N, c] -> [B, h, S, c] = softmax(q k^T / sqrt(c)) v, no mask."""
    kernel = _KERNEL.get()
    if kernel == 'fused':
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if kernel == 'shifted':
        return _shifted_attention(q, k, v, dropout_p)
    # the logits and the softmax in float32, as the flash kernels and CUDA autocast compute them (bf16 logits lose
    # about 2 of their 3 significant digits); the probabilities go back to v's dtype for the second product
    acc = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
    with torch.autocast(q.device.type, enabled=False):
        attn = (q.to(acc) * q.shape[-1] ** -0.5) @ k.to(acc).transpose(-2, -1)  # [B, h, S, N]
        attn = attn.softmax(dim=-1)
        if dropout_p > 0:
            attn = F.dropout(attn, dropout_p)
        return attn.to(v.dtype) @ v


def _shifted_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The ``'shifted'`` kernel: every product in v's dtype, the logits computed around each row's maximum."""
    *batch, S, c = q.shape
    N = k.shape[-2]
    with torch.autocast(q.device.type, enabled=False):
        q = (q * c ** -0.5).to(v.dtype).reshape(-1, S, c)  # [B*h, S, c]
        k_t = k.to(v.dtype).reshape(-1, N, c).transpose(-2, -1)  # [B*h, c, N]
        with torch.no_grad():  # the softmax does not depend on the shift: no gradient flows through it
            row_max = torch.bmm(q, k_t).amax(dim=-1, keepdim=True)  # [B*h, S, 1]
        # -max + q.k: baddbmm adds its input inside the float32 accumulation, then rounds once
        attn = torch.baddbmm(-row_max, q, k_t).softmax(dim=-1).reshape(*batch, S, N)
        if dropout_p > 0:
            attn = F.dropout(attn, dropout_p)
        return attn @ v


class Attention(TimmAttention):
    """timm's ``Attention`` whose product runs through :func:`scaled_dot_product_attention`. Only the options the
    towers use (qkv bias, dropout); no mask, QK-norm, scale-norm or gate."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, gated: bool = False, **kwargs):
        if qk_norm or scale_norm or gated:
            raise ValueError('pgseg Attention: qk_norm, scale_norm and gated are not supported')
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, **kwargs)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x: [B, N, C] -> [B, N, C]."""
        if attn_mask is not None or is_causal:
            raise ValueError('pgseg Attention: masks are not supported (the image tower attends to every token)')
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(x))
