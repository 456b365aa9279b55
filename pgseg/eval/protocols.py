"""Named evaluation protocols: every setting that changes a reported number travels with the protocol's name
(docs/protocols.md: the table of every protocol and the code it reproduces)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = ['Protocol', 'PROTOCOLS', 'get_protocol']


@dataclass(frozen=True)
class Protocol:
    name: str
    bg_thresh: dict[str, float] = field(default_factory=dict)  # adaptive background threshold per dataset
    bg_score: float | None = None  # constant background score (replaces the adaptive rule)
    templates: str = 'simple'
    class_names: str = 'pgseg'  # the prompt names of the official datasets (eval/classes.py NAMINGS)
    short_side: int = 448
    long_side: int = 2048
    crop_size: int = 448
    stride: int = 224
    # PAMR refinement: 'off'; 'window': inside each window on the patch-grid scores, before upsampling (the
    # 8-benchmark code's); 'image': once on the full-size scores against the original image
    pamr: str = 'off'
    reproduces: str = ''  # the code whose evaluation this is
    # extra prompts that stand for background ("grass", "sky", ...): they compete with the classes, and a pixel won
    # by one is background (on top of the threshold rule); only for datasets with a background class
    background_words: tuple[str, ...] = ()

    def __post_init__(self):
        if self.pamr not in ('off', 'window', 'image'):
            raise ValueError(f"protocol {self.name!r}: pamr={self.pamr!r}; expected 'off', 'window' or 'image'")

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
        pamr = {'off': 'off', 'window': 'in each window', 'image': 'on the full-size scores'}[self.pamr]
        return (f'{self.name}: short side {self.short_side} (long <= {self.long_side}), windows {self.crop_size}/'
                f'{self.stride}, templates {self.templates!r}, class names {self.class_names!r}, {bg}{words}, '
                f'PAMR {pamr}')


PROTOCOLS = {
    # PGSeg's released evaluation configs (docs/fidelity.md#per-crop-scoring)
    'pgseg': Protocol('pgseg', {'voc': 0.95, 'context': 0.36, 'coco_object': 0.85}, reproduces='PGSeg'),
    # GroupViT's
    'groupvit': Protocol('groupvit', {'voc': 0.95, 'context': 0.35, 'coco_object': 0.95}, class_names='groupvit',
                         reproduces='GroupViT'),
    # the 8-benchmark protocol of TCL and later work: a constant background score where a background class exists
    # (VOC, Context, COCO-Object; 0.5 without PAMR, 0.4 with it), none elsewhere; nine templates; mmseg's class names
    'bench8': Protocol('bench8', bg_score=0.5, templates='tcl', class_names='mmseg', reproduces='TCL'),
    'bench8_pamr': Protocol('bench8_pamr', bg_score=0.4, templates='tcl', class_names='mmseg', pamr='window',
                            reproduces='TCL'),
    # a pgseg option, not a published protocol: as bench8_pamr, with PAMR once on the full-size scores (for
    # GroupViT-style models, whose patch grid is coarser than the 8-benchmark code's masks; docs/protocols.md#pamr)
    'bench8_pamr_image': Protocol('bench8_pamr_image', bg_score=0.4, templates='tcl', class_names='mmseg',
                                  pamr='image', reproduces='pgseg option'),
}


def get_protocol(name: str, **overrides) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f'unknown protocol {name!r}; choose from {", ".join(PROTOCOLS)}')
    protocol = PROTOCOLS[name]
    return replace(protocol, **{k: v for k, v in overrides.items() if v is not None}) if overrides else protocol
