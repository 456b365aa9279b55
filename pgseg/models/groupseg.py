"""The two-tower model (``MultiLabelContrastive`` in the official code): image and text encoders, projection heads,
logit scales; ``encode_image`` / ``encode_text`` / ``class_embeddings`` for inference, ``compute_losses`` for training.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import List, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import ConfigError, ModelConfig
from ..data.text import tokenize, trim_padding
from ..losses import (
    contrastive_loss,
    group_balance_loss,
    group_word_loss,
    multi_label_contrastive_loss,
    noun_grounding_loss,
    prototype_contrastive_loss,
)
from .attention import attention_kernel
from .grouping import straight_through_hard
from .image_encoder import GroupViTImageEncoder, ImageFeatures
from .matching import MatchHandle, join_all, match_all_async, match_async
from .projection import ProjectionMLP, frozen_bn_statistics
from .text_encoder import TextEncoder, valid_token_mask

__all__ = ['ImageOutput', 'GroupSegModel', 'build_model']

NPRVariant = Literal['reference', 'paper']


@dataclass
class ImageOutput:
    image_embeds: torch.Tensor  # [B, D] projected pooled embedding, not normalised
    group_embeds: torch.Tensor | None  # [B, G, D] projected final group tokens, not normalised
    group_maps: List[torch.Tensor]  # per grouping stage, [B, N_patches, G_k]: soft assignment composed from patches
    grid: tuple[int, int]  # patch grid (h, w), N_patches = h * w


class GroupSegModel(nn.Module):
    """GroupViT (``arch: groupvit``) or PGSeg (``arch: pgseg``). State-dict keys are the official ones."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        npr = cfg.npr
        self.is_pgseg = cfg.arch == 'pgseg'
        if self.is_pgseg and npr.variant == 'paper' and npr.num_text_prototypes != cfg.image.num_output_groups[-1]:
            raise ConfigError(f'model.npr.num_text_prototypes={npr.num_text_prototypes} must equal the final group '
                              f'count model.image.num_output_groups[-1]={cfg.image.num_output_groups[-1]} for the '
                              f"paper variant (text prototypes are matched one-to-one with groups)")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.contrast_temperature)))
        self.img_encoder = GroupViTImageEncoder(
            cfg.image, with_npr=self.is_pgseg, npr_iters=npr.em_iters, npr_momentum=npr.momentum,
            npr_hidden_dim=npr.mapping_hidden_dim, npr_temperature=npr.temperature,
            keep_mapping_text=self.is_pgseg and npr.variant == 'reference')
        self.text_encoder = TextEncoder(cfg.text, prototypes=npr.variant if self.is_pgseg else None,
                                        num_prototypes=npr.num_text_prototypes, em_iters=npr.em_iters,
                                        momentum=npr.momentum)
        self.img_projector = ProjectionMLP(self.img_encoder.width, cfg.output_dim, cfg.proj_hidden_dim,
                                           cfg.proj_num_layers)
        self.text_projector = ProjectionMLP(cfg.text.width, cfg.output_dim, cfg.proj_hidden_dim, cfg.proj_num_layers)
        num_grouping = len(cfg.image.num_output_groups)
        if npr.stage_weights is not None and len(npr.stage_weights) != num_grouping:
            raise ConfigError(f'model.npr.stage_weights has {len(npr.stage_weights)} entries; the image encoder has '
                              f'{num_grouping} grouping stages')
        if cfg.grounding_weight > 0 and cfg.multi_label <= 0:
            raise ConfigError(f'model.grounding_weight={cfg.grounding_weight} needs noun prompts: set '
                              f'model.multi_label to the number of prompts per caption (e.g. 3); it is '
                              f'{cfg.multi_label}')
        if cfg.group_word_weight > 0 and cfg.multi_label <= 0:
            raise ConfigError(f'model.group_word_weight={cfg.group_word_weight} needs noun prompts: set '
                              f'model.multi_label to the number of prompts per caption (e.g. 3); it is '
                              f'{cfg.multi_label}')
        if cfg.grounding_weight < 0 or cfg.group_word_weight < 0:
            raise ConfigError(f'model.grounding_weight and model.group_word_weight must be >= 0, got '
                              f'{cfg.grounding_weight} and {cfg.group_word_weight}')
        if cfg.grounding_area not in ('hard', 'soft'):
            raise ConfigError(f"model.grounding_area must be 'hard' or 'soft', got {cfg.grounding_area!r}")
        if cfg.balance_weight < 0 or cfg.balance_min_groups < 1:
            raise ConfigError(f'model.balance_weight must be >= 0 and model.balance_min_groups >= 1, got '
                              f'{cfg.balance_weight} and {cfg.balance_min_groups}')
        if cfg.image_pooling not in ('tokens', 'embeds'):
            raise ConfigError(f"model.image_pooling must be 'tokens' or 'embeds', got {cfg.image_pooling!r}")
        self.step = 0  # the training step, set by the trainer: the noun losses count from noun_losses_start_step
        if cfg.multi_label > 0 and not cfg.share_temperature:
            self.multi_label_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.contrast_temperature)))

    @property
    def step(self) -> int:
        """The training step, set by the trainer before each one (set it again after changing
        ``cfg.noun_losses_start_step``: the noun losses' switch is computed here)."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = int(value)
        # forward() reads this flag, not the step: under torch.compile (train.compile) a graph guards on the values
        # it reads, and an int that changes every step would recompile it every step; a bool changes once
        self._noun_losses_on = self._step >= self.cfg.noun_losses_start_step

    # ------------------------------------------------------------------ inference
    def encode_image(self, images: torch.Tensor, with_group_embeds: bool = True) -> ImageOutput:
        """images: normalised [B, 3, H, W] -> :class:`ImageOutput`."""
        with self.attention_kernels(images.device):
            feats = self.img_encoder(images)
        return self._image_output(feats, with_group_embeds)

    def _image_output(self, feats: ImageFeatures, with_group_embeds: bool) -> ImageOutput:
        image_embeds, group_embeds = self._project_image(feats)
        if group_embeds is None and with_group_embeds:
            group_embeds = self.img_projector(feats.tokens)
        return ImageOutput(image_embeds=image_embeds, group_embeds=group_embeds if with_group_embeds else None,
                           group_maps=_patch_group_maps(feats), grid=feats.grid)

    def _project_image(self, feats: ImageFeatures) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pooled image embedding [B, D] by ``model.image_pooling``, and the projected final groups [B, G, D]
        when that pooling already computed them (``embeds``), else None. In training mode the projection head's
        BatchNorm takes its statistics from what is projected here: the B means, or the B*G groups."""
        if self.cfg.image_pooling == 'embeds':
            group_embeds = self.img_projector(feats.tokens)
            return group_embeds.mean(dim=1), group_embeds
        return self.img_projector(feats.tokens.mean(dim=1)), None

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [N, L] CLIP BPE ids -> projected EOT embeddings [N, D], not normalised."""
        with self.attention_kernels(tokens.device):
            return self.text_projector(self.text_encoder(tokens))

    @torch.no_grad()
    def class_embeddings(self, names: Sequence[str], templates: Sequence[str] = ('a photo of a {}.',),
                         batch_size: int = 1024) -> torch.Tensor:
        """One embedding per class name [K, D], L2-normalised: the projected, unnormalised prompt embeddings are
        averaged over the templates, then normalised (§6.5). Runs in eval mode (BatchNorm running statistics)."""
        if not names or not templates:
            raise ValueError('class_embeddings needs at least one class name and one template')
        prompts = [t.format(n) for n in names for t in templates]
        device = self.logit_scale.device
        was_training = self.training
        self.eval()
        try:
            chunks = [self.encode_text(trim_padding(tokenize(prompts[i:i + batch_size],
                                                              self.cfg.text.context_length)).to(device))
                      for i in range(0, len(prompts), batch_size)]
        finally:
            self.train(was_training)
        embeds = torch.cat(chunks).float().reshape(len(names), len(templates), -1).mean(dim=1)
        return F.normalize(embeds, dim=-1)

    # ------------------------------------------------------------------ training
    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                npr_variant: NPRVariant | None = None) -> dict[str, torch.Tensor]:
        """The training losses (so that DDP wraps them): images [B, 3, H, W], tokens [B, L] or [B, 1+K, L]."""
        return self.compute_losses(images, tokens, npr_variant=npr_variant)

    def compute_losses(self, images: torch.Tensor, tokens: torch.Tensor,
                       npr_variant: NPRVariant | None = None) -> dict[str, torch.Tensor]:
        """images: [B, 3, H, W]; tokens: [B, L] captions, or [B, 1+K, L] caption + K noun prompts (multi-label).

        Returns ``itc``, for PGSeg ``npr`` (already weighted) and its unweighted parts ``npr_image_<k>`` and
        ``npr_text``, ``multi_label`` and ``grounding`` when enabled, and ``loss``, the sum to minimise.
        """
        # the kernel choice is made here, outside the body: torch.compile cannot trace the ContextVar it sets, and a
        # graph break there would leave the whole body to eager execution (compile_losses compiles the body alone)
        with self.attention_kernels(images.device):
            return self._compute_losses(images, tokens, npr_variant or self.cfg.npr.variant)

    def compile_losses(self, **compile_kwargs) -> None:
        """``torch.compile`` the training losses' computation in place (``train.compile``); ``compile_kwargs`` go to
        ``torch.compile`` (``backend``, ``mode``, ...). The attention kernel choice and the Hungarian matchings' host
        work stay outside the compiled graphs (graph breaks where the image and the text matchings start and where
        the losses need their results: a few graphs per step). Only :meth:`compute_losses` / :meth:`forward` are
        affected; inference stays eager."""
        # inductor's own lowering code calls a deprecated torch helper, one FutureWarning per operator it lowers
        warnings.filterwarnings('ignore', message=r'`torch\._prims_common\.check` is deprecated',
                                category=FutureWarning)
        self._compute_losses = torch.compile(self._compute_losses, **compile_kwargs)

    def attention_kernels(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The attention kernels for a forward pass (``model.attention``): pgseg's own attention (image tower,
        grouping blocks; ``models.attention``) and the SDPA backends of the text tower's ``nn.MultiheadAttention``.
        The backward pass follows the kernels the forward chose, so only forward calls need this."""
        choice = self.cfg.attention
        if choice == 'auto':
            # CPU bf16 training: matmuls + softmax (float32 logits, the product with v in bf16) beat the CPU flash
            # kernel, whose backward is slow (README, Performance); PyTorch's fused choice otherwise (also CPU
            # inference)
            cpu_bf16_training = (device.type == 'cpu' and torch.is_grad_enabled() and torch.is_autocast_enabled('cpu')
                                 and torch.get_autocast_dtype('cpu') == torch.bfloat16)
            choice = 'math' if cpu_bf16_training else 'fused'
        if choice not in ('math', 'fused'):
            raise ConfigError(f"model.attention must be 'auto', 'math' or 'fused', got {choice!r}")
        return _attention_context(choice)

    def _compute_losses(self, images: torch.Tensor, tokens: torch.Tensor, variant: str) -> dict[str, torch.Tensor]:
        prompts = None
        if tokens.ndim == 3:
            if self.cfg.multi_label <= 0:
                raise ValueError(f'compute_losses: tokens of shape {tuple(tokens.shape)} carry prompts, but '
                                 f'model.multi_label is 0')
            tokens, prompts = tokens[:, 0], tokens[:, 1:]
        feats = self.img_encoder(images)
        image_embeds, pooled_groups = self._project_image(feats)
        matches: list[MatchHandle] = []
        if self.is_pgseg:
            self._check_variant(variant)
            # start the image matchings now; they finish while the text tower runs (one call for all stages:
            # under torch.compile each call is a graph break, and none may sit inside a loop)
            sims = [_cosine(stage.grouping.group_queries, stage.prototypes) for stage in feats.stages]
            matches = match_all_async(sims, maximize=variant == 'paper')
        all_tokens = tokens if prompts is None else torch.cat([tokens.unsqueeze(1), prompts], dim=1)  # [B, (1+K,) L]
        pooled, token_feats = self.text_encoder.encode(all_tokens.flatten(0, -2))
        if prompts is None:
            text_embeds = self.text_projector(pooled)
        else:  # caption and prompts in one pass, one BatchNorm batch, as the official code
            embeds = self.text_projector(pooled).reshape(*all_tokens.shape[:2], -1)  # [B, 1+K, D]
            text_embeds, prompt_embeds = embeds[:, 0], embeds[:, 1:]
            pooled = pooled.reshape(*all_tokens.shape[:2], -1)[:, 0]
            token_feats = token_feats.reshape(*all_tokens.shape, -1)[:, 0]
        losses = {'itc': contrastive_loss(image_embeds, text_embeds, self.logit_scale)}
        total = losses['itc']
        if prompts is not None and self.cfg.multi_label_loss_weight > 0:
            scale = getattr(self, 'multi_label_logit_scale', self.logit_scale)
            losses['multi_label'] = multi_label_contrastive_loss(image_embeds, prompt_embeds, scale)
            total = total + self.cfg.multi_label_loss_weight * losses['multi_label']
        nouns = prompts is not None and self._noun_losses_on
        grounding = nouns and self.cfg.grounding_weight > 0
        group_word = nouns and self.cfg.group_word_weight > 0
        # the final groups as inference classifies them, for the noun losses and the paper NPR text term
        group_embeds = pooled_groups
        if group_embeds is None and (grounding or group_word or (self.is_pgseg and variant == 'paper')):
            group_embeds = self._frozen_group_embeds(feats)
        if grounding or group_word:
            area, valid = self._group_area(feats), _valid_prompts(tokens, prompts)
        if grounding:
            losses['grounding'] = noun_grounding_loss(group_embeds, prompt_embeds, valid, area, self.logit_scale)
            total = total + self.cfg.grounding_weight * losses['grounding']
        if group_word:
            losses['group_word'] = group_word_loss(group_embeds, area, prompt_embeds, _prompt_keys(prompts), valid,
                                                   self.logit_scale)
            total = total + self.cfg.group_word_weight * losses['group_word']
        if self.cfg.balance_weight > 0:
            losses['balance'] = group_balance_loss(_final_group_usage(feats, self.cfg.image.assign_temperature),
                                                   self.cfg.balance_min_groups)
            total = total + self.cfg.balance_weight * losses['balance']
        if self.is_pgseg:
            # a statement of its own: the matching's graph breaks inside return here, and a resume point holding
            # ``losses.update`` (a new bound method every step) would recompile every step under torch.compile
            npr_losses = self._prototype_losses(feats, group_embeds, tokens, pooled, token_feats, matches, variant)
            losses.update(npr_losses)
            total = total + losses['npr']
        losses['loss'] = total
        return losses

    def _frozen_group_embeds(self, feats: ImageFeatures) -> torch.Tensor:
        """The final groups projected [B, G, D], with the BatchNorm running statistics left alone (they belong to
        the pooled embedding inference also projects)."""
        with frozen_bn_statistics(self.img_projector):
            return self.img_projector(feats.tokens)

    @torch.no_grad()
    def _group_area(self, feats: ImageFeatures) -> torch.Tensor:
        """[B, G]: each final group's share of the patches in the noise-free assignment, the noun losses' group
        weights: the patches it wins (``grounding_area: hard``) or its mean soft assignment (``soft``, which lets a
        group that wins no patch stand for a noun)."""
        soft = _patch_group_maps(feats)[-1]  # [B, N, G]
        if self.cfg.grounding_area == 'soft':
            return soft.mean(dim=1)
        return F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).float().mean(dim=1)

    def _check_variant(self, variant: str) -> None:
        needs = {'reference': 'Atten', 'paper': 'token_prototypes'}
        if variant not in needs:
            raise ValueError(f"npr_variant must be 'reference' or 'paper', got {variant!r}")
        if not hasattr(self.text_encoder, needs[variant]):
            raise ValueError(f'this model was built for the {self.cfg.npr.variant!r} NPR variant and has no '
                             f'{variant!r} text prototypes; rebuild it with model.npr.variant={variant}')

    def _prototype_losses(self, feats: ImageFeatures, group_embeds: torch.Tensor | None, tokens: torch.Tensor,
                          pooled: torch.Tensor,
                          token_feats: torch.Tensor, matches: list[MatchHandle], variant: str) -> dict:
        npr = self.cfg.npr
        pair_score = 'column0' if variant == 'reference' else 'diagonal'
        log_scale = self.img_encoder.logit_scale
        out: dict[str, torch.Tensor] = {}
        image_terms = []
        # text term: its matching starts before the image matchings are joined
        if variant == 'reference':
            text_mu = self.text_encoder.Atten(pooled)  # [B, K, 1]
            # the release's channel mean of the last stage's pre-assign group tokens: [B, G, 1]
            group_side = feats.stages[-1].grouping.group_queries.mean(dim=-1, keepdim=True)
            text_side = text_mu
        else:
            protos, em_mu = self.text_encoder.token_prototypes(token_feats, valid_token_mask(tokens))
            group_side = group_embeds  # [B, G, D]: the final groups inference classifies
            with frozen_bn_statistics(self.text_projector):
                text_side = self.text_projector(protos)  # [B, K, D]
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
        if self.training:
            if variant == 'reference':  # the release updates only the scalar text prototypes
                self.text_encoder.Atten.momentum_update(text_mu)
            else:
                for layer, stage in zip(self.img_encoder.layers, feats.stages):
                    layer.downsample_spatial.momentum_update(stage.prototypes)
                self.text_encoder.token_prototypes.momentum_update(em_mu)
        return out

    # ------------------------------------------------------------------ utilities
    def no_weight_decay(self) -> set[str]:
        """Parameters that pgseg's default recipe does not decay (norms and biases are handled by the optimizer)."""
        names = {'logit_scale', 'multi_label_logit_scale'}
        names |= {f'img_encoder.{n}' for n in self.img_encoder.no_weight_decay()}
        names |= {f'text_encoder.{n}' for n in self.text_encoder.no_weight_decay()}
        return names & {n for n, _ in self.named_parameters()}

    def convert_sync_batchnorm(self) -> GroupSegModel:
        """Synchronise the projection heads' BatchNorm across ranks (GPUs only; the NPR heads stay per-rank)."""
        self.img_projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.img_projector)
        self.text_projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.text_projector)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.img_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)


@contextlib.contextmanager
def _attention_context(choice: str):
    """``math``: pgseg's matmul attention, SDPA's math backend for the text tower; ``fused``: PyTorch's choice."""
    with attention_kernel(choice):
        with sdpa_kernel(SDPBackend.MATH) if choice == 'math' else contextlib.nullcontext():
            yield


def _patch_group_maps(feats: ImageFeatures) -> list[torch.Tensor]:
    """Per grouping stage, the noise-free soft assignment composed down to the patches: [B, N_patches, G_k]."""
    maps: list[torch.Tensor] = []
    for stage in feats.stages:
        soft = stage.grouping.soft_map.transpose(1, 2)  # [B, N_in, G]
        maps.append(soft if not maps else maps[-1] @ soft)
    return maps


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


def build_model(cfg: ModelConfig) -> GroupSegModel:
    return GroupSegModel(cfg)
