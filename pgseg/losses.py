"""Losses: image-text contrastive, GroupViT's multi-label contrastive, and PGSeg's prototype contrastive loss.

Each loss takes embeddings and returns a scalar; gathering across ranks goes through
:func:`pgseg.distributed.all_gather_with_grad`, so each loss is exact in one process and across many. Losses run in
float32 even inside a bf16/fp16 autocast region: logits scaled by up to 100 need more than bf16's 8 mantissa bits,
and the HRS selection compares cosines that differ in the third decimal.
"""
from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from .distributed import all_gather_with_grad, get_rank, get_world_size

__all__ = ['clamp_logit_scale', 'contrastive_loss', 'multi_label_contrastive_loss', 'group_balance_loss',
           'group_word_loss', 'hrs_mask', 'prototype_contrastive_loss', 'noun_grounding_loss', 'float32']

MAX_LOGIT_SCALE = 100.0


def float32(fn):
    """Run ``fn`` with autocast disabled and its floating-point tensor arguments cast to float32."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in args if torch.is_tensor(a)]
        device_type = tensors[0].device.type if tensors else 'cpu'
        cast = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*cast, **kwargs)
    return wrapper


def clamp_logit_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """exp(log_scale) clamped at 100, as every official temperature."""
    return log_scale.exp().clamp(max=MAX_LOGIT_SCALE)


@float32
def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (§3.1).

    image_embeds, text_embeds: [B, D] (not normalised) on each rank. Each rank scores its B rows against the
    W*B gathered columns; the positives sit at ``rank * B + arange(B)``. Returns 0.5 * (CE_img + CE_txt).
    """
    image_embeds = F.normalize(image_embeds.float(), dim=-1)
    text_embeds = F.normalize(text_embeds.float(), dim=-1)
    scale = clamp_logit_scale(log_scale.float())
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device) + image_embeds.shape[0] * get_rank()
    logits_img = scale * image_embeds @ all_gather_with_grad(text_embeds).t()  # [B, W*B]
    logits_txt = scale * text_embeds @ all_gather_with_grad(image_embeds).t()
    return 0.5 * (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels))


@float32
def multi_label_contrastive_loss(image_embeds: torch.Tensor, prompt_embeds: torch.Tensor,
                                 log_scale: torch.Tensor) -> torch.Tensor:
    """GroupViT's multi-label loss (§3.2): each image against the K noun prompts of every caption in the batch.

    image_embeds: [B, D], prompt_embeds: [B, K, D]. Image -> prompts: soft target 1/K on the image's own K
    prompts. Prompt -> images: one-hot on its own image. 0.5 * (both soft-target cross-entropies).
    """
    B, K, _ = prompt_embeds.shape
    image_embeds = F.normalize(image_embeds.float(), dim=-1)
    prompts = F.normalize(prompt_embeds.float(), dim=-1).reshape(B * K, -1)  # [B*K, D]
    scale = clamp_logit_scale(log_scale.float())
    world, rank = get_world_size(), get_rank()
    logits_img = scale * image_embeds @ all_gather_with_grad(prompts).t()  # [B, W*B*K]
    logits_txt = scale * prompts @ all_gather_with_grad(image_embeds).t()  # [B*K, W*B]
    own = torch.arange(B, device=image_embeds.device) + rank * B  # global index of each local image
    target_img = torch.zeros(B, world * B, K, device=image_embeds.device)
    target_img[torch.arange(B, device=image_embeds.device), own] = 1.0 / K
    target_txt = F.one_hot(own.repeat_interleave(K), world * B).float()
    loss_fn = SoftTargetCrossEntropy()
    return 0.5 * (loss_fn(logits_img, target_img.reshape(B, -1)) + loss_fn(logits_txt, target_txt))


@float32
def noun_grounding_loss(group_embeds: torch.Tensor, prompt_embeds: torch.Tensor, valid: torch.Tensor,
                        group_area: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """pgseg's within-image noun grounding (an extension, not in GroupViT or PGSeg): each noun prompt of a caption
    pools the image's pixels whose group matches it, and that region must match its own noun better than the
    caption's other nouns.

    group_embeds: [B, G, D] projected final groups; prompt_embeds: [B, K, D] the caption's noun prompts; valid:
    [B, K] bool, False for padding prompts; group_area: [B, G] share of the patches each group holds as inference
    assigns them (arg-max), no gradient. For noun k of image b, with cosines S[k, g] and scale s:

        w[k, g] = area[g] * exp(s * S[k, g]) / sum_g' (...)     (pooling over pixels: a group without any is out)
        r_k     = normalise(sum_g w[k, g] * group_g)
        loss    = mean over valid k of CE_k'(s * cos(r_k, noun_k'), target k), k' over the image's valid nouns

    If every group carried the whole caption (the pooled contrastive loss is indifferent to it), every r_k would be
    the same vector and the cross-entropy could not fall below log(#nouns): the loss asks for groups that stand for
    one noun each, among the groups inference will name. Nouns of other images are not negatives (the same word
    recurs across a batch), so nothing is gathered across ranks; without a cross-image loss on the prompts
    (GroupViT's multi-label loss) their embeddings are free to drift together, so the two go together. Images with
    fewer than two valid nouns contribute nothing.
    """
    groups = F.normalize(group_embeds.float(), dim=-1)
    nouns = F.normalize(prompt_embeds.float(), dim=-1)
    scale = clamp_logit_scale(log_scale.float())
    area = group_area.detach().float().unsqueeze(1)  # [B, 1, G]
    pool = (scale * nouns @ groups.transpose(1, 2)).masked_fill(area <= 0, float('-inf')) + area.clamp(min=1e-12).log()
    regions = F.normalize(pool.softmax(dim=-1) @ groups, dim=-1)  # [B, K, D]
    logits = scale * regions @ nouns.transpose(1, 2)  # [B, K(region), K(noun)]
    logits = logits.masked_fill(~valid.unsqueeze(1), float('-inf'))
    K = nouns.shape[1]
    labels = torch.arange(K, device=nouns.device).expand(nouns.shape[0], K)
    ce = F.cross_entropy(logits.flatten(0, 1).masked_fill(~valid.flatten().unsqueeze(1), 0.0), labels.flatten(),
                         reduction='none')
    keep = (valid & (valid.sum(dim=1, keepdim=True) >= 2)).flatten().to(ce.dtype)
    return (ce * keep).sum() / keep.sum().clamp(min=1.0)


@float32
def group_word_loss(group_embeds: torch.Tensor, group_area: torch.Tensor, prompt_embeds: torch.Tensor,
                    prompt_keys: torch.Tensor, valid: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """pgseg's cross-image noun-to-group loss (an extension, not in GroupViT or PGSeg; multiple-instance learning
    over the final groups): each noun prompt scores every image of the global batch by the cosine of that image's
    best-matching final group among those that win patches, and must pick its own image.

    group_embeds: [B, G, D] projected final groups; group_area: [B, G] share of the patches each wins at inference
    (no gradient); prompt_embeds: [B, K, D]; prompt_keys: [B, K] int64, equal for equal prompt texts; valid: [B, K]
    bool (False for padding prompts). For prompt (i, k) and image j of the W*B gathered images:

        score[(i, k), j] = max over groups g of j with area > 0 of cos(prompt_ik, group_jg)
        loss = mean over valid (i, k) of CE_j(s * score[(i, k), :], target i)

    where images other than i whose caption has the same prompt are left out of the denominator (they are not
    negatives). Unlike GroupViT's multi-label loss, which scores the image's pooled embedding, only one group per
    image has to carry the noun, and a group that carries it in an image without it is penalised: across images the
    noun's group is the one whose content comes and goes with the noun.
    """
    B, G, D = group_embeds.shape
    K = prompt_embeds.shape[1]
    groups = all_gather_with_grad(F.normalize(group_embeds, dim=-1))  # [W*B, G, D]
    area = all_gather_with_grad(group_area.detach())  # [W*B, G]
    keys = all_gather_with_grad(prompt_keys)  # [W*B, K]
    prompts = F.normalize(prompt_embeds, dim=-1).reshape(B * K, D)
    scale = clamp_logit_scale(log_scale.float())
    sims = torch.einsum('pd,jgd->pjg', prompts, groups).masked_fill(area.unsqueeze(0) <= 0, float('-inf'))
    logits = scale * sims.amax(dim=-1)  # [B*K, W*B]
    own = (torch.arange(B, device=prompts.device) + get_rank() * B).repeat_interleave(K)  # [B*K]
    shares = (prompt_keys.reshape(B * K, 1, 1) == keys.unsqueeze(0)).any(dim=-1)  # [B*K, W*B]
    shares[torch.arange(B * K, device=prompts.device), own] = False
    ce = F.cross_entropy(logits.masked_fill(shares, float('-inf')), own, reduction='none')
    keep = valid.flatten().to(ce.dtype)
    return (ce * keep).sum() / keep.sum().clamp(min=1.0)


def group_balance_loss(usage: torch.Tensor, min_groups: float) -> torch.Tensor:
    """pgseg's group balance (an extension, not in GroupViT or PGSeg): usage [B, G] is the share of each image's
    patches in each final group (rows sum to 1). Its entropy H is the log of the effective number
    of groups; the loss is mean_b max(0, log(min_groups) - H_b), zero for an image that already spreads its patches
    over min_groups groups or more, and log(min_groups) for one that puts them all in one group."""
    if min_groups < 1:
        raise ValueError(f'group_balance_loss: min_groups must be >= 1, got {min_groups}')
    u = usage.float().clamp(min=1e-12)
    entropy = -(u * u.log()).sum(dim=-1)  # [B]
    return F.relu(math.log(min_groups) - entropy).mean()


@torch.no_grad()
def hrs_mask(sim: torch.Tensor, threshold: float, pair_score: Literal['column0', 'diagonal']) -> torch.Tensor:
    """PGSeg's high-response selection of matched pairs. sim: [B, G, G] cosine, rows i, columns j -> mask [B, G].

    Each column is min-max normalised over the rows. ``diagonal`` keeps pair k when its own normalised similarity
    N[k, k] exceeds the threshold (what the code's comment intends). ``column0`` reproduces the release, which reads
    N[k, 0] for every k (§2.4).
    """
    lo, hi = sim.amin(dim=1, keepdim=True), sim.amax(dim=1, keepdim=True)
    norm = (sim - lo) / (hi - lo + 1e-6)
    score = norm[..., 0] if pair_score == 'column0' else norm.diagonal(dim1=1, dim2=2)
    return score > threshold


@float32
def prototype_contrastive_loss(groups: torch.Tensor, protos: torch.Tensor, log_scale: torch.Tensor,
                               threshold: float = 0.1,
                               pair_score: Literal['column0', 'diagonal'] = 'diagonal') -> torch.Tensor:
    """``closs`` (§2.5): contrast each group with its matched prototype against the image's other prototypes,
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
    # the other way round: the release applies each direction's mask to the transposed matrix (§2.9 item 9).
    return _masked_mean_ce(scale * sim_pg, labels, keep_gp) + _masked_mean_ce(scale * sim_gp, labels, keep_pg)


def _masked_mean_ce(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the kept rows of logits [B, G, G] (0 if none is kept), without boolean indexing,
    which would synchronise with the device."""
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction='none')
    keep = keep.flatten().to(ce.dtype)
    return (ce * keep).sum() / keep.sum().clamp(min=1.0)
