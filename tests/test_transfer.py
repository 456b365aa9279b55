"""MVP-SEG+ transfer: the pseudo-label rule on hand-made tensors, the suppressed-label crops, the student's fixed
classifier, the phase switch, exact resume, and the train -> student.pt -> pgseg-eval / pgseg-segment path."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import pgseg
from pgseg.data.synthetic.scenes import SceneConfig
from pgseg.data.synthetic.writers import write_segmentation_set
from pgseg.eval.datasets import build_dataset
from pgseg.mvpseg.data import IGNORE, UNLABELLED, CropDataset, photometric_distortion, suppressed_unseen_labels
from pgseg.mvpseg.pseudo_labels import pseudo_labels
from pgseg.mvpseg.splits import resolve_split
from pgseg.mvpseg.student import Student, StudentConfig, load_encoder_weights, load_student

from .helpers import ROOT, tiny_model_config

TINY_STUDENT = ['student.encoder=resnet18', 'student.decoder_channels=16', 'student.output_stride=16']


def test_pseudo_label_rule_on_hand_made_tensors():
    # 4 classes, unseen = {1, 3}; one image of 1 x 5 pixels
    labels = torch.tensor([[[0, UNLABELLED, UNLABELLED, IGNORE, 2]]])
    scores = torch.zeros(1, 4, 1, 5)
    scores[0, 0, 0, 1] = 9.0  # a seen class scores highest on an unlabelled pixel: it must not win
    scores[0, 3, 0, 1] = 2.0
    scores[0, 1, 0, 2] = 5.0
    scores[0, 3, 0, 0] = 9.0  # a labelled pixel keeps its ground truth whatever the scores
    scores[0, 1, 0, 3] = 9.0  # ignore stays ignore
    out = pseudo_labels(labels, scores, unseen=[1, 3])
    assert out.tolist() == [[[0, 3, 1, IGNORE, 2]]]
    # the confidence filter: pixel 1's unseen softmax is sigmoid(2) = 0.88, pixel 2's sigmoid(5) = 0.993
    assert pseudo_labels(labels, scores, [1, 3], confidence_threshold=0.9).tolist() == [[[0, IGNORE, 1, IGNORE, 2]]]
    # the presence filter: class 3's best unlabelled probability is 0.88 (pixel 1) and class 1's 0.993
    assert pseudo_labels(labels, scores, [1, 3], presence_threshold=0.95).tolist() == [[[0, IGNORE, 1, IGNORE, 2]]]
    # labels are not modified in place
    assert labels.tolist() == [[[0, UNLABELLED, UNLABELLED, IGNORE, 2]]]


@pytest.fixture(scope='module')
def synthetic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('transfer'))
    scene = SceneConfig(size=64)
    write_segmentation_set(root, 'voc', 8, seed=5, scene=scene, split='train', progress=False)
    write_segmentation_set(root, 'voc', 3, seed=6, scene=scene, split='val', progress=False)
    return root


def test_crops_suppress_unseen_labels_and_keep_seen_indices(synthetic_root):
    ds = build_dataset('voc20', synthetic_root, 'train')
    seen, unseen = resolve_split('custom', list(ds.classes), ['circle', 'star'])
    data = CropDataset(ds, suppressed_unseen_labels(unseen), crop_size=64, scale_range=(1.0, 1.0), seed=0,
                       cat_max_ratio=0.75, photometric=True)
    found_unlabelled = 0
    for i in range(len(ds)):
        _, raw, _ = ds[i]
        image, label = data[(0, i)]
        values = set(label.unique().tolist())
        assert values <= set(seen) | {UNLABELLED, IGNORE}
        found_unlabelled += int((label == UNLABELLED).sum())
        if not any((raw == u).any() for u in unseen):
            assert UNLABELLED not in values
        assert torch.equal(data[(0, i)][0], image)  # photometric distortion and crop seeded by (epoch, index)
    assert found_unlabelled > 0


def test_category_ratio_cap_retries_crops_dominated_by_one_class(synthetic_root):
    ds = build_dataset('voc20', synthetic_root, 'train')
    lut = suppressed_unseen_labels([])

    def worst_share(cap):
        data = CropDataset(ds, lut, crop_size=24, base_size=64, scale_range=(1.0, 1.0), seed=3,
                           cat_max_ratio=cap)
        shares = []
        for epoch in range(6):
            for i in range(len(ds)):
                label = data[(epoch, i)][1]
                kept = label[label != IGNORE]
                shares.append(torch.bincount(kept + 1).max().item() / max(kept.numel(), 1) if kept.numel() else 0)
        return np.mean(shares)

    assert worst_share(0.75) < worst_share(None)


def test_photometric_distortion_is_mmsegs_ranges_and_seeded():
    image = np.full((8, 8, 3), 128, dtype=np.uint8)
    a = photometric_distortion(image, np.random.default_rng(1))
    b = photometric_distortion(image, np.random.default_rng(1))
    assert a.dtype == np.uint8 and np.array_equal(a, b)
    outs = [photometric_distortion(image, np.random.default_rng(s)).astype(int) for s in range(40)]
    assert any(not np.array_equal(o, image) for o in outs)
    # a grey image: brightness within +-32, then contrast within x0.5..1.5 -> 48..240
    assert all(48 - 1 <= o.min() and o.max() <= 240 + 1 for o in outs)


def test_student_classifier_is_fixed_and_background_is_learned():
    emb = torch.nn.functional.normalize(torch.randn(4, 12), dim=-1)
    student = Student(StudentConfig(encoder='resnet18', decoder_channels=16, output_stride=16), emb,
                      ['background', 'a', 'b', 'c'])
    x = torch.rand(2, 3, 40, 56)  # not a multiple of 32: padded inside, cropped back
    logits = student(x)
    assert logits.shape == (2, 4, 40, 56)
    logits.logsumexp(1).mean().backward()
    assert 'class_embeddings' in dict(student.named_buffers())
    assert 'class_embeddings' not in dict(student.named_parameters())
    assert torch.equal(student.class_embeddings, emb)
    assert all(p.grad is not None for n, p in student.named_parameters() if 'encoder.conv1' in n)
    with_bg = Student(StudentConfig(encoder='resnet18', decoder_channels=16, output_stride=16,
                                    background='background'), emb, ['background', 'a', 'b', 'c'])
    with_bg(x).logsumexp(1).mean().backward()
    assert with_bg.background_embedding.grad is not None and with_bg.background_embedding.grad.abs().sum() > 0
    assert torch.equal(with_bg.classifier()[1:], emb[1:])
    with pytest.raises(ValueError, match='not a class'):
        Student(StudentConfig(encoder='resnet18', background='sky'), emb, ['background', 'a', 'b', 'c'])


def test_student_file_round_trip_keeps_the_learned_background_and_retargets(tmp_path):
    from pgseg.mvpseg.student import retarget_student, save_student
    emb = torch.nn.functional.normalize(torch.randn(3, 12), dim=-1)
    student = Student(StudentConfig(encoder='resnet18', decoder_channels=16, output_stride=16,
                                    background='background'), emb, ['background', 'a', 'b'])
    with torch.no_grad():
        student.background_embedding.add_(1.0)  # as if trained
    save_student(str(tmp_path / 'student.pt'), student, {'unseen': ['b']})
    loaded, meta = load_student(str(tmp_path / 'student.pt'))
    assert meta == {'unseen': ['b']} and torch.equal(loaded.classifier(), student.classifier())
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(loaded(x), student.eval()(x))
    # another order of the same classes: the same rows, the learned background included
    retarget_student(loaded, meta, ['b', 'background'])
    assert torch.equal(loaded.classifier(), student.classifier()[[2, 0]])
    with pytest.raises(FileNotFoundError, match='--prompts'):  # a new name needs the teacher's prompts file
        retarget_student(load_student(str(tmp_path))[0], meta, ['a', 'zebra'])


def test_encoder_weights_load_from_a_local_file_and_a_mismatch_is_an_error(tmp_path):
    import torchvision
    reference = torchvision.models.resnet18(weights=None)
    path = str(tmp_path / 'resnet18.pth')
    torch.save(reference.state_dict(), path)  # torchvision's layout, fc included
    student = Student(StudentConfig(encoder='resnet18', decoder_channels=16, output_stride=16,
                                    encoder_weights=path), torch.randn(2, 8), ['a', 'b'])
    assert torch.equal(student.net.encoder.conv1.weight, reference.conv1.weight)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), str(tmp_path / 'resnet34.pth'))
    with pytest.raises(ValueError, match='does not fit'):
        load_encoder_weights(student.net.encoder, str(tmp_path / 'resnet34.pth'))
    with pytest.raises(FileNotFoundError, match='encoder_weights'):
        load_encoder_weights(student.net.encoder, str(tmp_path / 'missing.pth'))


@pytest.fixture(scope='module')
def teacher_prompts(synthetic_root, tmp_path_factory):
    """A prompts file on a tiny random pgseg backbone (two training steps)."""
    from pgseg.mvpseg.config import load_prompt_config
    from pgseg.mvpseg.train import run
    tmp = tmp_path_factory.mktemp('teacher')
    ckpt = str(tmp / 'model')
    pgseg.save_checkpoint(ckpt, pgseg.build_model(tiny_model_config()), tiny_model_config())
    run(load_prompt_config(None, [
        'backbone.kind=pgseg', f'backbone.checkpoint={ckpt}', 'data.dataset=voc20', f'data.root={synthetic_root}',
        'data.protocol=custom', 'data.unseen=[circle,star]', 'data.batch_size=4', 'data.num_workers=0',
        'data.crop_size=32', 'prompts.num_views=2', 'prompts.context_length=4', 'train.steps=2',
        'train.precision=fp32', f'train.output_dir={tmp / "prompts"}', 'log.wandb_mode=disabled',
        'eval.baseline=false', 'eval.short_side=32', 'eval.crop_size=32', 'eval.stride=16', 'eval.limit=1']))
    env = json.load(open(tmp / 'prompts' / 'env.json'))  # the prompt trainer records its run like pretraining
    assert env['precision'] == 'fp32' and env['world_size'] == 1
    return str(tmp / 'prompts' / 'prompts.pt')


def transfer_overrides(root, prompts, out, steps=4):
    return [f'teacher.prompts={prompts}', *TINY_STUDENT, 'data.dataset=voc20', f'data.root={root}',
            'data.protocol=custom', 'data.unseen=[circle,star]', 'data.batch_size=2', 'data.num_workers=0',
            'data.crop_size=32', 'data.base_size=32', 'optim.lr=0.01', f'train.steps={steps}',
            'train.precision=fp32', f'train.output_dir={out}', 'log.wandb_mode=disabled', 'log.every_steps=1',
            'checkpoint.every_steps=2', 'eval.short_side=32', 'eval.limit=2', 'eval.templates=simple',
            'pseudo.self_train_from=2']


def test_phase_switch_uses_the_teacher_then_the_student(synthetic_root, teacher_prompts, tmp_path, monkeypatch):
    from pgseg.mvpseg import transfer
    from pgseg.mvpseg.config import load_transfer_config
    calls = []
    original = transfer.Teacher.__call__
    monkeypatch.setattr(transfer.Teacher, '__call__', lambda self, x: calls.append(1) or original(self, x))
    seen_scores = []
    real_loss = transfer.transfer_loss

    def spy(logits, labels, scores, unseen, cfg):
        seen_scores.append(scores is not None and torch.equal(scores, logits.detach()))
        return real_loss(logits, labels, scores, unseen, cfg)

    monkeypatch.setattr(transfer, 'transfer_loss', spy)
    results = transfer.run(load_transfer_config(None, transfer_overrides(synthetic_root, teacher_prompts,
                                                                         tmp_path / 'run', steps=5)
                                                + ['eval.teacher=false']))
    assert len(calls) == 2  # the teacher labels the first self_train_from steps only
    assert seen_scores == [False, False, True, True, True]  # then the student's own logits choose
    rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl') if 'train/phase' in line]
    assert [r['train/phase'] for r in rows] == [1, 1, 2, 2, 2]
    assert os.path.isfile(tmp_path / 'run' / 'student_phase1.pt')
    assert results['phase1']['step'] == 2 and 'final' in results and 'prompts' not in results


def test_transfer_resume_lands_on_the_same_parameters_and_eval_segment_use_the_student(
        synthetic_root, teacher_prompts, tmp_path, capsys):
    from pgseg.evaluate import main as eval_main
    from pgseg.mvpseg.config import load_transfer_config
    from pgseg.mvpseg.transfer import run
    from pgseg.segment import main as segment_main
    # checkpoints at 1, 2, 3; resuming from step 1 crosses the phase switch (step 2) again
    every_step = ['checkpoint.every_steps=1', 'checkpoint.keep_last=5']
    run(load_transfer_config(None, transfer_overrides(synthetic_root, teacher_prompts, tmp_path / 'a')
                             + every_step + ['train.max_steps=3', 'eval.teacher=false']))
    import shutil
    for step in (2, 3):
        shutil.rmtree(tmp_path / 'a' / f'ckpt-0000000{step}')
    resumed = run(load_transfer_config(None, transfer_overrides(synthetic_root, teacher_prompts, tmp_path / 'a')
                                       + every_step))
    assert resumed['phase1']['step'] == 2
    straight = run(load_transfer_config(None, transfer_overrides(synthetic_root, teacher_prompts, tmp_path / 'b')))
    a, _ = load_student(str(tmp_path / 'a'))
    b, meta = load_student(str(tmp_path / 'b' / 'student.pt'))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    # after training, the classifier is still the teacher's fused class embeddings
    from pgseg.mvpseg import load_prompt_classifier
    from pgseg.mvpseg.pseudo_labels import fused_class_embeddings
    learner, backbone, _ = load_prompt_classifier(teacher_prompts)
    assert torch.allclose(b.class_embeddings, fused_class_embeddings(learner, backbone, b.class_names), atol=1e-6)
    assert resumed['final']['miou'] == straight['final']['miou']
    for row in ('templates', 'prompts', 'phase1', 'final'):
        r = straight[row]
        assert r['unseen_classes'] == ['circle', 'star'] and len(r['per_class_iou']) == 8
    saved = json.load(open(tmp_path / 'b' / 'results.json'))
    assert saved['steps'] == 4 and meta['unseen'] == ['circle', 'star']
    from PIL import Image
    grid = Image.open(saved['visuals'])  # input, truth, teacher, phase 1, final: one row per validation image
    assert grid.width > 5 * 160 and grid.height > 3 * 160
    # pgseg-eval --student: the same figures as the trainer's own evaluation
    out = str(tmp_path / 'eval')
    assert eval_main(['--student', str(tmp_path / 'b' / 'student.pt'), '--dataset', 'voc20', '--data-root',
                      synthetic_root, '--out', out, '--limit', '2']) == 0
    r = json.load(open(os.path.join(out, 'results.json')))['results'][0]
    assert r['miou'] == pytest.approx(straight['final']['miou']) and r['unseen_classes'] == ['circle', 'star']
    image = os.path.join(synthetic_root, 'VOCdevkit', 'VOC2012', 'JPEGImages',
                         build_dataset('voc20', synthetic_root, 'val').ids[0] + '.jpg')
    seg_out = str(tmp_path / 'seg')
    # classes of the student's own list, and one it never saw (embedded through the teacher's prompts)
    assert segment_main([image, '--student', str(tmp_path / 'b'), '--classes', 'circle,square,moon',
                         '--out', seg_out]) == 0
    assert any(f.endswith('.png') for f in os.listdir(seg_out))
    # the seeds table: each row's mean over the runs, with each run's figure
    from pgseg.transfer import main as transfer_main
    capsys.readouterr()
    assert transfer_main(['--report', str(tmp_path / 'a'), str(tmp_path / 'b')]) == 0
    table = capsys.readouterr().out
    final = f"{straight['final']['hiou']:.1f}"
    assert '| MVP-SEG+ after phase 2 |' in table and f'({final}, {final})' in table
    assert transfer_main(['--report', str(tmp_path / 'nothing')]) != 0
    with pytest.raises(SystemExit):  # an override would be ignored: refused
        transfer_main(['--report', str(tmp_path / 'a'), 'train.steps=3'])
    other = json.load(open(tmp_path / 'a' / 'results.json'))
    other['final']['unseen_classes'] = ['circle']
    os.makedirs(tmp_path / 'c')
    json.dump(other, open(tmp_path / 'c' / 'results.json', 'w'))
    assert transfer_main(['--report', str(tmp_path / 'a'), str(tmp_path / 'c')]) != 0  # runs that do not compare
    assert 'different data' in capsys.readouterr().err


def _two_rank_transfer(rank, port, root, prompts, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE='2',
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE='2')
    import torch.distributed as dist

    from pgseg.mvpseg import transfer
    from pgseg.mvpseg.config import load_transfer_config
    final = {}
    evaluate = transfer.evaluate_student

    def keep_parameters(cfg, student, *args, **kwargs):  # every rank evaluates its own copy at the end
        final.update({n: p.detach().clone() for n, p in student.named_parameters()})
        return evaluate(cfg, student, *args, **kwargs)

    transfer.evaluate_student = keep_parameters
    try:
        transfer.run(load_transfer_config(None, transfer_overrides(root, prompts, out, steps=3)
                                          + ['eval.teacher=false', 'eval.visualize=0']))
        torch.save(final, os.path.join(out, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_train_one_student(synthetic_root, teacher_prompts, tmp_path):
    """torchrun's path: two gloo ranks (DDP), each on its share of the batches, end with one student."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    out = str(tmp_path / 'ddp')
    mp.spawn(_two_rank_transfer, args=(port, synthetic_root, teacher_prompts, out), nprocs=2, join=True)
    results = json.load(open(os.path.join(out, 'results.json')))
    assert results['steps'] == 3 and json.load(open(os.path.join(out, 'env.json')))['world_size'] == 2
    ranks = [torch.load(os.path.join(out, f'rank{r}.pt'), weights_only=True) for r in range(2)]
    saved, _ = load_student(out)
    for name, p in saved.named_parameters():  # DDP kept the ranks' weights equal, and rank 0 saved them
        assert torch.equal(ranks[0][name], ranks[1][name]) and torch.equal(ranks[0][name], p), name


def test_every_transfer_config_loads():
    from pgseg.mvpseg.config import load_transfer_config
    from pgseg.mvpseg.splits import SPLITS
    configs = sorted(f for f in os.listdir(os.path.join(ROOT, 'configs')) if f.startswith('mvpseg_plus_'))
    assert len(configs) == 4
    for name in configs:
        cfg = load_transfer_config(os.path.join(ROOT, 'configs', name))
        assert cfg.data.protocol in SPLITS or (cfg.data.protocol == 'custom' and cfg.data.unseen)
        assert 0 < cfg.pseudo.self_train_from < cfg.train.steps
    # MaskCLIP+'s three schedules
    voc, context, coco = (load_transfer_config(os.path.join(ROOT, 'configs', f'mvpseg_plus_{n}.yaml'))
                          for n in ('voc_15_5', 'context_49_10', 'coco_stuff_156_15'))
    assert (voc.train.steps, voc.pseudo.self_train_from, voc.optim.lr) == (20000, 2000, 0.01)
    assert (context.train.steps, context.pseudo.self_train_from, context.optim.lr) == (40000, 4000, 0.004)
    assert (coco.train.steps, coco.pseudo.self_train_from) == (80000, 8000)
    assert context.student.background == 'background' and voc.student.background is None
