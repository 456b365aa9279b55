"""Typed configuration: a dataclass tree, loaded from YAML plus ``key=value`` overrides.

Configuration flows one way: CLI -> :class:`TrainConfig` -> builders. Below the builders, functions take explicit
arguments. Unknown keys, wrong types and missing required values raise :class:`ConfigError` naming the key.

Defaults are the official PGSeg recipe (docs/fidelity.md#architecture, docs/fidelity.md#training-data,
docs/fidelity.md#training-loop) unless a comment says otherwise.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, List, Literal, Sequence

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

__all__ = [
    'ConfigError', 'ImageEncoderConfig', 'TextEncoderConfig', 'NPRConfig', 'ModelConfig', 'DataSourceConfig',
    'DataConfig', 'OptimConfig', 'TrainLoopConfig', 'LogConfig', 'CheckpointConfig', 'EvalConfig', 'TrainConfig',
    'load_config', 'load_structured', 'load_model_config', 'model_config_from_dict', 'config_to_dict', 'config_to_yaml',
]


class ConfigError(ValueError):
    """A configuration file or override is invalid. The message names the file, the key and what was expected."""


@dataclass
class ImageEncoderConfig:
    """GroupViT image encoder: patch embedding, stages of ViT blocks with group tokens, grouping blocks."""
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    embed_factors: List[int] = field(default_factory=lambda: [1, 1, 1])
    depths: List[int] = field(default_factory=lambda: [6, 3, 3])
    num_heads: List[int] = field(default_factory=lambda: [6, 6, 6])
    num_group_tokens: List[int] = field(default_factory=lambda: [64, 8, 0])
    num_output_groups: List[int] = field(default_factory=lambda: [64, 8])
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    patch_norm: bool = True
    hard_assignment: bool = True  # straight-through hard one-hot (with Gumbel noise in training)
    gumbel: bool = True  # add Gumbel noise to the assignment logits in training
    gumbel_tau: float = 1.0
    assign_eps: float = 1.0
    # temperature of the assignment logits q.k / sqrt(C): 1.0 as released. Below 1 the logits outgrow the Gumbel noise
    # (std 1.28), which otherwise decides a from-scratch assignment (docs/demo.md#diagnosis-1-grouping-runs-1-10)
    assign_temperature: float = 1.0
    # gain on each group's mean of its assigned tokens, before the group token (query) is added back: 1.0 as
    # released. At init the query, which has attended to the whole image, dwarfs the assigned mean at small widths
    # (docs/demo.md#diagnosis-3-why-the-groups-carry-the-whole-image-runs-15-17)
    assign_gain: float = 1.0
    grad_checkpointing: bool = False  # activation checkpointing of every ViT block (saves memory, costs compute)


@dataclass
class TextEncoderConfig:
    """CLIP-style causal text transformer (open_clip's TextTransformer, QuickGELU, EOT pooling)."""
    context_length: int = 77
    width: int = 256
    layers: int = 12
    heads: int | None = None  # None: width // 64, as the official code
    vocab_size: int = 49408


@dataclass
class NPRConfig:
    """PGSeg's non-learnable prototype regularisation (docs/fidelity.md#prototype-regularisation).

    ``variant: reference`` reproduces the released code, bugs included; ``paper`` does what the paper describes
    (docs/fidelity.md#paper-versus-released-code).
    """
    variant: Literal['reference', 'paper'] = 'paper'
    em_iters: int = 10
    momentum: float = 0.9
    weight: float = 0.1  # 'para' in the official code: loss_pg = weight * (L1 + L2 + text_weight * L3)
    text_weight: float = 0.1
    hrs_threshold: float = 0.1
    temperature: float = 0.1  # initial 1/exp(img_encoder.logit_scale) of the prototype contrastive loss
    mapping_hidden_dim: int = 4096  # hidden width of the reconstruction MLP (mapping_x)
    num_text_prototypes: int = 8  # reference: scalar text prototypes; paper: must equal the final group count
    stage_weights: List[float] | None = None  # paper only: per-stage image-term weights; None = all 1


@dataclass
class ModelConfig:
    arch: Literal['pgseg', 'groupvit'] = 'pgseg'
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    npr: NPRConfig = field(default_factory=NPRConfig)
    output_dim: int = 256
    proj_hidden_dim: int = 4096
    proj_num_layers: int = 2
    contrast_temperature: float = 0.07
    multi_label: int = 0  # number of noun prompts per caption for GroupViT's multi-label loss; 0 = off
    multi_label_loss_weight: float = 1.0  # 0 skips GroupViT's multi-label loss but keeps the prompts (for grounding)
    # pgseg extension, not in GroupViT or PGSeg (0 = off, the official recipes): weight of the within-image noun
    # grounding loss (losses.noun_grounding_loss) on the final groups; it reads the model.multi_label noun prompts
    grounding_weight: float = 0.0
    grounding_area: Literal['hard', 'soft'] = 'hard'  # noun losses' group weights: share of patches won, or mean soft
    # pgseg extension (0 = off, the official recipes): weight of the cross-image noun-to-group loss
    # (losses.group_word_loss: each noun prompt must find its own image by that image's best final group); it reads
    # the model.multi_label noun prompts
    group_word_weight: float = 0.0
    # the training step from which the two noun losses (grounding_weight, group_word_weight) count: before it the
    # grouping forms under the other losses alone (the trainer passes each step whether it has come)
    noun_losses_start_step: int = 0
    # pgseg extension (0 = off, the official recipes): weight of the group-balance loss (losses.group_balance_loss),
    # which asks every image to spread its patches over at least balance_min_groups final groups (the exponential
    # of the entropy of the patches' shares as inference splits them, without the Gumbel noise of training), against
    # the collapse into one group
    balance_weight: float = 0.0
    balance_min_groups: float = 3.0
    share_temperature: bool = False
    # pgseg option, not in GroupViT or PGSeg: where the image embedding pools the final groups. 'tokens' (the
    # release): project the groups' mean, so the projection head's BatchNorm learns the statistics of means while
    # inference projects each group alone; 'embeds': project every group and average the projections, so training
    # and inference put the same kind of input through the head
    image_pooling: Literal['tokens', 'embeds'] = 'tokens'
    # attention kernels: 'math' = two batched matmuls and a softmax, the logits and softmax in float32 and the product
    # with v in the autocast dtype (image tower, grouping blocks; SDPA's math backend for the text tower); 'shifted' =
    # the same matmuls in the autocast dtype throughout, the logits computed around each row's maximum so that they
    # keep float32-like precision where the softmax weighs them (models/attention.py); 'fused' = PyTorch's fused
    # choice (flash / memory-efficient / cuDNN); 'auto' = 'shifted' when training on the CPU under bf16 autocast (the
    # CPU flash kernel's backward is slow, float32 logits move four times the bytes:
    # docs/performance.md#attention-on-the-cpu), 'fused' otherwise (GPUs, and CPU inference)
    attention: Literal['auto', 'math', 'shifted', 'fused'] = 'auto'


@dataclass
class DataSourceConfig:
    """One data source: webdataset shards (a brace pattern) or a file list (CSV / TSV / JSONL of image paths and
    captions), its sampling weight."""
    name: str = MISSING
    pattern: str = MISSING  # shards: ${oc.env:PGSEG_DATA}/gcc3m_shards/{000000..000331}.tar; files: the list's path
    length: int | None = None  # None: from sizes.json or img2dataset's *_stats.json beside the shards (they win)
    weight: float = 1.0  # sampling weight in resampled mode; without resampling every shard is read once per pass
    type: Literal['shards', 'files'] = 'shards'
    image_column: str = 'filepath'  # files: the columns (JSONL keys) of the image path (relative to the list) ...
    caption_column: str = 'title'  # ... and of the caption (open_clip's CSV defaults)


@dataclass
class DataConfig:
    sources: List[DataSourceConfig] = field(default_factory=list)
    batch_size: int = 1024  # per process
    num_workers: int = 8
    img_size: int = 224
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    augment: Literal['official_pgseg', 'official_groupvit', 'none'] = 'official_pgseg'
    shuffle_buffer: int = 10000
    resampled: bool = False
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    decay_set: Literal['pgseg', 'official'] = 'pgseg'  # 'official' also decays logit scales, pos/group tokens
    clip_grad: float | None = 5.0
    scale_lr_with_batch: bool = False  # GroupViT: lr * global_batch / 4096
    warmup_prefix: bool = True  # False reproduces the official LR drop at the end of warmup


@dataclass
class TrainLoopConfig:
    epochs: int = 30
    warmup_epochs: int = 10
    steps_per_epoch: int | None = None  # None: total samples // global batch
    # auto: bf16 where the device multiplies it natively, else fp16 on a GPU, fp32 on a CPU (pgseg.runtime.precision)
    precision: Literal['auto', 'fp32', 'bf16', 'fp16'] = 'auto'
    grad_accum_steps: int = 1
    seed: int = 0
    output_dir: str = 'runs/${oc.env:PGSEG_RUN_NAME,pgseg}'
    max_nonfinite_steps: int = 20  # stop with an error after this many non-finite steps in a row
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimizer steps
    time_limit_minutes: float | None = None  # stop (with a checkpoint) once training has run this long
    # measure the step time over steps 10-30 and shorten the schedule (its cosine included) to the steps that fit in
    # train.time_limit_minutes, so that a slower machine still finishes its schedule instead of being cut mid-decay
    fit_schedule_to_time_limit: bool = False
    find_unused_parameters: bool = False
    # torch.compile the training objective's body (GroupSegObjective.compile_losses, inductor): the first step
    # compiles, and once more where the caption length first changes (dynamic lengths from then on); what it gains:
    # docs/performance.md#torchcompile-of-the-training-step
    compile: bool = False


@dataclass
class LogConfig:
    every_steps: int = 10
    wandb_mode: Literal['offline', 'online', 'disabled'] = 'offline'
    wandb_project: str = 'pgseg'
    wandb_name: str | None = None
    wandb_tags: List[str] = field(default_factory=list)
    group_maps_every_steps: int = 1000


@dataclass
class CheckpointConfig:
    every_steps: int = 2000
    keep_last: int = 3  # older ckpt-<step> directories are deleted; ckpt-best is kept apart
    init_from: str | None = None  # official or pgseg checkpoint to start from (e.g. GroupViT for PGSeg)
    resume: str | None = 'auto'  # 'auto': the newest checkpoint in train.output_dir; a path; or null


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 = no in-training evaluation
    datasets: List[str] = field(default_factory=lambda: ['voc'])
    data_root: str = '${oc.env:PGSEG_EVAL_DATA,data/eval}'
    protocol: str = 'pgseg'
    bg_thresh: float | None = None  # override the protocol's background value
    short_side: int | None = None  # override the protocol's resize (e.g. small synthetic images)
    crop_size: int | None = None
    stride: int | None = None
    limit: int | None = None  # evaluate only the first N images of each dataset


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------- validation
def validate(cfg: Any, prefix: str = '') -> None:
    """Every rule a config must satisfy beyond its field types, in one place: each ``Literal`` field holds one of
    its values (also for configs built in code, which omegaconf never checked), and the cross-field rules of the
    model. Raises :class:`ConfigError` naming the key, its value and what is expected. The loaders call it, and so
    does :func:`pgseg.models.build_model`. ``prefix`` names where ``cfg`` sits (``model.`` for a model config)."""
    if isinstance(cfg, ModelConfig) and not prefix:
        prefix = 'model.'
    _check_literals(cfg, prefix)
    if isinstance(cfg, TrainConfig):
        _validate_train(cfg)
    model = cfg if isinstance(cfg, ModelConfig) else getattr(cfg, 'model', None)
    if isinstance(model, ModelConfig):
        _validate_model(model, prefix if isinstance(cfg, ModelConfig) else prefix + 'model.')


def _validate_train(cfg: TrainConfig) -> None:
    at_least_one = {'data.batch_size': cfg.data.batch_size, 'train.grad_accum_steps': cfg.train.grad_accum_steps,
                    'train.epochs': cfg.train.epochs, 'log.every_steps': cfg.log.every_steps,
                    'train.max_nonfinite_steps': cfg.train.max_nonfinite_steps}
    for key, value in at_least_one.items():
        if value < 1:
            raise ConfigError(f'{key}={value}: must be at least 1')
    if cfg.data.num_workers < 0:
        raise ConfigError(f'data.num_workers={cfg.data.num_workers}: must be 0 (load in the main process) or more')
    if cfg.train.fit_schedule_to_time_limit and cfg.train.time_limit_minutes is None:
        raise ConfigError('train.fit_schedule_to_time_limit=true needs train.time_limit_minutes (the budget the '
                          'schedule is fitted to)')


def _check_literals(cfg: Any, prefix: str) -> None:
    if not dataclasses.is_dataclass(cfg):
        return
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), hints.get(f.name)
        if typing.get_origin(kind) is Literal and value not in typing.get_args(kind):
            options = [repr(o) for o in typing.get_args(kind)]
            raise ConfigError(f'{prefix}{f.name} must be {", ".join(options[:-1])} or {options[-1]}, got {value!r}')
        if dataclasses.is_dataclass(value):
            _check_literals(value, f'{prefix}{f.name}.')
        elif isinstance(value, list):
            for i, item in enumerate(value):
                _check_literals(item, f'{prefix}{f.name}.{i}.')


def _validate_model(cfg: ModelConfig, key: str = 'model.') -> None:
    npr, image = cfg.npr, cfg.image
    stages = len(image.depths)
    for name in ('embed_factors', 'num_heads', 'num_group_tokens'):
        if len(getattr(image, name)) != stages:
            raise ConfigError(f'{key}image.{name}={getattr(image, name)} has {len(getattr(image, name))} entries; '
                              f'expected one per stage ({stages}, from {key}image.depths={image.depths})')
    if len(image.num_output_groups) != stages - 1:
        raise ConfigError(f'{key}image.num_output_groups={image.num_output_groups} needs {stages - 1} entries, one '
                          f'per grouping stage ({key}image.depths={image.depths} has {stages} stages)')
    if image.img_size % image.patch_size:
        raise ConfigError(f'{key}image.img_size={image.img_size} is not a multiple of '
                          f'{key}image.patch_size={image.patch_size}')
    widths = [int(image.embed_dim * f) for f in image.embed_factors]
    if cfg.arch == 'pgseg' and len(set(widths)) > 1:  # NPR adds its reconstruction to the stage's tokens
        raise ConfigError(f'{key}image.embed_factors={image.embed_factors}: PGSeg needs the same width at every '
                          f'stage (its prototypes reconstruct the tokens around each grouping)')
    if cfg.arch == 'pgseg' and npr.variant == 'paper' and npr.num_text_prototypes != image.num_output_groups[-1]:
        raise ConfigError(f'{key}npr.num_text_prototypes={npr.num_text_prototypes} must equal the final group count '
                          f'{key}image.num_output_groups[-1]={image.num_output_groups[-1]} for the paper variant (text '
                          f'prototypes are matched one-to-one with groups)')
    if npr.stage_weights is not None and len(npr.stage_weights) != len(image.num_output_groups):
        raise ConfigError(f'{key}npr.stage_weights has {len(npr.stage_weights)} entries; the image encoder has '
                          f'{len(image.num_output_groups)} grouping stages')
    for name in ('grounding_weight', 'group_word_weight'):
        weight = getattr(cfg, name)
        if weight < 0:
            raise ConfigError(f'{key}{name} must be >= 0, got {weight}')
        if weight > 0 and cfg.multi_label <= 0:
            raise ConfigError(f'{key}{name}={weight} needs noun prompts: set {key}multi_label to the number of '
                              f'prompts per caption (e.g. 3); it is {cfg.multi_label}')
    if cfg.balance_weight < 0 or cfg.balance_min_groups < 1:
        raise ConfigError(f'{key}balance_weight must be >= 0 and {key}balance_min_groups >= 1, got '
                          f'{cfg.balance_weight} and {cfg.balance_min_groups}')


def _config_error(exc: Exception, where: str) -> ConfigError:
    key = getattr(exc, 'full_key', None) or getattr(exc, 'key', None)
    msg = (getattr(exc, 'msg', None) or str(exc)).splitlines()[0]
    return ConfigError(f'{where}: invalid config at key {key!r}: {msg}' if key else f'{where}: {msg}')


def _merge(schema: Any, sources: Sequence[tuple[str, Any]]) -> Any:
    """Merge each (description, DictConfig-like) source onto the structured schema, then convert to dataclasses."""
    cfg = OmegaConf.structured(schema)
    for where, src in sources:
        if isinstance(src, _Overrides):
            cfg = _apply_overrides(cfg, src)
            continue
        try:
            cfg = OmegaConf.merge(cfg, src)
        except (oc_errors.OmegaConfBaseException, ValueError) as exc:
            raise _config_error(exc, where) from None
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    except oc_errors.OmegaConfBaseException as exc:
        raise _config_error(exc, 'config') from None
    if missing:
        where = ' + '.join(w for w, _ in sources) or 'defaults'
        raise ConfigError(f'{where}: required value(s) not set: {", ".join(missing)}')
    try:
        out = OmegaConf.to_object(cfg)
    except oc_errors.OmegaConfBaseException as exc:
        raise _config_error(exc, 'config') from None
    validate(out)
    return out


SHIPPED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')  # package data (configs/)


def shipped_configs() -> list[str]:
    """The names of the recipes that ship with pgseg (``demo_cpu``, ``pgseg_gcc_redcaps``, ...)."""
    if not os.path.isdir(SHIPPED_CONFIGS):
        return []
    return sorted(f[:-5] for f in os.listdir(SHIPPED_CONFIGS) if f.endswith('.yaml'))


def resolve_config_path(path: str | os.PathLike) -> str:
    """A config file: ``path`` itself when it exists, else the shipped recipe of that name (``demo_cpu`` or
    ``demo_cpu.yaml``), so that ``--config demo_cpu`` works from any directory after ``pip install``."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    name = os.path.basename(path)
    shipped = os.path.join(SHIPPED_CONFIGS, name if name.endswith('.yaml') else name + '.yaml')
    if os.path.dirname(path) in ('', 'configs') and os.path.isfile(shipped):
        return shipped
    raise ConfigError(f'config file not found: {path} (shipped configs, usable by name: '
                      f'{", ".join(shipped_configs()) or "none found"})')


def _read_yaml(path: str | os.PathLike) -> DictConfig:
    path = resolve_config_path(path)
    try:
        return OmegaConf.load(path)
    except Exception as exc:  # yaml syntax errors come in several types
        raise ConfigError(f'{path}: cannot parse YAML: {exc}') from None


@dataclass
class _Overrides:
    """``key=value`` overrides, each applied in place to the merged config (so a key may index a list:
    ``data.sources.0.length=null``)."""
    items: list[tuple[str, str, Any]]  # (the override as typed, key, value parsed as YAML)


def _parse_overrides(overrides: Sequence[str]) -> _Overrides:
    items = []
    for item in overrides:
        if '=' not in item:
            raise ConfigError(f'override {item!r} must have the form key=value (e.g. optim.lr=1e-4)')
        key, value = item.split('=', 1)
        try:  # the value as omegaconf's dotlist reads it (YAML), interpolations kept for later
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f'value={value}']), resolve=False)['value']
        except yaml.YAMLError as exc:
            raise ConfigError(f'override {item!r}: the value of {key} is not valid YAML '
                              f'({getattr(exc, "problem", None) or exc}); inside {{...}} and [...] write '
                              "'key: value' with a space after each colon, and quote the whole override "
                              'for the shell') from None
        except oc_errors.OmegaConfBaseException as exc:
            raise _config_error(exc, f'override {item!r}') from None
        items.append((item, key, parsed))
    return _Overrides(items)


def _apply_overrides(cfg: DictConfig, overrides: _Overrides) -> DictConfig:
    for item, key, value in overrides.items:
        parts = key.split('.')
        for i, part in enumerate(parts[1:], start=1):  # an index into a list must name an existing entry
            parent = OmegaConf.select(cfg, '.'.join(parts[:i]), default=None)
            if isinstance(parent, ListConfig) and part.isdigit() and int(part) >= len(parent):
                raise ConfigError(f'command line: override {item!r}: {".".join(parts[:i])} has {len(parent)} '
                                  f'entries (0-{len(parent) - 1}); set the whole list to add one')
        try:
            OmegaConf.update(cfg, key, value, merge=True, force_add=False)
        except (oc_errors.OmegaConfBaseException, ValueError, TypeError, IndexError, KeyError) as exc:
            if isinstance(exc, oc_errors.OmegaConfBaseException) and (getattr(exc, 'full_key', None)
                                                                       or getattr(exc, 'key', None)):
                raise _config_error(exc, 'command line') from None
            raise ConfigError(f'command line: override {item!r}: {str(exc).splitlines()[0]}') from None
    return cfg


def load_structured(schema: type, path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Any:
    """Load any config dataclass ``schema`` from a YAML file (optional) and ``key=value`` overrides, with the same
    checks and error messages as :func:`load_config`."""
    sources: list[tuple[str, Any]] = []
    if path is not None:
        sources.append((os.fspath(path), _read_yaml(path)))
    if overrides:
        sources.append(('command line', _parse_overrides(overrides)))
    return _merge(schema, sources)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a :class:`TrainConfig` from a YAML file (optional) and ``key=value`` overrides."""
    return load_structured(TrainConfig, path, overrides)


def load_model_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> ModelConfig:
    """Load only a :class:`ModelConfig` (a YAML whose top level is the model section, or a full train config)."""
    sources: list[tuple[str, Any]] = []
    if path is not None:
        raw = _read_yaml(path)
        if 'model' in raw and isinstance(raw['model'], DictConfig):
            raw = raw['model']
        sources.append((os.fspath(path), raw))
    if overrides:
        sources.append(('command line', _parse_overrides(overrides)))
    return _merge(ModelConfig, sources)


def model_config_from_dict(values: dict, where: str = 'model config') -> ModelConfig:
    return _merge(ModelConfig, [(where, OmegaConf.create(values))])


def config_to_dict(cfg: Any) -> dict:
    """The resolved plain dict of a config dataclass (for wandb and JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def config_to_yaml(cfg: Any) -> str:
    """The resolved YAML of a config dataclass (what a run directory stores)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)
