"""MVP-SEG+'s student: a DeepLab network (segmentation_models_pytorch) whose classifier is fixed to the teacher's
class embeddings, so it stays open-vocabulary (docs/mvpseg.md#mvp-seg).

Shapes: B images, C classes, D the teacher's joint dimension, H x W the input.

    features = DeepLab(x)                  [B, D, H/4, W/4]   learned: encoder, decoder, 1x1 projection onto D
    logits   = <features, w_c>             [B, C, H/4, W/4]   w_c fixed: the teacher's fused class embedding
    logits   -> bilinear to H x W          [B, C, H, W]

``w_c`` is the sum over the k segmentation views of the normalised prompt embeddings of class c: the teacher sums
its views' cosine maps, and a sum of cosines against one normalised feature is the dot product with the sum of the
embeddings. Features are not normalised (MaskCLIP+'s ``norm_feat=False``): the network learns the logit scale. A
class named by ``background`` keeps a learned embedding instead (MaskCLIP+'s Pascal Context protocol).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint.format import write_file_atomically

log = logging.getLogger('pgseg.mvpseg')

__all__ = ['StudentConfig', 'Student', 'load_encoder_weights', 'save_student', 'load_student', 'retarget_student',
           'STUDENT_FORMAT']

STUDENT_FORMAT = 'pgseg-mvpseg-student'
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the ResNet encoders' input normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class StudentConfig:
    arch: Literal['deeplabv3plus', 'deeplabv3'] = 'deeplabv3plus'
    encoder: str = 'resnet101'  # any ResNet of segmentation_models_pytorch: resnet18, resnet34, resnet50, resnet101
    encoder_weights: str | None = None  # a local torchvision / timm ResNet state dict (ImageNet); null: from scratch
    output_stride: Literal[8, 16] = 8  # MaskCLIP+'s students are d8
    decoder_channels: int = 256
    dropout: float = 0.1  # in the ASPP module (mmseg's heads: 0.1 before the classifier; smp's default is 0.5)
    background: str | None = None  # a class whose embedding is learned, not the teacher's (Context: background)


class Student(nn.Module):
    """``student(images01) -> logits [B, C, H, W]`` over the classes of ``class_embeddings`` [C, D]."""

    def __init__(self, cfg: StudentConfig, class_embeddings: torch.Tensor, class_names: Sequence[str]):
        super().__init__()
        import segmentation_models_pytorch as smp

        if len(class_names) != class_embeddings.shape[0]:
            raise ValueError(f'{len(class_names)} class names for {class_embeddings.shape[0]} class embeddings')
        self.cfg, self.class_names = cfg, list(class_names)
        dim = class_embeddings.shape[1]
        common = dict(encoder_name=cfg.encoder, encoder_weights=None, encoder_output_stride=cfg.output_stride,
                      classes=dim, upsampling=1, decoder_aspp_dropout=cfg.dropout)
        if cfg.arch == 'deeplabv3plus':
            self.net = smp.DeepLabV3Plus(decoder_channels=cfg.decoder_channels, **common)
        elif cfg.arch == 'deeplabv3':
            self.net = smp.DeepLabV3(decoder_channels=cfg.decoder_channels, **common)
        else:
            raise ValueError(f"student.arch: {cfg.arch!r}; expected 'deeplabv3plus' or 'deeplabv3'")
        # the fixed classifier: a buffer, so no optimizer ever sees it and it is saved with the weights
        self.register_buffer('class_embeddings', class_embeddings.detach().float().clone())
        self.background_index = None
        if cfg.background is not None:
            if cfg.background not in self.class_names:
                raise ValueError(f'student.background: {cfg.background!r} is not a class of the dataset '
                                 f'({self.class_names[:8]}...)')
            self.background_index = self.class_names.index(cfg.background)
            self.background_embedding = nn.Parameter(class_embeddings[self.background_index].detach().float().clone())
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if cfg.encoder_weights:
            load_encoder_weights(self.net.encoder, cfg.encoder_weights)

    @property
    def stride(self) -> int:
        """Inputs are padded to a multiple of this (the encoder's deepest downsampling)."""
        return 32

    def classifier(self) -> torch.Tensor:
        """[C, D]: the fixed class embeddings, with the learned background row where there is one."""
        w = self.class_embeddings
        if self.background_index is not None:
            w = torch.cat([w[:self.background_index], self.background_embedding[None],
                           w[self.background_index + 1:]])
        return w

    def set_classes(self, names: Sequence[str], class_embeddings: torch.Tensor) -> None:
        """Classify ``names`` with the fixed embeddings [len(names), D] from now on (inference on another class
        list; the learned background row, if any, is expected inside ``class_embeddings``)."""
        self.class_names = list(names)
        self.class_embeddings = class_embeddings.detach().float().to(self.class_embeddings.device)
        self.background_index = None

    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """images in [0, 1] [B, 3, H, W] (H, W multiples of :attr:`stride`) -> [B, D, H/4, W/4]."""
        return self.net((images01 - self.mean) / self.std)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        H, W = images01.shape[-2:]
        ph, pw = -H % self.stride, -W % self.stride
        x = F.pad(images01, (0, pw, 0, ph), value=0.5) if ph or pw else images01
        feats = self.features(x)
        logits = torch.einsum('bdhw,cd->bchw', feats, self.classifier().to(feats.dtype))
        logits = F.interpolate(logits.float(), size=x.shape[-2:], mode='bilinear', align_corners=False)
        return logits[:, :, :H, :W]


def load_encoder_weights(encoder: nn.Module, path: str) -> None:
    """A local ImageNet ResNet state dict (torchvision's ``resnet101-*.pth``, a timm ResNet's, a checkpoint with a
    ``state_dict`` key, or a ``.safetensors`` file such as smp's) into the encoder; the classifier (``fc.*``) is
    dropped. Any missing encoder weight or unexpected key is an error naming the file: a silent partial load would
    train from scratch unnoticed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'student.encoder_weights: {path} does not exist (give a local ImageNet ResNet '
                                f'state dict, or null to train the encoder from scratch)')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location='cpu', weights_only=True)
    state = state.get('state_dict', state) if isinstance(state, dict) else state
    state = {k.removeprefix('module.').removeprefix('encoder.'): v for k, v in state.items()
             if not k.removeprefix('module.').startswith(('fc.', 'head.fc.'))}
    # nn.Module.load_state_dict itself: smp encoders override it and return nothing
    missing, unexpected = nn.Module.load_state_dict(encoder, state, strict=False)
    if missing or unexpected:
        raise ValueError(f'student.encoder_weights: {path} does not fit the encoder: missing {missing[:5]}'
                         f'{"..." if len(missing) > 5 else ""}, unexpected {unexpected[:5]}'
                         f'{"..." if len(unexpected) > 5 else ""} (is it a ResNet of the configured depth?)')
    log.info('student encoder initialised from %s', path)


def save_student(path: str, student: Student, meta: dict) -> None:
    """``student.pt``, written atomically: the config, the weights (fixed classifier included) and ``meta``
    (classes, unseen classes, the teacher's prompts file, evaluation sizes), enough for ``pgseg-eval --student`` and
    ``pgseg-segment``."""
    module = student.module if hasattr(student, 'module') else student
    cfg = asdict(module.cfg)
    cfg['encoder_weights'] = None  # the weights are in the file; the ImageNet start is not needed again
    payload = {'format': STUDENT_FORMAT, 'config': cfg, 'classes': module.class_names,
               'state_dict': {k: v.detach().cpu() for k, v in module.state_dict().items()}, 'meta': meta}
    write_file_atomically(path, lambda tmp: torch.save(payload, tmp))


def load_student(path: str, map_location: str | torch.device = 'cpu') -> tuple[Student, dict]:
    """(student in eval mode, meta) of a ``student.pt``; a run directory means its ``student.pt``."""
    if os.path.isdir(path):
        path = os.path.join(path, 'student.pt')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such student file (pgseg-transfer writes <output_dir>/student.pt)')
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get('format') != STUDENT_FORMAT:
        raise ValueError(f'{path}: not a pgseg-transfer student file (format {payload.get("format")!r} where '
                         f'{STUDENT_FORMAT!r} was expected)' if isinstance(payload, dict) else f'{path}: not a dict')
    cfg = StudentConfig(**payload['config'])
    state = payload['state_dict']
    student = Student(cfg, state['class_embeddings'], payload['classes'])
    student.load_state_dict(state)
    return student.eval(), payload['meta']


def retarget_student(student: Student, meta: dict, names: Sequence[str], checkpoint: str | None = None,
                     prompts: str | None = None) -> Student:
    """The student classifying ``names``: its own classifier rows for the classes it was trained on (the learned
    background included), and for any other name the teacher's fused prompt embedding, computed with the prompts
    file the student was trained from (``meta['prompts']``, or ``prompts`` when it has moved; ``checkpoint``
    replaces the backbone the prompts file names). The student is changed in place; retarget a fresh
    :func:`load_student` for each class list."""
    names = list(names)
    if names == student.class_names:
        return student
    rows = dict(zip(student.class_names, student.classifier().detach()))
    missing = [n for n in names if n not in rows]
    if missing:
        from .prompt_file import load_prompt_classifier
        from .pseudo_labels import fused_class_embeddings
        prompts = prompts or meta.get('prompts')
        if not prompts or not os.path.isfile(prompts):
            raise FileNotFoundError(f'classes {missing} are not among the student\'s {student.class_names}; embedding '
                                    f'them needs the teacher\'s prompts file {prompts!r}, which is not there '
                                    f'(give its new place with --prompts)')
        learner, backbone, _ = load_prompt_classifier(prompts, checkpoint or meta.get('teacher_backbone'))
        rows.update(zip(missing, fused_class_embeddings(learner, backbone, missing).to(student.class_embeddings)))
    student.set_classes(names, torch.stack([rows[n] for n in names]))
    return student
