"""Frozen dense-feature backbones for MVP-SEG prompt learning, behind one interface (:class:`DenseBackbone`).

- :class:`ClipDenseBackbone`: an open_clip CLIP model through MaskCLIP's value-embedding path. ResNet CLIPs: the trunk
  to res5, then the attention pool's value and output projections applied as 1x1 convolutions (query, key and the
  pool's positional embedding unused). ViT CLIPs: the last block with its query-key attention replaced by the value
  path (``out_proj(v_proj(ln_1(x)))``, residual and MLP kept), then ``ln_post`` and ``proj`` on every patch token.
  The training-free methods' rules for the last ViT block are options (``dense``, :data:`DENSE_RULES`;
  docs/protocols.md#training-free-clip-methods); any input size a multiple of the patch works (the positional
  embedding is resized bicubically to the input's patch grid).
- :class:`GroupSegDenseBackbone`: a pgseg GroupViT / PGSeg model. The feature of a patch is the mix of the final
  (projected, L2-normalised) group embeddings weighted by the patch's soft assignment to each group.

The text side is the backbone's own frozen text transformer; :meth:`DenseBackbone.encode_with_context` runs it on
token embeddings in which learnable context vectors replace placeholder tokens (CoOp), so gradients reach the
context and nothing else. Every backbone parameter is frozen and the backbone stays in eval mode.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.text import tokenize, trim_padding
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ['BackboneConfig', 'DenseBackbone', 'ClipDenseBackbone', 'GroupSegDenseBackbone', 'build_backbone',
           'CLIP_MEAN', 'CLIP_STD', 'DENSE_RULES']

# The last ViT block of each training-free method (x: the block's input tokens, CLS first; a = attention over
# ln_1(x) with head-dim^-0.5 scaling; o = out_proj):
#   maskclip:  x + o(v),                                   then + mlp(ln_2(.))   (MaskCLIP's release)
#   sclip:     x + o((softmax(q q^T) + softmax(k k^T)) v), then + mlp(ln_2(.))   (correlative self-attention)
#   clearclip: o(softmax(q q^T) v)                         (no residual, no MLP)
#   naclip:    o(softmax(k k^T + G) v)                     (no residual, no MLP; G a Gaussian over patch positions,
#                                                           std 5 patches, 0 on the CLS row and column)
DENSE_RULES = ('maskclip', 'sclip', 'clearclip', 'naclip')
NACLIP_GAUSSIAN_STD = 5.0

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class BackboneConfig:
    """Which frozen model gives pixel features and text embeddings.

    ``kind: clip``: ``name`` is an open_clip model name (RN50, ViT-B-16, ...) or ``model_config`` an open_clip model
    config dict (embed_dim, vision_cfg, text_cfg; for tiny test models); ``pretrained`` a local weights file or an
    open_clip pretrained tag already in the local cache (never downloaded: HF_HUB_OFFLINE), or null for random
    weights (tests only). ``quick_gelu`` picks the text and image towers' activation: OpenAI's CLIP weights were trained
    with QuickGELU, so a model built with nn.GELU under them gives wrong embeddings without any error; null takes the
    pretrained tag's own setting (True for ``openai``), True for OpenAI's own release files (``ViT-B-16.pt``,
    TorchScript archives, which are read too), and otherwise open_clip's default for ``name``; set it true for OpenAI
    weights saved as a plain state dict. ``kind: pgseg``: ``checkpoint`` a pgseg
    checkpoint directory (or a training run directory: its newest checkpoint) or an official .pth.
    """
    kind: str = 'pgseg'  # 'pgseg' or 'clip'
    checkpoint: str | None = None
    name: str | None = None
    pretrained: str | None = None
    model_config: dict[str, Any] | None = None
    quick_gelu: bool | None = None
    logit_scale: float | None = None  # None: the backbone's own (exp of its learned logit scale)
    dense: str = 'maskclip'  # kind: clip only: the last ViT block's rule (DENSE_RULES)


class DenseBackbone(nn.Module):
    """Interface. Subclasses set ``embed_dim`` (joint space D), ``token_dim`` (text width), ``context_length``,
    ``mean``/``std`` (input normalisation), ``logit_scale`` (the backbone's zero-shot logit scale), and implement
    :meth:`dense_features` and :meth:`_text_parts`."""

    embed_dim: int
    token_dim: int
    context_length: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    logit_scale: float

    def freeze(self) -> DenseBackbone:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> DenseBackbone:
        return super().train(False)  # always eval: BatchNorm statistics and dropout stay frozen

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the backbone's input normalisation."""
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> pixel features [B, D, h, w] in the joint space (not L2-normalised)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- text side
    def _text_parts(self) -> tuple[nn.Module, torch.Tensor, nn.Module, nn.Module, torch.Tensor | None,
                                   Callable[[torch.Tensor], torch.Tensor]]:
        """(token_embedding, positional_embedding, transformer, ln_final, attn_mask, project)."""
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return tokenize(texts, self.context_length).to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.buffers(), next(self.parameters())).device

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L] ids -> [N, L, token_dim] word embeddings (no positions)."""
        return self._text_parts()[0](tokens)

    def encode_with_context(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Word embeddings [N, L, token_dim] (context vectors already in place) and the ids they came from [N, L]
        (for the EOT position) -> projected text embeddings [N, D], not normalised."""
        _, pos, transformer, ln_final, mask, project = self._text_parts()
        L = embeddings.shape[1]
        x = embeddings + pos[:L].to(embeddings.dtype)
        x = transformer(x, attn_mask=mask[:L, :L] if mask is not None else None)
        x = ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # EOT: the largest id
        return project(pooled)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Plain prompts -> projected embeddings [N, D] (the hand-written template baseline)."""
        tokens = trim_padding(self.tokenize(texts))
        return self.encode_with_context(self.token_embeddings(tokens), tokens)


class ClipDenseBackbone(DenseBackbone):
    """An open_clip ``CLIP`` (ResNet or ViT image tower) with MaskCLIP's dense value-embedding features."""

    def __init__(self, clip: nn.Module, dense: str = 'maskclip'):
        super().__init__()
        if dense not in DENSE_RULES:
            raise ValueError(f'unknown dense rule {dense!r}; choose from {", ".join(DENSE_RULES)}')
        self.dense = dense
        if not hasattr(clip, 'token_embedding'):
            raise ValueError('ClipDenseBackbone needs an open_clip CLIP with a built-in text tower '
                             '(CustomTextCLIP / Hugging Face text towers are not supported)')
        self.clip = clip
        visual = clip.visual
        self.is_resnet = hasattr(visual, 'attnpool')
        if not self.is_resnet and not hasattr(visual, 'transformer'):
            raise ValueError(f'ClipDenseBackbone: unsupported image tower {type(visual).__name__} '
                             '(ResNet with attention pool, or ViT)')
        self.embed_dim = int(clip.text_projection.shape[1] if torch.is_tensor(clip.text_projection)
                             else clip.text_projection.out_features)
        self.token_dim = int(clip.token_embedding.embedding_dim)
        self.context_length = int(clip.context_length)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        self.logit_scale = float(clip.logit_scale.detach().exp())
        if self.is_resnet and dense != 'maskclip':
            raise ValueError(f'dense rule {dense!r} needs a ViT CLIP (ResNet CLIPs have the maskclip rule only)')
        self.freeze()

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        if self.is_resnet:
            x = visual.stem(images)
            x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))  # [B, C, h, w], stride 32
            pool = visual.attnpool
            v = F.conv2d(x, pool.v_proj.weight[:, :, None, None], pool.v_proj.bias)
            return F.conv2d(v, pool.c_proj.weight[:, :, None, None], pool.c_proj.bias)  # [B, D, h, w]
        patch = visual.patch_size
        if images.shape[-2] % patch[0] or images.shape[-1] % patch[1]:
            raise ValueError(f'ViT CLIP backbone: input {tuple(images.shape[-2:])} must be a multiple of the patch '
                             f'size {tuple(patch)} (pad it, or use sliding windows of such a size)')
        grid = (images.shape[-2] // patch[0], images.shape[-1] // patch[1])
        x = self._tokens(images, grid)  # [B, 1 + hw, width]
        blocks = visual.transformer.resblocks
        for blk in blocks[:-1]:
            x = blk(x)
        x = self._last_block(blocks[-1], x, grid)
        x = visual.ln_post(x[:, 1:])  # patch tokens only
        if visual.proj is not None:
            x = x @ visual.proj
        return x.transpose(1, 2).reshape(x.shape[0], -1, grid[0], grid[1])

    def _tokens(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The ViT's input tokens (open_clip's ``_embeds``), its positional embedding resized bicubically to ``grid``
        when the input is not the model's image size."""
        visual = self.clip.visual
        if tuple(grid) == tuple(visual.grid_size):
            return visual._embeds(images)
        x = visual.conv1(images).flatten(2).transpose(1, 2)  # [B, hw, width]
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = visual.positional_embedding.to(x.dtype)
        gh, gw = visual.grid_size
        patches = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode='bicubic', align_corners=False)
        pos = torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])
        x = torch.cat([cls, x], dim=1) + pos
        return visual.ln_pre(visual.patch_dropout(x))

    def _last_block(self, block: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The last block under the backbone's dense rule (:data:`DENSE_RULES`). x: [B, 1 + hw, width]."""
        attn = block.attn
        B, N, width = x.shape
        heads = attn.num_heads
        bias = attn.in_proj_bias if attn.in_proj_bias is not None else x.new_zeros(3 * width)
        q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, bias).chunk(3, dim=-1)
        if self.dense == 'maskclip':
            x = x + block.ls_1(attn.out_proj(v))  # the value path instead of query-key attention
            return x + block.ls_2(block.mlp(block.ln_2(x)))

        def split(t):  # [B, N, width] -> [B, heads, N, head_dim]
            return t.reshape(B, N, heads, width // heads).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        scale = (width // heads) ** -0.5

        def attend(a, b, extra=None):  # softmax(a b^T * scale (+ extra)) v
            logits = (a @ b.transpose(-2, -1)) * scale
            if extra is not None:
                logits = logits + extra
            return logits.softmax(dim=-1) @ v
        if self.dense == 'sclip':
            out = attend(q, q) + attend(k, k)
        elif self.dense == 'clearclip':
            out = attend(q, q)
        else:  # naclip
            out = attend(k, k, _gaussian_neighbourhood(grid, NACLIP_GAUSSIAN_STD, x.device, x.dtype))
        out = attn.out_proj(out.transpose(1, 2).reshape(B, N, width))
        if self.dense == 'sclip':
            x = x + block.ls_1(out)
            return x + block.ls_2(block.mlp(block.ln_2(x)))
        return out

    def _text_parts(self):
        clip = self.clip
        proj = clip.text_projection
        project = proj if isinstance(proj, nn.Linear) else (lambda x: x @ proj)
        return clip.token_embedding, clip.positional_embedding, clip.transformer, clip.ln_final, clip.attn_mask, \
            project


class GroupSegDenseBackbone(DenseBackbone):
    """A pgseg GroupViT / PGSeg model: pixel features from the final group embeddings and the soft group maps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.embed_dim = int(model.output_dim)
        self.token_dim = int(model.text_width)
        self.context_length = int(model.context_length)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.logit_scale = float(model.logit_scale.detach().exp())
        self.freeze()

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model.encode_image(images)
        groups = F.normalize(out.group_embeds.float(), dim=-1)  # [B, G, D]
        feats = out.group_maps[-1].float() @ groups  # [B, N, G] x [B, G, D] -> [B, N, D]
        h, w = out.grid
        return feats.transpose(1, 2).reshape(feats.shape[0], -1, h, w)

    def _text_parts(self):
        enc = self.model.text_encoder
        return enc.token_embedding, enc.positional_embedding, enc.transformer, enc.ln_final, enc.attn_mask, \
            self.model.text_projector

    def encode_with_context(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        with self.model.attention_kernels(embeddings.device):
            return super().encode_with_context(embeddings, tokens)


def _gaussian_neighbourhood(grid: tuple[int, int], std: float, device, dtype) -> torch.Tensor:
    """[1 + hw, 1 + hw] attention bias: exp(-d^2 / (2 std^2)) for patches at grid distance d, 0 on the CLS row and
    column."""
    ys, xs = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing='ij')
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).to(dtype)  # [hw, 2]
    bias = torch.zeros(1 + pos.shape[0], 1 + pos.shape[0], device=device, dtype=dtype)
    bias[1:, 1:] = torch.exp(-torch.cdist(pos, pos).pow(2) / (2 * std ** 2))
    return bias


def _load_clip(cfg: BackboneConfig) -> nn.Module:
    import open_clip
    tag_cfg = {}
    if cfg.pretrained and not os.path.isfile(cfg.pretrained) and cfg.name:
        tag_cfg = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained) or {}
    quick_gelu = cfg.quick_gelu
    if quick_gelu is None:  # the tag's setting; OpenAI's own TorchScript release files were all trained with it
        quick_gelu = bool(tag_cfg.get('quick_gelu', False)) or bool(
            cfg.pretrained and os.path.isfile(cfg.pretrained) and _is_torchscript(cfg.pretrained))
    if cfg.model_config is not None:
        values = dict(cfg.model_config)
        if cfg.quick_gelu is not None or quick_gelu:
            values['quick_gelu'] = quick_gelu
        model = open_clip.CLIP(embed_dim=values.pop('embed_dim'), vision_cfg=values.pop('vision_cfg'),
                               text_cfg=values.pop('text_cfg'), **values)
    elif cfg.name:
        model = open_clip.create_model(cfg.name, pretrained=None, force_quick_gelu=quick_gelu)
    else:
        raise ValueError('backbone.kind=clip needs backbone.name (an open_clip model name) or backbone.model_config')
    if cfg.pretrained:
        path = cfg.pretrained
        if not os.path.isfile(path):  # an open_clip pretrained tag: only from the local cache
            os.environ.setdefault('HF_HUB_OFFLINE', '1')
            url = tag_cfg.get('url', '')
            if url and not tag_cfg.get('hf_hub'):  # a tag served only by URL: its cache file, never a download
                cached = os.path.join(os.path.expanduser('~/.cache/clip'), os.path.basename(url))
                if not os.path.isfile(cached):
                    raise FileNotFoundError(f'backbone.pretrained={cfg.pretrained!r}: {cached} not found (pgseg '
                                            'never downloads weights; put the file there or pass its path)')
            try:
                path = open_clip.download_pretrained(tag_cfg)
            except Exception as exc:
                raise FileNotFoundError(f'backbone.pretrained={cfg.pretrained!r} is neither a file nor an open_clip '
                                        f'tag of {cfg.name!r} in the local cache ({exc})') from None
        if _is_torchscript(path):  # OpenAI's own release files: the weights inside a TorchScript archive
            # minus OpenAI's three size entries and the buffers that open_clip rebuilds (the causal attn_mask)
            rebuilt = {name for name, _ in model.named_buffers()} - set(model.state_dict())
            state = {k: v for k, v in torch.jit.load(path, map_location='cpu').state_dict().items()
                     if k not in ('input_resolution', 'context_length', 'vocab_size') and k not in rebuilt}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f'{path}: a TorchScript CLIP whose weights do not fit backbone.name={cfg.name!r} '
                                 f'(missing {missing[:5]}, unexpected {unexpected[:5]})')
        else:
            open_clip.load_checkpoint(model, path)
    return model


def _is_torchscript(path: str) -> bool:
    """True for a TorchScript archive (a zip with compiled code), which ``torch.load(weights_only=True)`` refuses."""
    import zipfile
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split('/', 1)[-1].startswith('code/') for name in archive.namelist())


def build_backbone(cfg: BackboneConfig, model: nn.Module | None = None) -> DenseBackbone:
    """A frozen backbone from its config (or around an already loaded pgseg ``model``)."""
    if cfg.kind == 'pgseg':
        if model is None:
            if not cfg.checkpoint:
                raise ValueError('backbone.kind=pgseg needs backbone.checkpoint (a pgseg checkpoint or official .pth)')
            from ..checkpoint import load_model
            model = load_model(cfg.checkpoint)  # a training run directory gives its newest checkpoint
        backbone: DenseBackbone = GroupSegDenseBackbone(model)
    elif cfg.kind == 'clip':
        backbone = ClipDenseBackbone(model if model is not None else _load_clip(cfg), dense=cfg.dense)
    else:
        raise ValueError(f"backbone.kind must be 'pgseg' or 'clip', got {cfg.kind!r}")
    if cfg.logit_scale is not None:
        backbone.logit_scale = float(cfg.logit_scale)
    return backbone
