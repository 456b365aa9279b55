"""GroupViT / PGSeg image encoder (docs/fidelity.md#architecture).

patch embedding -> + position embedding -> stages; each stage runs timm ViT blocks over [image tokens; group tokens],
then (all but the last) a grouping block that merges the image tokens into the stage's output groups. PGSeg adds,
per grouping stage, EM prototypes of the stage input whose reconstruction is added before grouping.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from .act_checkpoint import checkpoint_same_kernels
from .attention import Attention
from .grouping import GroupingBlock, GroupingOutput, TokenMlp
from .npr import ImagePrototypes
from .projection import ProjectionMLP

__all__ = ['PatchEmbed', 'GroupingStage', 'GroupViTImageEncoder', 'StageOutput', 'ImageFeatures',
           'resize_pos_embed']


class PatchEmbed(nn.Module):
    """Non-overlapping patches: Conv2d(k=p, s=p) -> flatten -> LayerNorm. Keys ``proj``, ``norm``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """x: [B, 3, H, W] -> ([B, h*w, C], (h, w))."""
        x = self.proj(x)
        grid = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize (align_corners=False) of a square [1, n*n, C] table to ``grid``; unchanged if it already fits."""
    n = pos_embed.shape[1]
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f'position embedding has {n} entries, which is not a square grid')
    if grid == (side, side):
        return pos_embed
    table = pos_embed.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=grid, mode='bicubic', align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)


@dataclass
class StageOutput:
    """Per grouping stage: what inference and the NPR losses read."""
    grouping: GroupingOutput
    prototypes: torch.Tensor | None = None  # [B, G, C] EM prototypes of the stage input (PGSeg), no grad


@dataclass
class ImageFeatures:
    tokens: torch.Tensor  # [B, G_final, C] final tokens after the last LayerNorm
    grid: tuple[int, int]  # patch grid (h, w) of the input
    stages: List[StageOutput] = field(default_factory=list)


class GroupingStage(nn.Module):
    """One stage (``layers.{i}``): group tokens, ViT blocks, optional NPR and grouping block."""

    def __init__(self, dim: int, depth: int, num_heads: int, num_group_tokens: int, drop_path: list[float],
                 mlp_ratio: float, qkv_bias: bool, drop_rate: float, attn_drop_rate: float,
                 downsample: GroupingBlock | None, prototypes: ImagePrototypes | None,
                 group_projector: nn.Module | None):
        super().__init__()
        self.num_group_tokens = num_group_tokens
        if num_group_tokens > 0:
            self.group_token = nn.Parameter(torch.zeros(1, num_group_tokens, dim))
            if group_projector is None:  # the first stage's tokens are random; later ones start at zero
                trunc_normal_(self.group_token, std=0.02)
        else:
            self.group_token = None
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=drop_path[i], norm_layer=nn.LayerNorm, attn_layer=Attention)
            for i in range(depth)])
        self.downsample = downsample
        self.downsample_spatial = prototypes  # official name of the NPR module
        self.group_projector = group_projector
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, prev_group_tokens: torch.Tensor | None):
        """x: [B, N, C] -> (out [B, S2, C'] or [B, N, C], group tokens [B, S1, C] or None, StageOutput or None)."""
        inputs = x
        groups = None
        if self.group_token is not None:
            groups = self.group_token.expand(x.shape[0], -1, -1)
            if self.group_projector is not None:
                groups = groups + self.group_projector(prev_group_tokens)
            x = torch.cat([x, groups], dim=1)  # group tokens go after the image tokens
        for blk in self.blocks:
            x = checkpoint_same_kernels(blk, x) if self.grad_checkpointing and self.training else blk(x)
        if groups is not None:
            x, groups = x[:, :-self.num_group_tokens], x[:, -self.num_group_tokens:]
        if self.downsample is None:
            return x, groups, None
        prototypes = None
        if self.downsample_spatial is not None:
            # EM on the stage *input* (docs/fidelity.md#prototype-source-features)
            prototypes, recon = self.downsample_spatial(inputs)
            x = x + recon
        x, grouping = self.downsample(x, groups)
        return x, groups, StageOutput(grouping=grouping, prototypes=prototypes)


class GroupViTImageEncoder(nn.Module):
    """The image tower. With ``with_npr`` it is PGSeg's encoder (NPR per grouping stage, ``logit_scale`` for the
    prototype loss, and the released code's unused ``mapping_text`` when ``keep_mapping_text``)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 embed_factors: Sequence[int] = (1, 1, 1), depths: Sequence[int] = (6, 3, 3),
                 num_heads: Sequence[int] = (6, 6, 6), num_group_tokens: Sequence[int] = (64, 8, 0),
                 num_output_groups: Sequence[int] = (64, 8), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 patch_norm: bool = True, hard_assignment: bool = True, gumbel: bool = True, gumbel_tau: float = 1.0,
                 assign_eps: float = 1.0, assign_temperature: float = 1.0, assign_gain: float = 1.0,
                 grad_checkpointing: bool = False, with_npr: bool = False, npr_iters: int = 10,
                 npr_momentum: float = 0.9, npr_hidden_dim: int = 4096, npr_temperature: float = 0.1,
                 keep_mapping_text: bool = False):
        """Arguments as :class:`pgseg.config.ImageEncoderConfig` (one entry per stage in ``embed_factors``,
        ``depths``, ``num_heads``, ``num_group_tokens``; one per grouping stage in ``num_output_groups``: the config's
        validate() checks the lengths), plus PGSeg's NPR: EM iterations, momentum, head width, temperature."""
        super().__init__()
        n = len(depths)
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=patch_norm)
        side = img_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side, embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        dims = [int(embed_dim * f) for f in embed_factors]
        self.layers = nn.ModuleList()
        for i in range(n):
            dim = dims[i]
            downsample = prototypes = projector = None
            if i < n - 1:
                downsample = GroupingBlock(dim, dims[i + 1], num_heads[i], num_group_tokens[i],
                                           num_output_groups[i], hard=hard_assignment,
                                           gumbel=hard_assignment and gumbel, gumbel_tau=gumbel_tau,
                                           assign_eps=assign_eps,
                                           assign_temperature=assign_temperature, assign_gain=assign_gain)
                if with_npr:  # the reconstruction is added to the stage's tokens: equal widths (validate())
                    prototypes = ImagePrototypes(dim, dims[i + 1], num_output_groups[i], num_iters=npr_iters,
                                                 momentum=npr_momentum, hidden_dim=npr_hidden_dim)
            if i > 0 and num_group_tokens[i] > 0:
                prev = dims[i - 1]
                projector = nn.Sequential(nn.LayerNorm(prev),
                                          TokenMlp(num_group_tokens[i - 1], prev // 2, num_group_tokens[i]))
                if dim != prev:
                    projector = nn.Sequential(projector, nn.LayerNorm(prev), nn.Linear(prev, dim, bias=False))
            start = sum(depths[:i])
            self.layers.append(GroupingStage(
                dim=dim, depth=depths[i], num_heads=num_heads[i], num_group_tokens=num_group_tokens[i],
                drop_path=dpr[start:start + depths[i]], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, downsample=downsample,
                prototypes=prototypes, group_projector=projector))
        self.num_features = dims[-1]
        self.norm = nn.LayerNorm(self.num_features)
        if keep_mapping_text:  # declared but never used by the released PGSeg; kept only so its files load strictly
            self.mapping_text = ProjectionMLP(embed_dim, 256, hidden_dim=npr_hidden_dim)
            self.mapping_text.requires_grad_(False)
        self.apply(self._init_weights)
        if with_npr:
            self.logit_scale = nn.Parameter(torch.tensor(float(-torch.log(torch.tensor(npr_temperature)))))
        self.set_grad_checkpointing(grad_checkpointing)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def width(self) -> int:
        return self.num_features

    @property
    def with_npr(self) -> bool:
        return any(layer.downsample_spatial is not None for layer in self.layers)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        names = {'pos_embed', 'logit_scale'}
        names |= {f'layers.{i}.group_token' for i, layer in enumerate(self.layers) if layer.group_token is not None}
        return names

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        """images: normalised [B, 3, H, W] (any size at inference) -> :class:`ImageFeatures`."""
        x, grid = self.patch_embed(images)
        x = self.pos_drop(x + resize_pos_embed(self.pos_embed, grid))
        groups = None
        stages: list[StageOutput] = []
        for layer in self.layers:
            x, groups, out = layer(x, groups)
            if out is not None:
                stages.append(out)
        return ImageFeatures(tokens=self.norm(x), grid=grid, stages=stages)
