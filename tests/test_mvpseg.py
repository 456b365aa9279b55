"""MVP-SEG prompt learning: backbones (tiny open_clip ResNet / ViT with random weights, tiny pgseg), the prompt
learner's gradients and bounds, OCLoss, hIoU, and the train -> prompts.pt -> evaluate path on synthetic data."""
from __future__ import annotations

import json
import os

import pytest
import torch

import pgseg
from pgseg.data.synthetic.scenes import SceneConfig
from pgseg.data.synthetic.writers import write_segmentation_set
from pgseg.eval.datasets import build_dataset
from pgseg.mvpseg import (
    BackboneConfig,
    MultiViewPrompts,
    PromptConfig,
    TemplateClassifier,
    build_backbone,
    harmonic_iou,
    load_prompts,
    orthogonality_loss,
    presence_loss,
    refined_log_probs,
    resolve_split,
    seen_unseen_metrics,
    segmentation_loss,
)
from pgseg.mvpseg.data import CropDataset, EpochBatchSampler, seen_only_labels

from .helpers import ROOT, tiny_model_config

TEXT = {'context_length': 16, 'width': 32, 'heads': 2, 'layers': 1}
CLIP_CONFIGS = {
    'clip_rn': {'embed_dim': 24, 'vision_cfg': {'layers': [1, 1, 1, 1], 'width': 8, 'image_size': 64,
                                                'head_width': 16}, 'text_cfg': TEXT},
    'clip_vit': {'embed_dim': 24, 'vision_cfg': {'layers': 2, 'width': 32, 'patch_size': 16, 'image_size': 64,
                                                 'head_width': 16}, 'text_cfg': TEXT},
}
NAMES = ['circle', 'square', 'triangle']


def make_backbone(kind: str):
    if kind == 'pgseg':
        return build_backbone(BackboneConfig(kind='pgseg'), model=pgseg.build_model(tiny_model_config()).eval())
    return build_backbone(BackboneConfig(kind='clip', model_config=CLIP_CONFIGS[kind]))


@pytest.mark.parametrize('kind', ['pgseg', 'clip_rn', 'clip_vit'])
def test_backbone_shapes_frozen_and_gradients_reach_only_prompts(kind):
    backbone = make_backbone(kind)
    size = 32 if kind == 'pgseg' else 64
    images = torch.rand(2, 3, size, size)
    feats = backbone.dense_features(backbone.normalize(images))
    assert feats.shape[:2] == (2, backbone.embed_dim) and feats.ndim == 4
    assert all(not p.requires_grad for p in backbone.parameters())
    learner = MultiViewPrompts(PromptConfig(num_views=2, context_length=4), backbone)
    text = learner.class_embeddings(backbone, NAMES)
    assert text.shape == (3, 3, backbone.embed_dim)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3, 3), atol=1e-5)
    logits = learner(feats, text)
    labels = torch.randint(0, 3, (2, size, size))
    loss = segmentation_loss(logits, labels) + presence_loss(logits, labels, 3) + learner.orthogonality()
    loss.backward()
    trainable = {n for n, p in learner.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trainable == {'ctx', 'log_tau1', 'log_tau2', 'beta'}
    assert all(p.grad is None for p in backbone.parameters())
    backbone.train()
    assert not backbone.training  # BatchNorm statistics never move


@pytest.mark.parametrize('kind', ['clip_rn', 'clip_vit'])
def test_clip_dense_path_uses_values_not_queries_or_keys(kind):
    backbone = make_backbone(kind)
    x = backbone.normalize(torch.rand(1, 3, 64, 64))
    before = backbone.dense_features(x)
    visual = backbone.clip.visual
    with torch.no_grad():
        if kind == 'clip_rn':
            for proj in (visual.attnpool.q_proj, visual.attnpool.k_proj):
                proj.weight.add_(torch.randn_like(proj.weight))
            v = visual.attnpool.v_proj.weight
        else:
            w = visual.transformer.resblocks[-1].attn.in_proj_weight
            width = w.shape[1]
            w[:2 * width].add_(torch.randn_like(w[:2 * width]))  # query and key rows (random: LayerNorm outputs
            # sum to zero, so a constant shift of the weights would change nothing)
            v = w[2 * width:]
    assert torch.allclose(backbone.dense_features(x), before, atol=1e-5)
    with torch.no_grad():
        v.add_(torch.randn_like(v))
    assert not torch.allclose(backbone.dense_features(x), before, atol=1e-3)


def test_orthogonality_loss():
    ctx = torch.zeros(3, 2, 4)
    for i in range(3):
        ctx[i, :, i] = 1.0  # mean vectors along three axes
    assert orthogonality_loss(ctx).item() == pytest.approx(0.0, abs=1e-6)
    ctx[1, :, 0] = -1.0  # view 1 now at 45 / 135 degrees to view 0
    assert orthogonality_loss(ctx).item() == pytest.approx(1 / 2 ** 0.5, abs=1e-5)  # |cos| counted, not cos
    same = torch.randn(1, 2, 4).repeat(3, 1, 1)
    assert orthogonality_loss(same).item() == pytest.approx(3.0, abs=1e-5)


def test_gpr_bounds_and_refined_masks():
    backbone = make_backbone('pgseg')
    learner = MultiViewPrompts(PromptConfig(num_views=2, context_length=4), backbone)
    feats = torch.randn(2, backbone.embed_dim, 4, 4)
    logits = learner(feats, learner.class_embeddings(backbone, NAMES))
    g = torch.sigmoid(logits.presence)
    log_g = torch.nn.functional.logsigmoid(logits.presence)
    assert logits.presence.shape == (2, 3) and ((g >= 0) & (g <= 1)).all()
    assert torch.isfinite(log_g).all() and (log_g <= 0).all()  # the log domain never reaches log 0
    probs = refined_log_probs(logits).exp()  # m_f * g: at most g, summing to at most max g per pixel
    assert (probs <= g[:, :, None, None] + 1e-6).all()
    assert (probs.sum(dim=1) <= g.max(dim=1).values[:, None, None] + 1e-6).all()
    # the pooled score is a soft maximum: between the mean and the max of the global cosine map
    m0 = logits.views[:, 0].flatten(2)
    pooled = logits.presence * learner.log_tau2.exp() + learner.beta
    assert (pooled >= m0.mean(-1) - 1e-5).all() and (pooled <= m0.max(-1).values + 1e-5).all()
    labels = torch.full((2, 4, 4), 255)
    labels[0, 0, 0] = 2
    target_loss = presence_loss(logits, labels, 3)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.presence, torch.tensor([[0., 0., 1.], [0., 0., 0.]]))
    assert target_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_hiou_on_hand_made_confusion_matrices():
    assert harmonic_iou(80.0, 20.0) == pytest.approx(32.0)
    assert harmonic_iou(50.0, 0.0) == 0.0
    # 3 classes, class 2 unseen. rows: truth, cols: prediction
    conf = torch.tensor([[8, 2, 0], [0, 10, 0], [5, 0, 5]])
    m = seen_unseen_metrics(conf, ['a', 'b', 'c'], [2])
    iou_a, iou_b, iou_c = 8 / (8 + 2 + 5), 10 / 12, 5 / 10
    assert m['miou_seen'] == pytest.approx(100 * (iou_a + iou_b) / 2)
    assert m['miou_unseen'] == pytest.approx(100 * iou_c)
    s, u = m['miou_seen'], m['miou_unseen']
    assert m['hiou'] == pytest.approx(2 * s * u / (s + u))
    assert m['unseen_classes'] == ['c'] and m['seen_classes'] == ['a', 'b']


def test_named_and_custom_splits():
    from pgseg.eval.classes import CONTEXT, VOC
    seen, unseen = resolve_split('voc_15_5', VOC[1:])
    assert [VOC[1:][i] for i in unseen] == ['plant', 'sheep', 'sofa', 'train', 'monitor'] and len(seen) == 15
    seen, unseen = resolve_split('context_49_10', CONTEXT)
    assert len(seen) == 50 and len(unseen) == 10 and 0 in seen  # background counted as seen
    assert resolve_split('custom', ['a', 'b', 'c'], ['c']) == ([0, 1], [2])
    with pytest.raises(ValueError, match='not in'):
        resolve_split('custom', ['a', 'b'], ['z'])


@pytest.fixture(scope='module')
def synthetic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('mvpseg'))
    scene = SceneConfig(size=64)
    write_segmentation_set(root, 'voc', 12, seed=5, scene=scene, split='train', progress=False)
    write_segmentation_set(root, 'voc', 4, seed=6, scene=scene, split='val', progress=False)
    return root


def test_seen_pixel_dataset_hides_unseen_classes(synthetic_root):
    ds = build_dataset('voc20', synthetic_root, 'train')
    seen, unseen = resolve_split('custom', list(ds.classes), ['circle', 'star'])
    data = CropDataset(ds, seen_only_labels(seen), crop_size=48, scale_range=(0.75, 1.25), seed=0)
    raw_unseen = remapped_seen = 0
    for i in range(len(ds)):
        _, raw, _ = ds[i]
        raw_unseen += int(sum((raw == u).sum() for u in unseen))
        image, label = data[(0, i)]
        assert image.shape == (3, 48, 48) and 0 <= image.min() and image.max() <= 1
        kept = label[label != 255]
        assert kept.numel() == 0 or kept.max() < len(seen)
        remapped_seen += kept.numel()
        assert torch.equal(data[(0, i)][1], label)  # deterministic by (epoch, index)
    assert raw_unseen > 0 and remapped_seen > 0
    batches = EpochBatchSampler(12, 4, rank=1, world_size=2, seed=0)
    it = iter(batches)
    first = [next(it) for _ in range(3)]
    assert batches.batches_per_epoch == 1 and first[1][0][0] == 1  # one batch per epoch per rank, epochs advance
    resumed = iter(EpochBatchSampler(12, 4, rank=1, world_size=2, seed=0, start_epoch=1))
    assert next(resumed) == first[1]


@pytest.mark.parametrize('kind', ['pgseg', 'clip_rn'])
def test_prompt_training_resume_and_evaluation(synthetic_root, tmp_path, kind):
    from pgseg.mvpseg.config import load_prompt_config
    from pgseg.mvpseg.train import run
    ckpt = None
    overrides = ['data.dataset=voc20', f'data.root={synthetic_root}', 'data.protocol=custom',
                 'data.unseen=[circle,star]', 'data.batch_size=4', 'data.num_workers=0',
                 'prompts.num_views=2', 'prompts.context_length=4', 'optim.warmup_steps=0', 'train.precision=fp32',
                 f'train.output_dir={tmp_path / "run"}', 'log.wandb_mode=disabled', 'log.every_steps=1',
                 'checkpoint.every_steps=2', 'eval.templates=simple']
    if kind == 'pgseg':
        ckpt = str(tmp_path / 'model')
        pgseg.save_checkpoint(ckpt, pgseg.build_model(tiny_model_config()), tiny_model_config())
        overrides += ['backbone.kind=pgseg', f'backbone.checkpoint={ckpt}', 'data.crop_size=32',
                      'eval.short_side=32', 'eval.crop_size=32', 'eval.stride=16']
    else:
        overrides += ['backbone.kind=clip', f'backbone.model_config={json.dumps(CLIP_CONFIGS["clip_rn"])}',
                      'data.crop_size=64', 'eval.short_side=64', 'eval.crop_size=64', 'eval.stride=32']
    first = run(load_prompt_config(None, overrides + ['train.steps=4', 'train.max_steps=2']))
    ctx_after_2 = load_prompts(str(tmp_path / 'run' / 'prompts.pt'))[0].ctx.detach().clone()
    results = run(load_prompt_config(None, overrides + ['train.steps=4']))  # resumes from step 2
    assert first['learned']['num_images'] == 4
    for kind_ in ('learned', 'templates'):
        r = results[kind_]
        assert set(r['unseen_classes']) == {'circle', 'star'} and len(r['per_class_iou']) == 8
        assert 0 <= r['miou_unseen'] <= 100 and r['hiou'] == pytest.approx(harmonic_iou(r['miou_seen'],
                                                                                       r['miou_unseen']))
    rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
    assert [r['step'] for r in rows if 'train/loss' in r] == [1, 2, 3, 4]  # resumed at 3, not from scratch
    learner, backbone, meta = load_prompts(str(tmp_path / 'run' / 'prompts.pt'))
    assert meta['unseen'] == ['circle', 'star'] and not torch.equal(learner.ctx, ctx_after_2)
    # an uninterrupted 4-step run reaches the same prompts: exact resume
    straight = run(load_prompt_config(None, [o.replace(str(tmp_path / 'run'), str(tmp_path / 'straight'))
                                             for o in overrides] + ['train.steps=4', 'eval.baseline=false']))
    assert straight['learned']['miou'] == pytest.approx(results['learned']['miou'])
    again = load_prompts(str(tmp_path / 'straight' / 'prompts.pt'))[0]
    assert torch.allclose(again.ctx, learner.ctx, atol=1e-6)


def test_template_classifier_is_the_mean_of_normalised_prompts():
    backbone = make_backbone('pgseg')
    clf = TemplateClassifier(['a {}.', 'the {}.'], logit_scale=10.0)
    text = clf.class_embeddings(backbone, ['circle'])
    a, b = torch.nn.functional.normalize(backbone.encode_texts(['a circle.', 'the circle.']), dim=-1)
    assert torch.allclose(text[0, 0], torch.nn.functional.normalize(a + b, dim=0), atol=1e-5)


def test_eval_and_segment_accept_prompts(synthetic_root, tmp_path):
    from pgseg.evaluate import main as eval_main
    from pgseg.mvpseg.config import load_prompt_config
    from pgseg.mvpseg.train import run
    from pgseg.segment import main as segment_main
    ckpt = str(tmp_path / 'model')
    pgseg.save_checkpoint(ckpt, pgseg.build_model(tiny_model_config()), tiny_model_config())
    run(load_prompt_config(None, [
        'backbone.kind=pgseg', f'backbone.checkpoint={ckpt}', 'data.dataset=voc20', f'data.root={synthetic_root}',
        'data.protocol=custom', 'data.unseen=[circle]', 'data.batch_size=4', 'data.num_workers=0',
        'data.crop_size=32', 'prompts.num_views=2', 'prompts.context_length=4', 'train.steps=1',
        'train.precision=fp32', f'train.output_dir={tmp_path / "run"}', 'log.wandb_mode=disabled',
        'eval.baseline=false', 'eval.short_side=32', 'eval.crop_size=32', 'eval.stride=16', 'eval.limit=1']))
    prompts = str(tmp_path / 'run' / 'prompts.pt')
    out = str(tmp_path / 'eval')
    # the windows default to the ones the prompts were trained and evaluated with (the file's meta), not 512/341
    assert eval_main(['--prompts', prompts, '--dataset', 'voc20', '--data-root', synthetic_root, '--stride', '24',
                      '--out', out, '--visualize', '0', '--limit', '2']) == 0
    saved = json.load(open(os.path.join(out, 'results.json')))
    assert {k: saved['settings'][k] for k in ('short_side', 'crop_size', 'stride')} == \
        {'short_side': 32, 'crop_size': 32, 'stride': 24}
    r = saved['results'][0]
    assert r['unseen_classes'] == ['circle'] and 'hiou' in r
    # a checkpoint-evaluation option has no meaning here: an error that names it, not a silent no-op
    with pytest.raises(SystemExit):
        eval_main(['--prompts', prompts, '--dataset', 'voc20', '--data-root', synthetic_root, '--bg-thresh', '0.5'])
    image = os.path.join(synthetic_root, 'VOCdevkit', 'VOC2012', 'JPEGImages',
                         build_dataset('voc20', synthetic_root, 'val').ids[0] + '.jpg')
    seg_out = str(tmp_path / 'seg')
    assert segment_main([image, '--prompts', prompts, '--classes', 'circle,square', '--out', seg_out]) == 0
    assert any(f.endswith('.png') for f in os.listdir(seg_out))


def test_every_mvpseg_config_loads():
    from pgseg.mvpseg.config import load_prompt_config
    from pgseg.mvpseg.splits import SPLITS
    configs = sorted(f for f in os.listdir(os.path.join(ROOT, 'configs'))
                     if f.startswith('mvpseg_') and not f.startswith('mvpseg_plus_'))
    assert len(configs) >= 5
    for name in configs:
        cfg = load_prompt_config(os.path.join(ROOT, 'configs', name))
        assert cfg.data.protocol in SPLITS or (cfg.data.protocol == 'custom' and cfg.data.unseen)
        if cfg.backbone.kind == 'clip' and cfg.backbone.name == 'RN50':  # OpenAI's weights need their activation
            assert cfg.backbone.quick_gelu is True, name


def test_openai_torchscript_weights_load_and_tags_choose_quick_gelu(tmp_path, monkeypatch):
    import open_clip

    from pgseg.mvpseg.backbones import _load_clip
    # OpenAI's release files are TorchScript archives, which torch.load(weights_only=True) refuses: the weights
    # inside must arrive intact, with the QuickGELU activation those weights were trained with
    torch.manual_seed(0)
    source = open_clip.CLIP(**{**CLIP_CONFIGS['clip_rn'], 'quick_gelu': True}).eval()
    image, text = torch.randn(1, 3, 64, 64), torch.randint(1, 100, (1, TEXT['context_length']))
    path = str(tmp_path / 'RN.pt')
    torch.jit.save(torch.jit.trace(source, (image, text), strict=False), path)
    cfg = BackboneConfig(kind='clip', model_config=CLIP_CONFIGS['clip_rn'], pretrained=path, quick_gelu=True)
    loaded = _load_clip(cfg).eval()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_text(text), source.encode_text(text))
    # a TorchScript release file is OpenAI's own: QuickGELU without being told
    unsaid = _load_clip(BackboneConfig(kind='clip', model_config=CLIP_CONFIGS['clip_rn'], pretrained=path)).eval()
    torch.testing.assert_close(unsaid.encode_text(text), source.encode_text(text))
    # an open_clip tag whose weights need QuickGELU (OpenAI's) builds the model with it, without being told
    built = {}

    def fake_create(name, pretrained=None, force_quick_gelu=False):
        built.update(name=name, quick_gelu=force_quick_gelu)
        return open_clip.CLIP(**CLIP_CONFIGS['clip_rn'])
    monkeypatch.setattr(open_clip, 'create_model', fake_create)
    monkeypatch.setattr(open_clip, 'download_pretrained', lambda tag_cfg: path)
    monkeypatch.setattr(open_clip, 'load_checkpoint', lambda model, p: None)
    monkeypatch.setattr(open_clip, 'get_pretrained_cfg', lambda name, tag: {'quick_gelu': tag == 'openai'})
    _load_clip(BackboneConfig(kind='clip', name='RN50', pretrained='openai'))
    assert built == {'name': 'RN50', 'quick_gelu': True}
    _load_clip(BackboneConfig(kind='clip', name='RN50', pretrained='yfcc15m'))
    assert built['quick_gelu'] is False
    _load_clip(BackboneConfig(kind='clip', name='RN50', pretrained='yfcc15m', quick_gelu=True))
    assert built['quick_gelu'] is True
