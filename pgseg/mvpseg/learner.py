"""MVP-SEG's multi-view prompt learner (docs/mvpseg.md#the-method) and the hand-written template baseline.

Shapes: B images, C classes, D joint dimension, k segmentation views, L context tokens, d text width,
pixel features [B, D, h, w].

    t_i^c   = text_encoder([SOT, p_i (L learned vectors), name_c, '.', EOT])      i = 0 (global), 1..k (views)
    m_i^c   = cos(F(x), t_i^c)                                                   [B, 1+k, C, h, w]
    fused   = tau1 * sum_{i>=1} m_i                                              [B, C, h, w] logits
    s_c     = sum_x m_0^c(x) softmax_x(gamma m_0^c)(x)                           soft-max pooled global score
    g_c     = sigmoid((s_c - beta) / tau2)                                       GPR presence score [B, C]
    log m_c = log_softmax_c(fused) + log g_c                                     refined masks (log domain)

Trainable: the 1+k context sequences, log tau1, log tau2 and beta. Choices where the paper is silent are listed with
the reasons in docs/mvpseg.md#choices-where-the-paper-is-silent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.text import trim_padding
from .backbones import DenseBackbone

__all__ = ['PromptConfig', 'PixelLogits', 'MultiViewPrompts', 'TemplateClassifier', 'orthogonality_loss',
           'segmentation_loss', 'presence_loss', 'refined_log_probs']

PLACEHOLDER = 'X'  # one BPE token; its positions take the learned context vectors


@dataclass
class PromptConfig:
    num_views: int = 3  # k segmentation prompts; one global (GPR) prompt comes on top
    context_length: int = 8  # learned context vectors per prompt
    init: str | None = 'a photo of a'  # phrase whose word embeddings start the last context slots; null: random
    init_noise_std: float = 0.02  # noise added to every slot (breaks the symmetry between views), and random slots
    fusion_scale_init: float | None = None  # tau1 at start; null: backbone logit scale / num_views
    gpr: bool = True
    gpr_gamma: float = 20.0  # fixed sharpness of the soft-max pooling over pixels
    gpr_temperature_init: float = 0.03  # tau2 at start
    gpr_bias: bool = True  # learnable centre beta of the pooled score (the summarised paper has none)


@dataclass
class PixelLogits:
    fused: torch.Tensor  # [B, C, h, w] view-fused class logits
    presence: torch.Tensor | None  # [B, C] GPR logits (sigmoid -> g_c), None without GPR
    views: torch.Tensor | None = None  # [B, 1+k, C, h, w] per-prompt cosine maps (index 0: global prompt)


def refined_log_probs(logits: PixelLogits, size: tuple[int, int] | None = None) -> torch.Tensor:
    """log(m_f * g) [B, C, H, W]: the fused logits (bilinearly resized to ``size`` first) soft-maxed over classes,
    plus the log presence score. Its argmax over C is the prediction."""
    fused = logits.fused.float()
    if size is not None and tuple(fused.shape[-2:]) != tuple(size):
        fused = F.interpolate(fused, size=size, mode='bilinear', align_corners=False)
    out = F.log_softmax(fused, dim=1)
    if logits.presence is not None:
        out = out + F.logsigmoid(logits.presence.float())[:, :, None, None]
    return out


def _cosine_maps(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """features [B, D, h, w], text [V, C, D] (normalised) -> [B, V, C, h, w] cosine maps."""
    f = F.normalize(features.float(), dim=1)
    return torch.einsum('bdhw,vcd->bvchw', f, text.float())


class MultiViewPrompts(nn.Module):
    """k segmentation prompts + 1 global prompt, shared across classes, placed before the class name."""

    def __init__(self, cfg: PromptConfig, backbone: DenseBackbone):
        super().__init__()
        if cfg.num_views < 1 or cfg.context_length < 1:
            raise ValueError(f'prompts: num_views ({cfg.num_views}) and context_length ({cfg.context_length}) '
                             f'must be at least 1')
        self.cfg = cfg
        k, L, d = cfg.num_views, cfg.context_length, backbone.token_dim
        ctx = torch.randn(1 + k, L, d) * cfg.init_noise_std
        if cfg.init:
            with torch.no_grad():
                tokens = backbone.tokenize([cfg.init])[0]
                n = int(tokens.argmax()) - 1  # words between SOT and EOT
                if n > L:
                    raise ValueError(f'prompts.init {cfg.init!r} has {n} tokens; prompts.context_length is {L}')
                words = backbone.token_embeddings(tokens[None])[0, 1:1 + n].float().cpu()
            ctx[:, L - n:] += words  # the phrase sits right before the class name
        self.ctx = nn.Parameter(ctx)  # [1+k, L, d]: index 0 = global prompt
        tau1 = cfg.fusion_scale_init if cfg.fusion_scale_init is not None else backbone.logit_scale / k
        self.log_tau1 = nn.Parameter(torch.tensor(math.log(tau1)))
        if cfg.gpr:
            self.log_tau2 = nn.Parameter(torch.tensor(math.log(cfg.gpr_temperature_init)))
            self.beta = nn.Parameter(torch.zeros(())) if cfg.gpr_bias else None
        self._token_cache: dict[tuple[str, ...], torch.Tensor] = {}

    @property
    def num_views(self) -> int:
        return self.cfg.num_views

    def prompt_texts(self, names: Sequence[str]) -> list[str]:
        return [' '.join([PLACEHOLDER] * self.cfg.context_length) + f' {n}.' for n in names]

    def class_embeddings(self, backbone: DenseBackbone, names: Sequence[str]) -> torch.Tensor:
        """[1+k, C, D] L2-normalised text embeddings of every prompt for every class (differentiable in ctx)."""
        key = tuple(names)
        tokens = self._token_cache.get(key)
        if tokens is None or tokens.device != backbone.device:
            tokens = trim_padding(backbone.tokenize(self.prompt_texts(names)))  # once per class list
            self._token_cache = {key: tokens}
        V, C, L = self.ctx.shape[0], tokens.shape[0], self.cfg.context_length
        with torch.no_grad():
            words = backbone.token_embeddings(tokens)  # [C, T, d]
        ctx = self.ctx.to(words.dtype)
        x = torch.cat([words[None, :, :1].expand(V, -1, -1, -1),
                       ctx[:, None].expand(-1, C, -1, -1),
                       words[None, :, 1 + L:].expand(V, -1, -1, -1)], dim=2)  # [V, C, T, d]
        embeds = backbone.encode_with_context(x.flatten(0, 1), tokens.repeat(V, 1))
        return F.normalize(embeds.float(), dim=-1).reshape(V, C, -1)

    def forward(self, features: torch.Tensor, text: torch.Tensor) -> PixelLogits:
        """features [B, D, h, w], text [1+k, C, D] from :meth:`class_embeddings` -> :class:`PixelLogits`."""
        maps = _cosine_maps(features, text)  # [B, 1+k, C, h, w]
        fused = self.log_tau1.exp() * maps[:, 1:].sum(dim=1)
        presence = None
        if self.cfg.gpr:
            m0 = maps[:, 0].flatten(2)  # [B, C, hw]
            pooled = (m0 * torch.softmax(self.cfg.gpr_gamma * m0, dim=-1)).sum(dim=-1)  # [B, C]
            centre = self.beta if self.beta is not None else 0.0
            presence = (pooled - centre) / self.log_tau2.exp()
        return PixelLogits(fused=fused, presence=presence, views=maps)

    def orthogonality(self) -> torch.Tensor:
        return orthogonality_loss(self.ctx[1:])


class TemplateClassifier(nn.Module):
    """The hand-written baseline: each class embedding is the mean over templates of the normalised prompt
    embeddings, re-normalised (CLIP's zero-shot recipe); logits = backbone logit scale x cosine; no GPR."""

    def __init__(self, templates: Sequence[str], logit_scale: float):
        super().__init__()
        if not templates:
            raise ValueError('TemplateClassifier needs at least one template')
        self.templates = tuple(templates)
        self.logit_scale = float(logit_scale)

    @torch.no_grad()
    def class_embeddings(self, backbone: DenseBackbone, names: Sequence[str], batch_size: int = 512) -> torch.Tensor:
        prompts = [t.format(n) for n in names for t in self.templates]
        chunks = [backbone.encode_texts(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
        embeds = F.normalize(torch.cat(chunks).float(), dim=-1).reshape(len(names), len(self.templates), -1)
        return F.normalize(embeds.mean(dim=1), dim=-1)[None]  # [1, C, D]

    def forward(self, features: torch.Tensor, text: torch.Tensor) -> PixelLogits:
        return PixelLogits(fused=self.logit_scale * _cosine_maps(features, text)[:, 0], presence=None)


# ------------------------------------------------------------------------------------------------------ losses
def orthogonality_loss(ctx: torch.Tensor) -> torch.Tensor:
    """OCLoss: sum over view pairs i < j of |cos(mean_l ctx_i, mean_l ctx_j)|. ctx: [k, L, d] -> scalar."""
    means = F.normalize(ctx.float().mean(dim=1), dim=-1)  # [k, d]
    cos = means @ means.t()
    i, j = torch.triu_indices(len(means), len(means), offset=1, device=ctx.device)
    return cos[i, j].abs().sum()


def segmentation_loss(logits: PixelLogits, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Pixel cross-entropy of the refined masks log(m_f g) against labels [B, H, W] (class index or ignore),
    averaged over labelled pixels; the fused logits are bilinearly upsampled to the label size first."""
    log_probs = refined_log_probs(logits, size=tuple(labels.shape[-2:]))
    if not (labels != ignore_index).any():
        return log_probs.sum() * 0.0
    return F.nll_loss(log_probs, labels.long(), ignore_index=ignore_index)


def presence_loss(logits: PixelLogits, labels: torch.Tensor, num_classes: int, ignore_index: int = 255
                  ) -> torch.Tensor:
    """GPR's image-level loss: binary cross-entropy of g_c against y_c = 1 when class c has a labelled pixel in
    the image (full BCE, not only the positive term: docs/mvpseg.md#choices-where-the-paper-is-silent)."""
    if logits.presence is None:
        raise ValueError('presence_loss needs GPR logits (prompts.gpr: true)')
    flat = labels.flatten(1).long()
    valid = flat != ignore_index
    target = torch.zeros(labels.shape[0], num_classes + 1, device=labels.device)
    target.scatter_(1, torch.where(valid, flat, num_classes), 1.0)
    return F.binary_cross_entropy_with_logits(logits.presence.float(), target[:, :num_classes])
