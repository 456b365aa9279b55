"""pgseg's grouping losses (off in the official recipes): noun grounding, the cross-image noun-to-group loss and the
group balance, which ask the final groups to stand for the caption's nouns and to split the image."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..runtime.distributed import all_gather_with_grad, get_rank
from .common import clamp_logit_scale, float32

__all__ = ['noun_grounding_loss', 'group_word_loss', 'group_balance_loss']


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
