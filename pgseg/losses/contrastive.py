"""Image-text contrastive losses: CLIP's symmetric InfoNCE and GroupViT's multi-label variant, over the global batch
(gathered across ranks with :func:`pgseg.runtime.distributed.all_gather_with_grad`: exact in one process and many)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from ..runtime.distributed import all_gather_with_grad, get_rank, get_world_size
from .common import clamp_logit_scale, float32

__all__ = ['contrastive_loss', 'multi_label_contrastive_loss']


@float32
def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (docs/fidelity.md#image-text-contrastive-loss).

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
    """GroupViT's multi-label loss (docs/fidelity.md#multi-label-contrastive-loss): each image against the K noun
    prompts of every caption in the batch.

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
