"""The text tower: open_clip's causal ``TextTransformer`` (official key names) plus PGSeg's text prototypes."""
from __future__ import annotations

from typing import Literal

import torch
from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer

from .act_checkpoint import checkpoint_same_kernels
from .npr import ScalarTextPrototypes, TokenPrototypes

__all__ = ['TextEncoder', 'SOT_TOKEN', 'EOT_TOKEN']

SOT_TOKEN = 49406
EOT_TOKEN = 49407


class TextEncoder(TextTransformer):
    """CLIP text transformer: token + position embeddings, pre-LN blocks with a causal mask and QuickGELU,
    ``ln_final``, EOT pooling (the position of the largest token id). No projection here: the model's
    ``text_projector`` maps to the joint space.

    ``prototypes='reference'`` adds the released code's scalar text NPR (key ``Atten.mu``); ``'paper'`` adds token
    prototypes (key ``token_prototypes.mu``).
    """

    def __init__(self, context_length: int = 77, width: int = 256, layers: int = 12, heads: int | None = None,
                 vocab_size: int = 49408, prototypes: Literal['reference', 'paper'] | None = None,
                 num_prototypes: int = 8, em_iters: int = 10, momentum: float = 0.9):
        """Arguments as :class:`pgseg.config.TextEncoderConfig` (``heads=None``: width // 64, as the official
        code), plus the text prototypes of PGSeg's NPR variant and their EM settings."""
        heads = heads if heads is not None else max(1, width // 64)
        super().__init__(context_length=context_length, vocab_size=vocab_size, width=width,
                         heads=heads, layers=layers, output_dim=None, act_layer=QuickGELU,
                         norm_layer=LayerNorm, pool_type='argmax')
        if prototypes == 'reference':
            self.Atten = ScalarTextPrototypes(num_prototypes, em_iters, momentum)
        elif prototypes == 'paper':
            self.token_prototypes = TokenPrototypes(width, num_prototypes, em_iters, momentum)
        elif prototypes is not None:
            raise ValueError(f"text encoder: prototypes must be 'reference', 'paper' or None, got {prototypes!r}")

    def encode(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text: [B, L] token ids -> (EOT features [B, C], all token features after ln_final [B, L, C])."""
        if text.shape[1] > self.context_length:
            raise ValueError(f'text encoder: {text.shape[1]} tokens exceed the context length {self.context_length}')
        x = self.token_embedding(text) + self.positional_embedding[:text.shape[1]]
        mask = self.attn_mask[:text.shape[1], :text.shape[1]]
        if self._checkpointing and self.training and self.transformer.batch_first:
            for block in self.transformer.resblocks:
                x = checkpoint_same_kernels(block, x, None, None, mask)
        else:
            x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        return pooled, x

    _checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block, recomputed with the forward's attention kernels."""
        self._checkpointing = enable

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """text: [B, L] -> EOT features [B, C]."""
        return self.encode(text)[0]

    def no_weight_decay(self) -> set[str]:
        return {'positional_embedding'}


def valid_token_mask(text: torch.Tensor) -> torch.Tensor:
    """[B, L] True for the tokens a caption really has: after SOT, up to and including EOT (the largest id).
    Padding is found by position, since id 0 is also a real token ('!')."""
    positions = torch.arange(text.shape[1], device=text.device)
    return (positions <= text.argmax(dim=-1, keepdim=True)) & (positions > 0)
