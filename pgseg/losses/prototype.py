"""PGSeg's prototype contrastive loss with hard-region selection (HRS): each group token against its matched
prototype, the other prototypes of the image as negatives."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .common import clamp_logit_scale, float32

__all__ = ['hrs_mask', 'prototype_contrastive_loss']


@torch.no_grad()
def hrs_mask(sim: torch.Tensor, threshold: float, pair_score: Literal['column0', 'diagonal']) -> torch.Tensor:
    """PGSeg's high-response selection of matched pairs. sim: [B, G, G] cosine, rows i, columns j -> mask [B, G].

    Each column is min-max normalised over the rows. ``diagonal`` keeps pair k when its own normalised similarity
    N[k, k] exceeds the threshold (what the code's comment intends). ``column0`` reproduces the release, which reads
    N[k, 0] for every k (docs/fidelity.md#hrs-selection).
    """
    lo, hi = sim.amin(dim=1, keepdim=True), sim.amax(dim=1, keepdim=True)
    norm = (sim - lo) / (hi - lo + 1e-6)
    score = norm[..., 0] if pair_score == 'column0' else norm.diagonal(dim1=1, dim2=2)
    return score > threshold


@float32
def prototype_contrastive_loss(groups: torch.Tensor, protos: torch.Tensor, log_scale: torch.Tensor,
                               threshold: float = 0.1,
                               pair_score: Literal['column0', 'diagonal'] = 'diagonal') -> torch.Tensor:
    """``closs`` (docs/fidelity.md#prototype-contrastive-loss): contrast each group with its matched prototype against
    the image's other prototypes,
    and each prototype against the other groups; negatives come from the same image only.

    groups, protos: [B, G, D], row-aligned by the matching (pair k = row k of both). Returns CE_gp + CE_pg, each a
    mean over the pairs HRS keeps.
    """
    groups = F.normalize(groups.float(), dim=-1)
    protos = F.normalize(protos.float(), dim=-1)
    B, G, _ = groups.shape
    sim_gp = groups @ protos.transpose(1, 2)  # [B, G(group i), G(proto j)]
    sim_pg = sim_gp.transpose(1, 2)  # [B, G(proto j), G(group i)]
    keep_gp = hrs_mask(sim_gp, threshold, pair_score)
    keep_pg = hrs_mask(sim_pg, threshold, pair_score)
    scale = clamp_logit_scale(log_scale.float())
    labels = torch.arange(G, device=groups.device).expand(B, G)
    # Row k of sim_pg: prototype k against all groups (target k), selected by the mask computed on sim_gp, and
    # the other way round: the release applies each direction's mask to the transposed matrix (docs/fidelity.md#cross-
    # applied-hrs-masks).
    return _masked_mean_ce(scale * sim_pg, labels, keep_gp) + _masked_mean_ce(scale * sim_gp, labels, keep_pg)


def _masked_mean_ce(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the kept rows of logits [B, G, G] (0 if none is kept), without boolean indexing,
    which would synchronise with the device."""
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction='none')
    keep = keep.flatten().to(ce.dtype)
    return (ce * keep).sum() / keep.sum().clamp(min=1.0)
