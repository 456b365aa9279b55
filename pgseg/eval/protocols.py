"""Named evaluation protocols: every setting that changes a reported number travels with the protocol's name."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = ['Protocol', 'PROTOCOLS', 'get_protocol']


@dataclass(frozen=True)
class Protocol:
    name: str
    bg_thresh: dict[str, float] = field(default_factory=dict)  # adaptive background threshold per dataset
    bg_score: float | None = None  # constant background score (replaces the adaptive rule)
    templates: str = 'simple'
    short_side: int = 448
    long_side: int = 2048
    crop_size: int = 448
    stride: int = 224
    pamr: bool = False
    # extra prompts that stand for background ("grass", "sky", ...): they compete with the classes, and a pixel won
    # by one is background (on top of the threshold rule); only for datasets with a background class
    background_words: tuple[str, ...] = ()

    def background_for(self, dataset: str) -> tuple[float, bool]:
        """(value, constant?) for a dataset with a background class."""
        if self.bg_score is not None:
            return self.bg_score, True
        if dataset not in self.bg_thresh:
            raise ValueError(f'protocol {self.name!r} has no background threshold for {dataset!r}; pass --bg-thresh')
        return self.bg_thresh[dataset], False

    def describe(self) -> str:
        bg = (f'constant background score {self.bg_score}' if self.bg_score is not None else
              'background threshold ' + ', '.join(f'{k} {v}' for k, v in self.bg_thresh.items()))
        words = f', background words {", ".join(self.background_words)}' if self.background_words else ''
        return (f'{self.name}: short side {self.short_side} (long <= {self.long_side}), windows {self.crop_size}/'
                f'{self.stride}, templates {self.templates!r}, {bg}{words}, PAMR {"on" if self.pamr else "off"}')


PROTOCOLS = {
    # PGSeg's released evaluation configs (docs/fidelity.md#per-crop-scoring)
    'pgseg': Protocol('pgseg', {'voc': 0.95, 'context': 0.36, 'coco_object': 0.85}),
    # GroupViT's
    'groupvit': Protocol('groupvit', {'voc': 0.95, 'context': 0.35, 'coco_object': 0.95}),
    # the 8-benchmark protocol of later training-free work: a constant background score where a background
    # class exists (VOC, Context, COCO-Object), none elsewhere; PAMR refinement as an option (bench8_pamr)
    'bench8': Protocol('bench8', bg_score=0.5),
    'bench8_pamr': Protocol('bench8_pamr', bg_score=0.5, pamr=True),
}


def get_protocol(name: str, **overrides) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f'unknown protocol {name!r}; choose from {", ".join(PROTOCOLS)}')
    protocol = PROTOCOLS[name]
    return replace(protocol, **{k: v for k, v in overrides.items() if v is not None}) if overrides else protocol
