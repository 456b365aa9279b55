"""Caption tokenisation: CLIP's BPE through open_clip (its vocabulary ships in the wheel: no network)."""
from __future__ import annotations

from typing import Sequence

import torch
from open_clip.tokenizer import tokenize as _clip_tokenize

__all__ = ['tokenize']


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
    """Texts -> LongTensor [N, context_length]: SOT, BPE ids, EOT, zero padding; too-long texts are cut and end in EOT.

    Cleaning as the official tokenizer: ftfy, HTML unescape, whitespace collapsed, lower case.
    """
    if isinstance(texts, str):
        texts = [texts]
    return _clip_tokenize(list(texts), context_length=context_length).long()
