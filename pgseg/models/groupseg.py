"""The two-tower model (``MultiLabelContrastive`` in the official code): image and text encoders, projection heads,
logit scales. ``encode_image`` / ``encode_text`` / ``class_embeddings`` for inference; for training, the features the
objective (:mod:`pgseg.losses.objective`) turns into losses, and the prototype buffers' momentum step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import List, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import ModelConfig, validate
from ..data.text import tokenize, trim_padding
from .attention import attention_kernel
from .image_encoder import GroupViTImageEncoder, ImageFeatures
from .projection import ProjectionMLP, frozen_bn_statistics
from .text_encoder import TextEncoder, valid_token_mask

__all__ = ['ImageOutput', 'TextFeatures', 'GroupSegModel', 'build_model', 'patch_group_maps']

NPRVariant = Literal['reference', 'paper']


@dataclass
class TextFeatures:
    """The text tower's training outputs for a batch of captions (and their noun prompts)."""
    text_embeds: torch.Tensor  # [B, D] projected captions, not normalised
    prompt_embeds: torch.Tensor | None  # [B, K, D] projected noun prompts (multi-label), or None
    pooled: torch.Tensor  # [B, C] the captions' EOT features before projection
    token_feats: torch.Tensor  # [B, L, C] the captions' token features


@dataclass
class ImageOutput:
    image_embeds: torch.Tensor  # [B, D] projected pooled embedding, not normalised
    group_embeds: torch.Tensor | None  # [B, G, D] projected final group tokens, not normalised
    group_maps: List[torch.Tensor]  # per grouping stage, [B, N_patches, G_k]: soft assignment composed from patches
    grid: tuple[int, int]  # patch grid (h, w), N_patches = h * w


class GroupSegModel(nn.Module):
    """GroupViT (``arch: groupvit``) or PGSeg (``arch: pgseg``). State-dict keys are the official ones.

    The model has no ``forward``: inference calls ``encode_image`` / ``encode_text`` / ``class_embeddings``, and
    training runs :class:`pgseg.losses.objective.GroupSegObjective`, which calls the feature methods below (and is
    what DDP wraps); ``compute_losses`` is the objective in one call."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate(cfg)  # the config's rules (pgseg.config.validate), also for configs built in code
        self.cfg = cfg
        npr = cfg.npr
        self.is_pgseg = cfg.arch == 'pgseg'
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.contrast_temperature)))
        self.img_encoder = GroupViTImageEncoder(
            **dataclasses.asdict(cfg.image), with_npr=self.is_pgseg, npr_iters=npr.em_iters,
            npr_momentum=npr.momentum, npr_hidden_dim=npr.mapping_hidden_dim, npr_temperature=npr.temperature,
            keep_mapping_text=self.is_pgseg and npr.variant == 'reference')
        self.text_encoder = TextEncoder(**dataclasses.asdict(cfg.text),
                                        prototypes=npr.variant if self.is_pgseg else None,
                                        num_prototypes=npr.num_text_prototypes, em_iters=npr.em_iters,
                                        momentum=npr.momentum)
        self.img_projector = ProjectionMLP(self.img_encoder.width, cfg.output_dim, cfg.proj_hidden_dim,
                                           cfg.proj_num_layers)
        self.text_projector = ProjectionMLP(cfg.text.width, cfg.output_dim, cfg.proj_hidden_dim, cfg.proj_num_layers)
        if cfg.multi_label > 0 and not cfg.share_temperature:
            self.multi_label_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.contrast_temperature)))
        # what the methods read; ``cfg`` stays as the record of what was built (checkpoints, the objective's weights)
        self.output_dim, self.context_length, self.text_width = cfg.output_dim, cfg.text.context_length, cfg.text.width
        self.image_pooling, self.attention = cfg.image_pooling, cfg.attention

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
                           group_maps=patch_group_maps(feats), grid=feats.grid)

    def _project_image(self, feats: ImageFeatures) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pooled image embedding [B, D] by ``model.image_pooling``, and the projected final groups [B, G, D]
        when that pooling already computed them (``embeds``), else None. In training mode the projection head's
        BatchNorm takes its statistics from what is projected here: the B means, or the B*G groups."""
        if self.image_pooling == 'embeds':
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
        averaged over the templates, then normalised (docs/fidelity.md#class-embeddings). Runs in eval mode (BatchNorm
        running statistics)."""
        if not names or not templates:
            raise ValueError('class_embeddings needs at least one class name and one template')
        prompts = [t.format(n) for n in names for t in templates]
        device = self.logit_scale.device
        was_training = self.training
        self.eval()
        try:
            chunks = [self.encode_text(trim_padding(tokenize(prompts[i:i + batch_size],
                                                              self.context_length)).to(device))
                      for i in range(0, len(prompts), batch_size)]
        finally:
            self.train(was_training)
        embeds = torch.cat(chunks).float().reshape(len(names), len(templates), -1).mean(dim=1)
        return F.normalize(embeds, dim=-1)

    # ------------------------------------------------------------------ training features
    def compute_losses(self, images: torch.Tensor, tokens: torch.Tensor, npr_variant: NPRVariant | None = None,
                       noun_losses: bool = True) -> dict[str, torch.Tensor]:
        """images: [B, 3, H, W]; tokens: [B, L] captions, or [B, 1+K, L] caption + K noun prompts (multi-label).

        Returns ``itc``, for PGSeg ``npr`` (already weighted) and its unweighted parts ``npr_image_<k>`` and
        ``npr_text``, ``multi_label`` and the noun losses when enabled (``noun_losses``), and ``loss``, the sum to
        minimise: the objective of :mod:`pgseg.losses.objective` over this model. The prototype buffers are left
        alone: the trainer moves them after the backward pass (:func:`pgseg.training.step.train_step`).
        """
        from ..losses.objective import build_objective
        losses, _ = build_objective(self)(images, tokens, noun_losses=noun_losses, npr_variant=npr_variant)
        return losses

    def image_train_features(self, images: torch.Tensor) -> tuple[ImageFeatures, torch.Tensor, torch.Tensor | None]:
        """The image tower in training: (encoder features, pooled embedding [B, D], projected final groups
        [B, G, D] when the pooling computed them, else None)."""
        feats = self.img_encoder(images)
        image_embeds, pooled_groups = self._project_image(feats)
        return feats, image_embeds, pooled_groups

    def text_train_features(self, tokens: torch.Tensor, prompts: torch.Tensor | None) -> TextFeatures:
        """Captions [B, L] and noun prompts [B, K, L] (or None) in one pass of the text tower: one BatchNorm batch
        in the projection head, as the official code."""
        all_tokens = tokens if prompts is None else torch.cat([tokens.unsqueeze(1), prompts], dim=1)  # [B, (1+K,) L]
        pooled, token_feats = self.text_encoder.encode(all_tokens.flatten(0, -2))
        if prompts is None:
            return TextFeatures(self.text_projector(pooled), None, pooled, token_feats)
        embeds = self.text_projector(pooled).reshape(*all_tokens.shape[:2], -1)  # [B, 1+K, D]
        return TextFeatures(embeds[:, 0], embeds[:, 1:], pooled.reshape(*all_tokens.shape[:2], -1)[:, 0],
                            token_feats.reshape(*all_tokens.shape, -1)[:, 0])

    def frozen_group_embeds(self, feats: ImageFeatures) -> torch.Tensor:
        """The final groups projected [B, G, D], with the BatchNorm running statistics left alone (they belong to
        the pooled embedding inference also projects)."""
        with frozen_bn_statistics(self.img_projector):
            return self.img_projector(feats.tokens)

    def text_prototypes(self, variant: str, text: TextFeatures, tokens: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text side of the NPR text term and the batch statistic its momentum update follows.

        ``reference``: the release's scalar prototypes of the EOT feature [B, K, 1], which are also the statistic;
        ``paper``: K token prototypes per caption, projected like text [B, K, D], and their EM means."""
        if variant == 'reference':
            text_mu = self.text_encoder.Atten(text.pooled)  # [B, K, 1]
            return text_mu, text_mu
        protos, em_mu = self.text_encoder.token_prototypes(text.token_feats, valid_token_mask(tokens))
        with frozen_bn_statistics(self.text_projector):
            return self.text_projector(protos), em_mu  # [B, K, D]

    def check_variant(self, variant: str) -> None:
        """An NPR variant needs its text prototypes: ``reference`` the release's scalar ones, ``paper`` the token
        prototypes (official key names)."""
        needs = {'reference': 'Atten', 'paper': 'token_prototypes'}
        if variant not in needs:
            raise ValueError(f"npr_variant must be 'reference' or 'paper', got {variant!r}")
        if not hasattr(self.text_encoder, needs[variant]):
            raise ValueError(f'this model was built for the {self.cfg.npr.variant!r} NPR variant and has no '
                             f'{variant!r} text prototypes; rebuild it with model.npr.variant={variant}')

    @torch.no_grad()
    def update_prototypes(self, updates: dict[str, torch.Tensor]) -> None:
        """The prototype buffers' momentum step, from the batch statistics the objective returns (training only,
        after the backward pass): ``text_mu`` (reference: the release updates only its scalar text prototypes), or
        ``image_<k>`` for each grouping stage k and ``tokens`` (paper). Every rank ends with the same buffers."""
        if 'text_mu' in updates:
            self.text_encoder.Atten.momentum_update(updates['text_mu'])
            return
        for k, layer in enumerate(self.img_encoder.layers):  # stage k's prototypes belong to layer k
            if f'image_{k}' in updates:
                layer.downsample_spatial.momentum_update(updates[f'image_{k}'])
        if 'tokens' in updates:
            self.text_encoder.token_prototypes.momentum_update(updates['tokens'])

    def attention_kernels(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The attention kernels for a forward pass (``model.attention``): pgseg's own attention (image tower,
        grouping blocks; ``models.attention``) and the SDPA backends of the text tower's ``nn.MultiheadAttention``.
        The backward pass follows the kernels the forward chose, so only forward calls need this."""
        choice = self.attention
        if choice == 'auto':
            # CPU bf16 training: matmuls + softmax in bf16 around each row's maximum beat the CPU flash kernel, whose
            # backward is slow, and the float32-logit matmuls, whose softmax and casts move four times the bytes
            # (docs/performance.md#attention-on-the-cpu); PyTorch's fused choice otherwise (also CPU inference)
            cpu_bf16_training = (device.type == 'cpu' and torch.is_grad_enabled() and torch.is_autocast_enabled('cpu')
                                 and torch.get_autocast_dtype('cpu') == torch.bfloat16)
            choice = 'shifted' if cpu_bf16_training else 'fused'
        return _attention_context(choice)

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
    """``math`` and ``shifted``: pgseg's matmul attention, SDPA's math backend for the text tower (the CPU flash
    kernel's backward is slow: docs/performance.md#attention-on-the-cpu); ``fused``: PyTorch's choice."""
    with attention_kernel(choice):
        with sdpa_kernel(SDPBackend.MATH) if choice in ('math', 'shifted') else contextlib.nullcontext():
            yield


def patch_group_maps(feats: ImageFeatures) -> list[torch.Tensor]:
    """Per grouping stage, the noise-free soft assignment composed down to the patches: [B, N_patches, G_k]."""
    maps: list[torch.Tensor] = []
    for stage in feats.stages:
        soft = stage.grouping.soft_map.transpose(1, 2)  # [B, N_in, G]
        maps.append(soft if not maps else maps[-1] @ soft)
    return maps


def build_model(cfg: ModelConfig) -> GroupSegModel:
    return GroupSegModel(cfg)
