"""Configuration of MVP-SEG prompt learning (``pgseg-prompt-train --config configs/mvpseg_*.yaml key=value ...``)
and of MVP-SEG+'s transfer stage (``pgseg-transfer --config configs/mvpseg_plus_*.yaml key=value ...``).

Loaded with the same checks as the pretraining config (:func:`pgseg.config.load_structured`): unknown keys, wrong
types and missing values raise ``ConfigError`` naming the file and the key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Literal, Sequence

from ..config import LogConfig, load_structured
from .backbones import BackboneConfig
from .learner import PromptConfig
from .student import StudentConfig

__all__ = ['PromptDataConfig', 'PromptOptimConfig', 'PromptLossConfig', 'PromptLoopConfig', 'PromptCheckpointConfig',
           'PromptEvalConfig', 'PromptTrainConfig', 'load_prompt_config', 'TeacherConfig', 'TransferDataConfig',
           'TransferOptimConfig', 'PseudoLabelConfig', 'TransferEvalConfig', 'TransferConfig', 'load_transfer_config']


@dataclass
class PromptDataConfig:
    dataset: str = 'voc20'  # a reader of pgseg.eval.datasets (voc20, context, coco_stuff, ...)
    root: str = '${oc.env:PGSEG_EVAL_DATA,data/eval}'
    train_split: str = 'train'
    val_split: str = 'val'
    protocol: str = 'voc_15_5'  # voc_15_5, context_49_10, coco_stuff_156_15, or custom (then data.unseen)
    unseen: List[str] = field(default_factory=list)  # unseen class names for protocol custom
    crop_size: int = 512
    base_size: int | None = None  # short side before the random rescale; null = crop_size
    scale_range: List[float] = field(default_factory=lambda: [0.5, 2.0])
    batch_size: int = 8  # per process
    num_workers: int = 2


@dataclass
class PromptOptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    clip_grad: float | None = 1.0


@dataclass
class PromptLossConfig:
    seg_weight: float = 1.0  # lambda1: pixel cross-entropy of the refined masks
    cls_weight: float = 1.0  # lambda2: GPR presence BCE (ignored without GPR)
    oc_weight: float = 1.0  # lambda3: OCLoss


@dataclass
class PromptLoopConfig:
    steps: int = 2000  # the schedule's length
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps, the schedule unchanged
    precision: Literal['auto', 'fp32', 'bf16'] = 'auto'  # auto: bf16 where native, else fp32 (pgseg.runtime.precision)
    seed: int = 0
    output_dir: str = 'runs/mvpseg'
    time_limit_minutes: float | None = None
    max_nonfinite_steps: int = 20  # this many consecutive non-finite steps stop the run (NonFiniteLossError)


@dataclass
class PromptCheckpointConfig:
    every_steps: int = 500
    keep_last: int = 2
    resume: str | None = 'auto'  # 'auto': the newest ckpt-* in train.output_dir; a path; or null


@dataclass
class PromptEvalConfig:
    short_side: int = 512
    long_side: int = 2048
    crop_size: int = 512
    stride: int = 341
    limit: int | None = None  # first N validation images only
    templates: str = 'full'  # the hand-written baseline's template set (pgseg.eval.templates)
    every_steps: int = 0  # 0: evaluate only at the end
    baseline: bool = True  # also evaluate the hand-written template baseline at the end


@dataclass
class PromptTrainConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    optim: PromptOptimConfig = field(default_factory=PromptOptimConfig)
    loss: PromptLossConfig = field(default_factory=PromptLossConfig)
    train: PromptLoopConfig = field(default_factory=PromptLoopConfig)
    log: LogConfig = field(default_factory=lambda: LogConfig(wandb_project='pgseg-mvpseg'))
    checkpoint: PromptCheckpointConfig = field(default_factory=PromptCheckpointConfig)
    eval: PromptEvalConfig = field(default_factory=PromptEvalConfig)


def load_prompt_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> PromptTrainConfig:
    return load_structured(PromptTrainConfig, path, overrides)


# ---------------------------------------------------------------------------------------------- MVP-SEG+ transfer
@dataclass
class TeacherConfig:
    prompts: str = 'runs/mvpseg/prompts.pt'  # pgseg-prompt-train's prompts file (it names its backbone)
    checkpoint: str | None = None  # a pgseg backbone to use instead of the one the prompts file names
    gpr: bool = True  # GPR's presence score in the teacher's pseudo-labels


@dataclass
class TransferDataConfig(PromptDataConfig):
    cat_max_ratio: float | None = 0.75  # random crop: retry crops where one category covers this share or more
    photometric: bool = True  # mmseg's photometric distortion


@dataclass
class TransferOptimConfig:
    lr: float = 0.01  # SGD, MaskCLIP+ (VOC, COCO-Stuff; Context 0.004)
    momentum: float = 0.9
    weight_decay: float = 5e-4  # Context: 1e-4
    poly_power: float = 0.9  # lr = min_lr + (lr - min_lr) (1 - step / steps) ^ power
    min_lr: float = 1e-4
    clip_grad: float | None = None


@dataclass
class PseudoLabelConfig:
    self_train_from: int = 2000  # steps before this use the teacher's pseudo-labels (phase 1), later the student's
    confidence_threshold: float = 0.0  # 0 = off (MaskCLIP+); see pgseg.mvpseg.pseudo_labels
    presence_threshold: float = 0.0  # 0 = off


@dataclass
class TransferEvalConfig:
    short_side: int = 512  # whole-image inference at this short side (MaskCLIP+: single scale, no flip)
    long_side: int = 2048
    limit: int | None = None  # first N validation images only
    at_phase_switch: bool = True  # also evaluate the student when phase 1 ends
    teacher: bool = True  # also evaluate the teacher (learned prompts) and the hand-written templates
    templates: str = 'full'
    visualize: int = 6  # predictions.png: this many validation images, teacher and student side by side (0: none)
    teacher_short_side: int | None = None  # the teacher's sliding-window sizes; null: its prompts file's
    teacher_crop_size: int | None = None
    teacher_stride: int | None = None


@dataclass
class TransferConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: TransferDataConfig = field(default_factory=lambda: TransferDataConfig(batch_size=4))
    optim: TransferOptimConfig = field(default_factory=TransferOptimConfig)
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    train: PromptLoopConfig = field(default_factory=lambda: PromptLoopConfig(steps=20000,
                                                                             output_dir='runs/mvpseg_plus'))
    log: LogConfig = field(default_factory=lambda: LogConfig(wandb_project='pgseg-mvpseg-plus'))
    checkpoint: PromptCheckpointConfig = field(default_factory=lambda: PromptCheckpointConfig(every_steps=2000))
    eval: TransferEvalConfig = field(default_factory=TransferEvalConfig)


def load_transfer_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> TransferConfig:
    return load_structured(TransferConfig, path, overrides)
