"""MVP-SEG+'s knowledge transfer, the library behind ``pgseg-transfer`` (docs/mvpseg.md#mvp-seg): a DeepLab student
with the teacher's class embeddings as its fixed classifier, trained on every training image (transductive), seen
pixels on their ground truth and unseen pixels (labels suppressed at load time) on pseudo-labels: the teacher's
until ``pseudo.self_train_from`` (phase 1), then its own (phase 2, self-training).

The trainer's habits are pretraining's, through the same harness (:mod:`pgseg.training`): one process or
``torchrun`` (DDP; SyncBatchNorm on GPUs), bf16 autocast where native, atomic ``ckpt-<step>`` directories with the
optimizer, schedule, run state and RNG, ``checkpoint.resume: auto`` continuing exactly, a time limit,
metrics.jsonl and wandb, a progress bar. At the phase switch ``student_phase1.pt`` is written and evaluated; at the
end ``student.pt``, and ``results.json`` with the student after each phase, the teacher and the hand-written
templates on the validation split over seen and unseen classes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F
from timm.scheduler import PolyLRScheduler
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint.format import read_checkpoint_file, read_train_state, write_file_atomically
from ..eval.datasets import build_dataset
from ..eval.templates import get_templates
from ..runtime.distributed import all_ranks_true, barrier, get_rank, get_world_size, init_distributed, is_main_process
from ..runtime.precision import resolve_precision
from ..training.checkpoints import CheckpointWriter, claim_run_directory, load_resume_point, restore_rank
from ..training.loop import Harness, LoopSettings, start_run_record
from ..training.state import RunState
from ..training.step import autocast_for
from .config import TransferConfig
from .data import IGNORE, UNLABELLED, CropDataset, crop_loader, suppressed_unseen_labels
from .inference import SlideSettings, evaluate_predictions, evaluate_seen_unseen, predict_student
from .learner import TemplateClassifier
from .prompt_file import load_prompt_classifier
from .pseudo_labels import Teacher, fused_class_embeddings, pseudo_labels
from .splits import resolve_split
from .student import Student, save_student

log = logging.getLogger('pgseg.mvpseg')

__all__ = ['run', 'row_label', 'transfer_loss', 'evaluate_student', 'prediction_grid', 'format_transfer_table',
           'seed_report', 'ROWS']

# results.json's rows, in the order of the table: (key, label); 'final' is labelled by row_label
ROWS = (('templates', 'hand-written templates'), ('prompts', 'MVP-SEG (learned prompts)'),
        ('phase1', 'MVP-SEG+ after phase 1'), ('final', 'MVP-SEG+ after phase 2'))


def row_label(key: str, label: str, results: dict) -> str:
    """A row's label; the final student of a run without self-training is 'after phase 1' as well."""
    if key == 'final' and results.get('self_train_from', 0) >= results.get('steps', 0):
        return 'MVP-SEG+ (phase 1 only)'
    return label
PHASE1_FILES = ('student_phase1.pt', 'phase1_results.json')


def transfer_loss(logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, unseen: list[int],
                  cfg: TransferConfig) -> dict[str, torch.Tensor]:
    """logits [B, C, H, W] of the student; labels [B, H, W] (-1 unlabelled, 255 ignore); scores [B, C, H, W] that
    choose the pseudo-labels (the teacher's, or the student's own detached) -> ``loss`` (pixel cross-entropy over
    all classes) and the pseudo-labelled share of the pixels."""
    targets = pseudo_labels(labels, scores, unseen, cfg.pseudo.confidence_threshold, cfg.pseudo.presence_threshold)
    valid = targets != IGNORE
    if valid.any():
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)
    else:  # every pixel ignored (padding, filters): a zero loss that still reaches every parameter
        loss = logits.float().sum() * 0.0
    pseudo = (labels == UNLABELLED) & valid
    return {'loss': loss, 'pseudo_share': pseudo.float().mean(),
            'unlabelled_share': (labels == UNLABELLED).float().mean()}


def run(cfg: TransferConfig) -> dict:
    """Train the student as ``cfg`` says, write ``student.pt`` and evaluate it; returns the evaluation results."""
    device, _ = init_distributed()
    precision = resolve_precision(cfg.train.precision, device, gpu_fallback='fp32')
    run_dir = os.path.abspath(cfg.train.output_dir)
    if not 0 <= cfg.pseudo.self_train_from <= cfg.train.steps:
        raise ValueError(f'pseudo.self_train_from={cfg.pseudo.self_train_from} must lie in 0..train.steps '
                         f'({cfg.train.steps})')
    with claim_run_directory(run_dir):  # one live run per directory; temporaries of dead ones removed
        return _run(cfg, device, precision, run_dir)


def _run(cfg: TransferConfig, device: torch.device, precision: str, run_dir: str) -> dict:
    rank, world = get_rank(), get_world_size()
    torch.manual_seed(cfg.train.seed)

    learner, backbone, prompt_meta = load_prompt_classifier(cfg.teacher.prompts, cfg.teacher.checkpoint)
    backbone, learner = backbone.to(device), learner.to(device)
    train_set = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.train_split)
    classes = list(train_set.classes)
    seen, unseen = resolve_split(cfg.data.protocol, classes, cfg.data.unseen)
    teacher = Teacher(learner, backbone, classes, gpr=cfg.teacher.gpr)
    student = Student(cfg.student, fused_class_embeddings(learner, backbone, classes).cpu(), classes).to(device)
    if world > 1 and device.type == 'cuda':
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    scheduler = PolyLRScheduler(optimizer, t_initial=cfg.train.steps, power=cfg.optim.poly_power,
                                lr_min=cfg.optim.min_lr, t_in_epochs=False)
    state = RunState()
    point = load_resume_point(cfg.checkpoint.resume, run_dir, _read_resume_point)
    if point:
        resume, (saved, weights) = point
        student.load_state_dict(weights['state_dict'])
        optimizer.load_state_dict(saved['optimizer'])
        scheduler.load_state_dict(saved['scheduler'])
        state = RunState.from_state(saved['run'])
        restore_rank(saved, rank, world)
        log.info('resumed from %s at step %d', resume, state.step)
    if state.step < cfg.pseudo.self_train_from and is_main_process():  # phase 1 lies ahead: older files are stale
        for name in PHASE1_FILES:
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
    model = student
    if world > 1:
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == 'cuda' else None)
    meta = {'dataset': cfg.data.dataset, 'protocol': cfg.data.protocol, 'classes': classes,
            'seen': [classes[i] for i in seen], 'unseen': [classes[i] for i in unseen],
            'prompts': os.path.abspath(cfg.teacher.prompts),
            'teacher_backbone': os.path.abspath(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else None,
            'eval': {'short_side': cfg.eval.short_side, 'long_side': cfg.eval.long_side}}

    dataset = CropDataset(train_set, suppressed_unseen_labels(unseen), cfg.data.crop_size, cfg.data.base_size,
                          cfg.data.scale_range, seed=cfg.train.seed, cat_max_ratio=cfg.data.cat_max_ratio,
                          photometric=cfg.data.photometric)
    loader = crop_loader(dataset, cfg.data.batch_size, rank, world, cfg.train.seed, state.step, cfg.data.num_workers,
                         device)
    logger = start_run_record(run_dir, cfg, precision, state)
    if is_main_process():
        log.info('%d seen / %d unseen classes of %s (%s), every one of %d training images (unseen labels '
                 'suppressed); student %s-%s, %.1fM trainable values; teacher %s (GPR %s); %d steps, self-training '
                 'from step %d; %s, world %d', len(seen), len(unseen), cfg.data.dataset, cfg.data.protocol,
                 len(train_set), cfg.student.arch, cfg.student.encoder, sum(p.numel() for p in params) / 1e6,
                 cfg.teacher.prompts, 'on' if teacher.gpr else 'off', cfg.train.steps, cfg.pseudo.self_train_from,
                 precision, world)
    writer = CheckpointWriter(run_dir, cfg.checkpoint.keep_last,
                              lambda folder: save_student(os.path.join(folder, 'student.pt'), student, meta))
    settings = LoopSettings(cfg.train.steps, cfg.train.max_steps, cfg.train.time_limit_minutes, cfg.log.every_steps,
                            cfg.train.max_nonfinite_steps)
    harness = Harness(run_dir, settings, writer, logger, state)

    def train_state() -> dict:
        return {'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict()}

    scheduler.step_update(state.step)
    batches = iter(loader)
    started, first_step = time.time(), state.step
    while not harness.should_stop():
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        phase = 1 if state.step < cfg.pseudo.self_train_from else 2
        losses, grad_norm, applied = _transfer_step(model, teacher if phase == 1 else None, params, optimizer,
                                                    images, labels, unseen, cfg, precision)
        harness.step_done(applied)
        scheduler.step_update(state.step)
        if harness.log_due():
            values = {f'train/{k}': float(v.detach()) for k, v in losses.items()}
            values.update({'train/lr': optimizer.param_groups[0]['lr'], 'train/grad_norm': float(grad_norm),
                           'train/phase': phase})
            harness.log(values, {'loss': f"{values['train/loss']:.3f}", 'phase': phase},
                        images_per_step=images.shape[0] * world)
        if state.step == cfg.pseudo.self_train_from < cfg.train.steps:
            _end_of_phase1(cfg, student, meta, unseen, device, precision, run_dir, logger, state.step)
        if harness.due(cfg.checkpoint.every_steps):
            harness.save(train_state())
    final = harness.finish(train_state())
    if is_main_process():
        write_file_atomically(os.path.join(run_dir, 'student.pt'),
                              lambda tmp: shutil.copyfile(os.path.join(final, 'student.pt'), tmp))
    results = {'dataset': cfg.data.dataset, 'split': cfg.data.val_split, 'protocol': cfg.data.protocol,
               'steps': state.step, 'self_train_from': cfg.pseudo.self_train_from, 'precision': precision,
               'steps_this_run': state.step - first_step, 'wall_s_this_run': round(time.time() - started, 1)}
    phase1 = os.path.join(run_dir, PHASE1_FILES[1])
    if os.path.isfile(phase1):
        with open(phase1) as f:
            results['phase1'] = json.load(f)
    results['final'] = evaluate_student(cfg, student, unseen, device, precision, 'student (final)')
    if cfg.eval.teacher:
        results.update(evaluate_teacher(cfg, backbone, learner, prompt_meta, unseen, device, precision))
    if cfg.eval.visualize and is_main_process():
        results['visuals'] = prediction_grid(cfg, student, learner, backbone, prompt_meta, run_dir, device)
    logger.log(state.step, {f'eval/{row}/{m}': results[row][m] for row, _ in ROWS if row in results
                            for m in ('miou_seen', 'miou_unseen', 'hiou', 'miou')})
    if is_main_process():
        results['student'] = os.path.join(run_dir, 'student.pt')
        write_file_atomically(os.path.join(run_dir, 'results.json'),
                              lambda tmp: _write_json(tmp, results))
        print(format_transfer_table(results))
        print(f'wrote {run_dir}/student.pt and results.json')
    harness.close()
    return results


def _write_json(path: str, value: dict) -> None:
    with open(path, 'w') as f:
        json.dump(value, f, indent=1)


def _read_resume_point(path: str) -> tuple[dict, dict]:
    """(training state, student payload) of checkpoint ``path``; a damaged file is a CheckpointError naming it."""
    weights = read_checkpoint_file(path, 'student.pt', lambda f: torch.load(f, map_location='cpu', weights_only=True))
    return read_train_state(path), weights


def _transfer_step(model, teacher: Teacher | None, params, optimizer, images, labels, unseen, cfg, precision):
    """One step -> (losses, gradient norm, applied). Pseudo-labels from ``teacher`` (phase 1) or, without one, from
    the student's own detached logits (phase 2); DDP averages the gradients; applied only if finite on every rank."""
    optimizer.zero_grad(set_to_none=True)
    with autocast_for(images.device, precision):
        logits = model(images)
        scores = teacher(images) if teacher is not None else logits.detach()
    losses = transfer_loss(logits, labels, scores, unseen, cfg)
    losses['loss'].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad or math.inf)
    ok = all_ranks_true(bool(torch.isfinite(losses['loss']).item() and torch.isfinite(grad_norm).item()))
    if ok:
        optimizer.step()
    return losses, grad_norm, ok


def _end_of_phase1(cfg, student, meta, unseen, device, precision, run_dir, logger, step) -> None:
    """At the phase switch: ``student_phase1.pt`` and, with ``eval.at_phase_switch``, its evaluation
    (``phase1_results.json``, read again at the end even after a resume)."""
    if is_main_process():
        save_student(os.path.join(run_dir, PHASE1_FILES[0]), student, meta)
    barrier()
    if not cfg.eval.at_phase_switch:
        return
    out = evaluate_student(cfg, student, unseen, device, precision, 'student (end of phase 1)')
    out['step'] = step
    logger.log(step, {f'eval/phase1/{m}': out[m] for m in ('miou_seen', 'miou_unseen', 'hiou', 'miou')})
    if is_main_process():
        write_file_atomically(os.path.join(run_dir, PHASE1_FILES[1]),
                              lambda tmp: _write_json(tmp, out))


@torch.no_grad()
def evaluate_student(cfg: TransferConfig, student: Student, unseen: list[int], device, precision: str,
                     desc: str = 'student') -> dict:
    """The validation split over seen and unseen classes, whole-image inference at ``eval.short_side``."""
    val = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.val_split)
    if list(val.classes) != student.class_names:
        raise ValueError(f'{cfg.data.val_split} split of {cfg.data.dataset} has classes {list(val.classes)[:6]}..., '
                         f'not the student\'s {student.class_names[:6]}...')
    dtype = torch.bfloat16 if precision == 'bf16' else None
    was_training = student.training
    student.eval()
    out = evaluate_predictions(
        lambda image: predict_student(student, image, cfg.eval.short_side, cfg.eval.long_side, device, dtype)[0],
        val, unseen, cfg.eval.limit, desc=desc)
    student.train(was_training)
    return out


@torch.no_grad()
def evaluate_teacher(cfg: TransferConfig, backbone, learner, prompt_meta: dict, unseen: list[int], device,
                     precision: str) -> dict:
    """The teacher's rows of the table: its learned prompts and the hand-written templates, with the sliding
    windows its prompts file was evaluated with (or ``eval.teacher_*``)."""
    val = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.val_split)
    e = cfg.eval
    settings = SlideSettings.from_prompts(prompt_meta, e.teacher_short_side, e.teacher_crop_size, e.teacher_stride)
    dtype = torch.bfloat16 if precision == 'bf16' else None
    learner.eval()
    templates = TemplateClassifier(get_templates(e.templates), backbone.logit_scale)
    return {'prompts': evaluate_seen_unseen(backbone, learner, val, unseen, settings, device, dtype, e.limit,
                                            desc='teacher: learned prompts'),
            'templates': evaluate_seen_unseen(backbone, templates, val, unseen, settings, device, dtype, e.limit,
                                              desc=f'teacher: templates ({e.templates})')}


@torch.no_grad()
def prediction_grid(cfg: TransferConfig, student: Student, learner, backbone, prompt_meta: dict, run_dir: str,
                    device, height: int = 160) -> str:
    """``predictions.png``: the first ``eval.visualize`` validation images, one per row: input, ground truth, the
    teacher's prediction, the student after phase 1 (when ``student_phase1.pt`` exists) and at the end, every
    prediction over all classes; a legend of the classes shown. Returns the file's path."""
    from PIL import Image

    from ..eval.visualize import label_image, legend_entries, titled_grid
    from .inference import predict_image
    from .student import load_student
    val = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.val_split)
    names = list(val.classes)
    settings = SlideSettings.from_prompts(prompt_meta, cfg.eval.teacher_short_side, cfg.eval.teacher_crop_size,
                                          cfg.eval.teacher_stride)
    text = learner.class_embeddings(backbone, names)
    predictors = [('MVP-SEG prompts', lambda img: predict_image(backbone, learner, text, img, settings, device)[0])]
    phase1_path = os.path.join(run_dir, PHASE1_FILES[0])
    columns = [(student, 'MVP-SEG+ final')]
    if os.path.isfile(phase1_path):
        columns.insert(0, (load_student(phase1_path)[0].to(device), 'MVP-SEG+ phase 1'))
    for model, title in columns:
        predictors.append((title, lambda img, m=model: predict_student(m, img, cfg.eval.short_side,
                                                                       cfg.eval.long_side, device)[0]))
    was_training = student.training
    student.eval()
    rows, maps = [], []
    for i in range(min(cfg.eval.visualize, len(val))):
        image, label, _ = val[i]
        w = max(1, round(image.width * height / image.height))
        preds = [predict(image).cpu().numpy() for _, predict in predictors]
        maps += [label, *preds]
        rows.append([image.convert('RGB').resize((w, height), Image.NEAREST)]
                    + [label_image(m, len(names)).resize((w, height), Image.NEAREST) for m in (label, *preds)])
    student.train(was_training)
    path = os.path.join(run_dir, 'predictions.png')
    grid = titled_grid(rows, ['input', 'ground truth'] + [t for t, _ in predictors], legend_entries(maps, names))
    write_file_atomically(path, lambda tmp: grid.save(tmp, format='PNG'))
    return path


def format_transfer_table(results: dict) -> str:
    """The four rows (templates, prompts, after phase 1, after phase 2) that are present, as a text table."""
    head = f"{'classifier':<30}{'mIoU(S)':>9}{'mIoU(U)':>9}{'hIoU':>8}{'mIoU':>8}"
    first = results.get('final') or next(results[k] for k, _ in ROWS if k in results)
    lines = [f"{results['dataset']} {results['split']} ({first['num_images']} images), protocol {results['protocol']}; "
             f"unseen: {', '.join(first['unseen_classes'])}", head, '-' * len(head)]
    for key, label in ROWS:
        if key in results:
            r = results[key]
            lines.append(f"{row_label(key, label, results):<30}{r['miou_seen']:>9.2f}{r['miou_unseen']:>9.2f}"
                         f"{r['hiou']:>8.2f}{r['miou']:>8.2f}")
    return '\n'.join(lines)


def seed_report(run_dirs: list[str]) -> str:
    """A markdown table of several runs' ``results.json`` (seeds of one recipe): per row of :data:`ROWS`, the mean
    of mIoU(S), mIoU(U), hIoU and mIoU with each run's figure, then the runs' steps, precision and wall time."""
    results = []
    for d in run_dirs:
        path = os.path.join(d, 'results.json')
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path}: no results (has pgseg-transfer finished in {d}?)')
        try:
            with open(path) as f:
                r = json.load(f)
            r['final']['unseen_classes']
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f'{path}: not a results.json of pgseg-transfer ({exc!r})') from None
        results.append(r)
    plans = {(r['dataset'], r['split'], r['protocol'], tuple(r['final']['unseen_classes'])) for r in results}
    if len(plans) > 1:
        raise ValueError(f'the runs were evaluated on different data or splits, which a mean would mix: '
                         f'{sorted(plans)}')
    metrics = (('miou_seen', 'mIoU(S)'), ('miou_unseen', 'mIoU(U)'), ('hiou', 'hIoU'), ('miou', 'mIoU'))
    first = results[0]['final']
    lines = [f"{results[0]['dataset']} {results[0]['split']}, {first['num_images']} images, protocol "
             f"{results[0]['protocol']}, unseen: {', '.join(first['unseen_classes'])}; mean of {len(results)} runs "
             f"(each run's figure in brackets)", '',
             '| classifier | ' + ' | '.join(label for _, label in metrics) + ' |', '|---' * (len(metrics) + 1) + '|']
    for key, label in ROWS:
        rows = [r[key] for r in results if key in r]
        if len(rows) != len(results):
            continue
        cells = []
        for m, _ in metrics:
            values = [r[m] for r in rows]
            cells.append(f"{sum(values) / len(values):.2f} ({', '.join(f'{v:.1f}' for v in values)})")
        lines.append(f'| {row_label(key, label, results[0])} | ' + ' | '.join(cells) + ' |')
    lines.append('')
    for d, r in zip(run_dirs, results):
        lines.append(f"- {d}: {r['steps']} steps, phase 1 until step {r['self_train_from']}, {r['precision']}; "
                     f"{r['steps_this_run']} steps trained and the phase-1 evaluation in "
                     f"{r['wall_s_this_run'] / 60:.1f} min by its last invocation")
    return '\n'.join(lines)
