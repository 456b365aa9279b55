"""The training objective of GroupViT / PGSeg: a model's features in, named losses and their weighted sum out.

The model computes features only (:class:`~pgseg.models.groupseg.GroupSegModel`); :class:`GroupSegObjective` runs
its towers in the order that hides the Hungarian matchings' host work (the image matchings start before the text
tower runs), and turns what they return into the terms below, each weighted by its config value:

==============  ==============================================  =============================================
term            loss                                            weight (``model.*``)
==============  ==============================================  =============================================
``itc``         image-text InfoNCE (:mod:`.contrastive`)        1
``multi_label`` GroupViT's multi-label contrastive loss         ``multi_label_loss_weight``
``grounding``   noun grounding of the final groups              ``grounding_weight`` (from the start step)
``group_word``  cross-image noun-to-group loss                  ``group_word_weight`` (from the start step)
``balance``     group balance (:mod:`.grouping`)                ``balance_weight``
``npr``         PGSeg's prototype terms (:mod:`.prototype`)     ``npr.weight``, ``npr.text_weight``, stages
==============  ==============================================  =============================================

It also returns the batch statistics the prototype buffers follow; the trainer applies them after the backward
pass (:meth:`GroupSegModel.update_prototypes`), so a loss never changes the model. Adding a loss: its function in
the module of its family, its weight in the config, one term in :meth:`GroupSegObjective._compute`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.grouping import straight_through_hard
from ..models.groupseg import patch_group_maps
from ..models.image_encoder import ImageFeatures
from ..models.matching import MatchHandle, join_all, match_all_async, match_async
from .contrastive import contrastive_loss, multi_label_contrastive_loss
from .grouping import group_balance_loss, group_word_loss, noun_grounding_loss
from .prototype import prototype_contrastive_loss

__all__ = ['NPRLossSettings', 'GroupSegObjective', 'build_objective']


@dataclass(frozen=True)
class NPRLossSettings:
    """PGSeg's prototype terms (``model.npr``)."""
    variant: str  # reference (the release, bugs included) or paper
    weight: float  # the whole NPR term
    text_weight: float  # the text term, relative to the image terms
    stage_weights: tuple[float, ...] | None  # per grouping stage (paper variant); None: 1 each
    hrs_threshold: float  # hard-region selection


class GroupSegObjective(nn.Module):
    """``objective(images, tokens, noun_losses) -> (losses, prototype_updates)`` over ``model``'s features.

    images: [B, 3, H, W]; tokens: [B, L] captions or [B, 1+K, L] caption + K noun prompts. ``losses`` holds every
    enabled term (detached parts such as ``npr_image_<k>`` for logging) and ``loss``, the sum to minimise;
    ``prototype_updates`` the batch statistics of the prototype buffers (empty for GroupViT). ``noun_losses``
    switches the noun terms on (the trainer passes ``step >= model.noun_losses_start_step``: a bool, so that a
    compiled objective guards on a value that changes once). The model is a submodule: wrap the objective in DDP.
    """

    def __init__(self, model: nn.Module, multi_label: int = 0, multi_label_loss_weight: float = 1.0,
                 grounding_weight: float = 0.0, grounding_area: str = 'hard', group_word_weight: float = 0.0,
                 balance_weight: float = 0.0, balance_min_groups: float = 2.0, assign_temperature: float = 1.0,
                 npr: NPRLossSettings | None = None):
        super().__init__()
        self.model = model
        self.multi_label, self.multi_label_loss_weight = multi_label, multi_label_loss_weight
        self.grounding_weight, self.grounding_area = grounding_weight, grounding_area
        self.group_word_weight = group_word_weight
        self.balance_weight, self.balance_min_groups = balance_weight, balance_min_groups
        self.assign_temperature, self.npr = assign_temperature, npr
        self._body = self._compute

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, noun_losses: bool = True,
                npr_variant: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        variant = npr_variant or (self.npr.variant if self.npr else None)
        # the kernel choice is made here, outside the body: torch.compile cannot trace the ContextVar it sets, and a
        # graph break there would leave the whole body to eager execution (compile_losses compiles the body alone)
        with self.model.attention_kernels(images.device):
            return self._body(images, tokens, bool(noun_losses), variant)

    def compile_losses(self, **compile_kwargs) -> None:
        """``torch.compile`` the objective's body in place (``train.compile``; ``compile_kwargs`` go to
        ``torch.compile``). The attention kernel choice and the Hungarian matchings' host work stay outside the
        compiled graphs (graph breaks where the matchings start and where the losses need their results: a few
        graphs per step). Inference stays eager."""
        # inductor's own lowering code calls a deprecated torch helper, one FutureWarning per operator it lowers
        warnings.filterwarnings('ignore', message=r'`torch\._prims_common\.check` is deprecated',
                                category=FutureWarning)
        self._body = torch.compile(self._compute, **compile_kwargs)

    @torch.no_grad()
    def apply_updates(self, updates: dict[str, torch.Tensor]) -> None:
        """The prototype buffers' momentum step (the trainer calls it after each backward pass); a model in eval mode
        keeps its buffers."""
        if updates and self.model.training:
            self.model.update_prototypes(updates)

    # ------------------------------------------------------------------ the terms
    def _compute(self, images: torch.Tensor, tokens: torch.Tensor, noun_losses: bool, variant: str | None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model = self.model
        prompts = None
        if tokens.ndim == 3:
            if self.multi_label <= 0:
                raise ValueError(f'compute_losses: tokens of shape {tuple(tokens.shape)} carry prompts, but '
                                 f'model.multi_label is 0')
            tokens, prompts = tokens[:, 0], tokens[:, 1:]
        feats, image_embeds, pooled_groups = model.image_train_features(images)
        matches: list[MatchHandle] = []
        if self.npr is not None:
            model.check_variant(variant)
            # start the image matchings now; they finish while the text tower runs (one call for all stages:
            # under torch.compile each call is a graph break, and none may sit inside a loop)
            sims = [_cosine(stage.grouping.group_queries, stage.prototypes) for stage in feats.stages]
            matches = match_all_async(sims, maximize=variant == 'paper')
        text = model.text_train_features(tokens, prompts)
        losses = {'itc': contrastive_loss(image_embeds, text.text_embeds, model.logit_scale)}
        total = losses['itc']
        if prompts is not None and self.multi_label_loss_weight > 0:
            scale = getattr(model, 'multi_label_logit_scale', model.logit_scale)
            losses['multi_label'] = multi_label_contrastive_loss(image_embeds, text.prompt_embeds, scale)
            total = total + self.multi_label_loss_weight * losses['multi_label']
        nouns = prompts is not None and noun_losses
        grounding = nouns and self.grounding_weight > 0
        group_word = nouns and self.group_word_weight > 0
        # the final groups as inference classifies them, for the noun losses and the paper NPR text term
        group_embeds = pooled_groups
        if group_embeds is None and (grounding or group_word or (self.npr is not None and variant == 'paper')):
            group_embeds = model.frozen_group_embeds(feats)
        if grounding or group_word:
            area, valid = self._group_area(feats), _valid_prompts(tokens, prompts)
        if grounding:
            losses['grounding'] = noun_grounding_loss(group_embeds, text.prompt_embeds, valid, area,
                                                      model.logit_scale)
            total = total + self.grounding_weight * losses['grounding']
        if group_word:
            losses['group_word'] = group_word_loss(group_embeds, area, text.prompt_embeds, _prompt_keys(prompts),
                                                   valid, model.logit_scale)
            total = total + self.group_word_weight * losses['group_word']
        if self.balance_weight > 0:
            losses['balance'] = group_balance_loss(_final_group_usage(feats, self.assign_temperature),
                                                   self.balance_min_groups)
            total = total + self.balance_weight * losses['balance']
        updates: dict[str, torch.Tensor] = {}
        if self.npr is not None:
            # a statement of its own: the matching's graph breaks inside return here, and a resume point holding
            # ``losses.update`` (a new bound method every step) would recompile every step under torch.compile
            npr_losses, updates = self._prototype_losses(feats, group_embeds, tokens, text, matches, variant)
            losses.update(npr_losses)
            total = total + losses['npr']
        losses['loss'] = total
        return losses, updates

    @torch.no_grad()
    def _group_area(self, feats: ImageFeatures) -> torch.Tensor:
        """[B, G]: each final group's share of the patches in the noise-free assignment, the noun losses' group
        weights: the patches it wins (``grounding_area: hard``) or its mean soft assignment (``soft``, which lets a
        group that wins no patch stand for a noun)."""
        soft = patch_group_maps(feats)[-1]  # [B, N, G]
        if self.grounding_area == 'soft':
            return soft.mean(dim=1)
        return F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).float().mean(dim=1)

    def _prototype_losses(self, feats: ImageFeatures, group_embeds: torch.Tensor | None, tokens: torch.Tensor,
                          text, matches: list[MatchHandle], variant: str
                          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        npr, model = self.npr, self.model
        pair_score = 'column0' if variant == 'reference' else 'diagonal'
        log_scale = model.img_encoder.logit_scale
        out: dict[str, torch.Tensor] = {}
        image_terms = []
        # text term: its matching starts before the image matchings are joined
        text_side, text_stat = model.text_prototypes(variant, text, tokens)
        if variant == 'reference':
            # the release's channel mean of the last stage's pre-assign group tokens: [B, G, 1]
            group_side = feats.stages[-1].grouping.group_queries.mean(dim=-1, keepdim=True)
        else:
            group_side = group_embeds  # [B, G, D]: the final groups inference classifies
        text_match = match_async(_cosine(group_side, text_side), maximize=variant == 'paper')
        weights = npr.stage_weights if (variant == 'paper' and npr.stage_weights) else [1.0] * len(feats.stages)
        for k, (stage, indices) in enumerate(zip(feats.stages, join_all(matches))):
            matched = _gather_rows(stage.prototypes, indices)
            term = prototype_contrastive_loss(stage.grouping.group_queries, matched, log_scale,
                                              npr.hrs_threshold, pair_score)
            out[f'npr_image_{k}'] = term.detach()
            image_terms.append(weights[k] * term)
        text_term = prototype_contrastive_loss(group_side, _gather_rows(text_side, text_match.indices()), log_scale,
                                               npr.hrs_threshold, pair_score)
        out['npr_text'] = text_term.detach()
        out['npr'] = npr.weight * (sum(image_terms) + npr.text_weight * text_term)
        if variant == 'reference':  # the release updates only the scalar text prototypes
            updates = {'text_mu': text_stat.detach()}
        else:
            updates = {f'image_{k}': stage.prototypes.detach() for k, stage in enumerate(feats.stages)}
            updates['tokens'] = text_stat.detach()
        return out, updates


def build_objective(model: nn.Module) -> GroupSegObjective:
    """The objective a model's config describes (``model.cfg``: the loss weights and NPR settings)."""
    cfg = model.cfg
    npr = None
    if cfg.arch == 'pgseg':
        n = cfg.npr
        npr = NPRLossSettings(n.variant, n.weight, n.text_weight,
                              tuple(n.stage_weights) if n.stage_weights else None, n.hrs_threshold)
    return GroupSegObjective(model, multi_label=cfg.multi_label, multi_label_loss_weight=cfg.multi_label_loss_weight,
                             grounding_weight=cfg.grounding_weight, grounding_area=cfg.grounding_area,
                             group_word_weight=cfg.group_word_weight, balance_weight=cfg.balance_weight,
                             balance_min_groups=cfg.balance_min_groups,
                             assign_temperature=cfg.image.assign_temperature, npr=npr)


def _valid_prompts(tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """[B, K] bool: the prompts that name a noun (a padding prompt repeats the caption [B, L])."""
    return (prompts != tokens.unsqueeze(1)).any(dim=-1)


def _prompt_keys(prompts: torch.Tensor) -> torch.Tensor:
    """[B, K, L] token ids -> [B, K] int64 keys, equal for equal prompts (a fixed random linear hash: ids below 2^16
    times weights below 2^31, summed over at most a few hundred positions, stay far inside int64)."""
    weights = torch.randint(1, 2 ** 31 - 1, (prompts.shape[-1],), generator=torch.Generator().manual_seed(0))
    return (prompts.long() * weights.to(prompts.device)).sum(dim=-1)


def _final_group_usage(feats: ImageFeatures, temperature: float) -> torch.Tensor:
    """[B, G_final]: the share of each image's patches in each final group as inference splits them (the noise-free
    assignment's arg-max at every stage; the Gumbel noise of training would spread the patches by chance), with the
    straight-through gradient of the noise-free softmax of the logits times ``temperature`` (the model's
    assignment temperature: the gradient of the release's softmax, which a low temperature does not saturate)."""
    composed = None
    for stage in feats.stages:
        # the arg-max of the scaled softmax is the noise-free assignment's: [B, G_k, N_in]
        a = straight_through_hard((stage.grouping.logits.float() * temperature).softmax(dim=1), dim=1)
        composed = a if composed is None else a @ composed  # [B, G_k, N_patches]
    return composed.mean(dim=-1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, G, C] x [B, G', C] -> [B, G, G'] cosine similarity (no gradient needed: it only feeds the matching)."""
    with torch.no_grad(), torch.autocast(device_type=a.device.type, enabled=False):
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(1, 2)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, G, C], index: [B, G] -> x[b, index[b, i]] as [B, G, C]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
