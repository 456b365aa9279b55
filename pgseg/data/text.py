"""Caption tokenisation: CLIP's BPE through open_clip (its vocabulary ships in the wheel: no network), and
GroupViT's multi-label noun prompts."""
from __future__ import annotations

import random
import re
from typing import Sequence

import torch
from open_clip.tokenizer import tokenize as _clip_tokenize

__all__ = ['tokenize', 'trim_padding', 'extract_prompt_words', 'CaptionTokenizer']


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
    """Texts -> LongTensor [N, context_length]: SOT, BPE ids, EOT, zero padding; too-long texts are cut and end in EOT.

    Cleaning as the official tokenizer: ftfy, HTML unescape, whitespace collapsed, lower case.
    """
    if isinstance(texts, str):
        texts = [texts]
    return _clip_tokenize(list(texts), context_length=context_length).long()


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L'] with L' = the last EOT position + 1 (EOT is the largest id). Exact for a causal text
    transformer: no position attends to a later one, so padding after every EOT changes neither the EOT embeddings
    nor the token features up to EOT (what PGSeg's token prototypes read); prompts then cost 4-6x less, web captions
    (about 12 of 77 tokens) about as much. One read of the lengths: call it on CPU tensors, before the copy to a GPU.
    """
    return tokens[..., :int(tokens.argmax(dim=-1).max()) + 1]


# Function words, common adjectives and the words captions use for the picture itself ("a photo of", "an image
# showing"). GroupViT keeps the words nltk tags as nouns or verbs; without a tagger (and its download) pgseg keeps
# the words that are none of these.
_STOPWORDS = frozenset("""
a an the this that these those there here it its it's they them their he she his her him we us our you your i me my
and or but nor so yet of in on at by for with without from to into onto over under above below near next beside
between behind before after up down out off about across along around through upon within against among toward
is are was were be been being am do does did has have had having will would can could should may might must shall
not no yes very too also just only some any all each every both few many much more most other such own same than
one two three four five six seven eight nine ten first second third several lots lot
red orange yellow green blue purple pink black white grey gray brown lime teal cyan magenta violet dark light
big small large little tiny huge tall short long old new young good bad nice pretty beautiful great best
what which who whom whose when where why how as if then while because like
picture pictures photo photos photograph image images drawing snapshot close-up shapes showing shows look see view
scene background front
""".split())


def extract_prompt_words(caption: str) -> list[str]:
    """Candidate nouns of a caption, in order, without duplicates."""
    words = re.findall(r"[a-z][a-z'-]+", caption.lower())
    seen, out = set(), []
    for w in words:
        if len(w) >= 3 and w not in _STOPWORDS and w not in seen:
            seen.add(w)
            out.append(w)
    return out


class CaptionTokenizer:
    """caption -> tokens [L], or with ``num_prompts`` K > 0, [1 + K, L]: the caption and K prompts made of distinct
    words of the caption, each in a random template; missing prompts are padded with the caption (as GroupViT)."""

    def __init__(self, context_length: int = 77, num_prompts: int = 0, templates: Sequence[str] = ('{}',)):
        self.context_length, self.num_prompts, self.templates = context_length, num_prompts, tuple(templates)

    def __call__(self, caption: str, rng: random.Random) -> torch.Tensor:
        if self.num_prompts <= 0:
            return tokenize(caption, self.context_length)[0]
        words = extract_prompt_words(caption)
        picked = rng.sample(words, min(self.num_prompts, len(words)))
        prompts = [rng.choice(self.templates).format(w) for w in picked]
        prompts += [caption] * (self.num_prompts - len(prompts))
        return tokenize([caption, *prompts], self.context_length)
