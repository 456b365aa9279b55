"""Prompt templates (docs/fidelity.md#class-embeddings, docs/protocols.md): the sets the reproduced codes name, as
format strings."""
from __future__ import annotations

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

__all__ = ['TEMPLATES', 'get_templates']

TEMPLATES: dict[str, tuple[str, ...]] = {
    'simple': ('a photo of a {}.',),  # segmentation evaluation
    'subset': ('itap of a {}.', 'a bad photo of a {}.', 'a origami {}.', 'a photo of the large {}.',
               'a {} in a video game.', 'art of the {}.', 'a photo of the small {}.'),  # ImageNet evaluation
    'full': tuple(t('{}') for t in OPENAI_IMAGENET_TEMPLATES),  # CLIP's 80 ImageNet templates (multi-label prompts)
    'identity': ('{}',),
    # the 8-benchmark protocol's: 'subset' plus two (the released code's "custom" set)
    'tcl': ('itap of a {}.', 'a bad photo of a {}.', 'a origami {}.', 'a photo of the large {}.',
            'a {} in a video game.', 'art of the {}.', 'a photo of the small {}.', 'a photo of many {}.',
            'a photo of {}s.'),
}


def get_templates(name: str) -> tuple[str, ...]:
    if name not in TEMPLATES:
        raise ValueError(f'unknown template set {name!r}; choose from {sorted(TEMPLATES)}')
    return TEMPLATES[name]
