"""GroupViT's grouping block: group tokens take over the image tokens they win (docs/fidelity.md#grouping-block)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import Mlp

from .attention import scaled_dot_product_attention

__all__ = ['TokenMlp', 'straight_through_hard', 'gumbel_noise', 'CrossAttention', 'PreAssignBlock',
           'AssignAttention', 'GroupingBlock', 'GroupingOutput']


class TokenMlp(Mlp):
    """An MLP mixing along the token axis: [B, S1, C] -> [B, S2, C] (``Mlp`` over the transposed tokens)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def straight_through_hard(soft: torch.Tensor, dim: int) -> torch.Tensor:
    """One-hot of the argmax along ``dim`` in value; the gradient flows through ``soft`` (straight-through)."""
    index = soft.argmax(dim=dim, keepdim=True)
    hard = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return hard - soft.detach() + soft


def gumbel_noise(like: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel(0, 1) samples in the dtype of ``like``, clamped away from the log singularities."""
    tiny = torch.finfo(like.dtype).tiny
    u = torch.rand_like(like).clamp_(min=tiny, max=1.0 - torch.finfo(like.dtype).eps)
    return -torch.log(-torch.log(u))


class CrossAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (official key names ``q_proj``, ``k_proj``, ...)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'CrossAttention: dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """query: [B, S, C], key (= value): [B, N, C] -> [B, S, C]."""
        B, S, C = query.shape
        h = self.num_heads
        q = self.q_proj(query).view(B, S, h, C // h).transpose(1, 2)  # [B, h, S, c]
        k = self.k_proj(key).view(B, -1, h, C // h).transpose(1, 2)  # [B, h, N, c]
        v = self.v_proj(key).view(B, -1, h, C // h).transpose(1, 2)
        out = scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, S, C)))


class PreAssignBlock(nn.Module):
    """Group tokens attend to the image tokens, then an MLP, then a LayerNorm (CrossAttnBlock with post-norm)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm_post = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)

    def forward(self, groups: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """groups: [B, S, C] (already normalised), x: [B, N, C] (already normalised) -> [B, S, C]."""
        groups = groups + self.attn(groups, x)
        groups = groups + self.mlp(self.norm2(groups))
        return self.norm_post(groups)


class AssignAttention(nn.Module):
    """Single-head assignment of every image token to one group: softmax over the *group* axis.

    Training: Gumbel noise (if enabled) and a straight-through hard one-hot. Eval: the hard one-hot without noise.
    Each group's output is the sum of its assigned tokens' values over (count + assign_eps), times ``gain``.
    """

    def __init__(self, dim: int, qkv_bias: bool = True, hard: bool = True, gumbel: bool = True,
                 gumbel_tau: float = 1.0, assign_eps: float = 1.0, temperature: float = 1.0, gain: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f'assignment temperature must be positive, got {temperature}')
        if gain <= 0:
            raise ValueError(f'assignment gain must be positive, got {gain}')
        self.scale = dim ** -0.5 / temperature
        self.gain = gain
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.hard, self.gumbel, self.gumbel_tau, self.assign_eps = hard, gumbel, gumbel_tau, assign_eps

    def forward(self, groups: torch.Tensor, x: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """groups: [B, S, C], x: [B, N, C] -> (out [B, S, C], assignment [B, S, N], soft map [B, S, N], logits
        [B, S, N]).

        The soft map is the noise-free softmax over groups, what inference reads, without gradient; the logits
        (temperature applied) keep theirs for the group-balance loss.
        """
        logits = (self.q_proj(groups) @ self.k_proj(x).transpose(1, 2)) * self.scale  # [B, S, N]
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32, or float64 for float64 inputs
        soft = wide.softmax(dim=1)
        if self.training and self.gumbel:  # noise in float32: bf16 would truncate the Gumbel tail
            noisy = ((wide + gumbel_noise(wide)) / self.gumbel_tau).softmax(dim=1)
        else:
            noisy = soft
        attn = straight_through_hard(noisy, dim=1) if self.hard else noisy
        weights = attn / (attn.sum(dim=-1, keepdim=True) + self.assign_eps)
        out = self.proj(weights @ self.v_proj(x))
        if self.gain != 1.0:
            out = out * self.gain
        return out, attn, soft.detach(), logits


@dataclass
class GroupingOutput:
    """What one grouping block exposes besides its output tokens."""
    assignment: torch.Tensor  # [B, S2, N] hard (straight-through) assignment used for the output
    soft_map: torch.Tensor  # [B, S2, N] softmax over groups without noise
    group_queries: torch.Tensor  # [B, S2, C] pre-assign group tokens ('ori_center'): what NPR supervises
    logits: torch.Tensor  # [B, S2, N] assignment logits over groups, temperature applied, with gradient


class GroupingBlock(nn.Module):
    """Merge N image tokens into S2 groups. Key names follow the official checkpoints."""

    def __init__(self, dim: int, out_dim: int, num_heads: int, num_group_tokens: int, num_output_groups: int,
                 mlp_ratio: tuple[float, float] = (0.5, 4.0), hard: bool = True, gumbel: bool = True,
                 gumbel_tau: float = 1.0, assign_eps: float = 1.0, assign_temperature: float = 1.0,
                 assign_gain: float = 1.0):
        super().__init__()
        tokens_dim, channels_dim = int(mlp_ratio[0] * dim), int(mlp_ratio[1] * dim)
        self.norm_tokens = nn.LayerNorm(dim)
        self.mlp_inter = TokenMlp(num_group_tokens, tokens_dim, num_output_groups)
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.pre_assign_attn = PreAssignBlock(dim, num_heads, mlp_ratio=4.0, qkv_bias=True)
        self.assign = AssignAttention(dim, qkv_bias=True, hard=hard, gumbel=gumbel, gumbel_tau=gumbel_tau,
                                      assign_eps=assign_eps, temperature=assign_temperature, gain=assign_gain)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, channels_dim, out_dim)
        self.reduction = (nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, out_dim, bias=False))
                          if out_dim != dim else nn.Identity())

    def forward(self, x: torch.Tensor, group_tokens: torch.Tensor) -> tuple[torch.Tensor, GroupingOutput]:
        """x: [B, N, C] image tokens, group_tokens: [B, S1, C] -> ([B, S2, out_dim], GroupingOutput)."""
        group_tokens = self.norm_tokens(group_tokens)
        x = self.norm_x(x)
        queries = self.norm_post_tokens(self.mlp_inter(group_tokens))  # [B, S1, C] -> [B, S2, C]
        queries = self.pre_assign_attn(queries, x)
        out, assignment, soft, logits = self.assign(queries, x)
        out = out + queries
        out = self.reduction(out) + self.mlp_channels(self.norm_new_x(out))
        return out, GroupingOutput(assignment=assignment, soft_map=soft, group_queries=queries, logits=logits)
