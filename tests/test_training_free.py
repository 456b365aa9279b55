"""Training-free CLIP methods under pgseg's evaluator: the dense rules of the last ViT block against torch's own
attention, the SCLIP-family post-processing on hand-made scores, the name files, and pgseg-eval --clip end to end."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from pgseg.data.synthetic.scenes import SceneConfig
from pgseg.data.synthetic.writers import write_segmentation_set
from pgseg.eval.classes import VOC, query_names
from pgseg.eval.datasets import DATASETS
from pgseg.eval.training_free import get_clip_protocol, labels_from_query_scores, query_embeddings
from pgseg.evaluate import main as eval_main
from pgseg.mvpseg.backbones import NACLIP_GAUSSIAN_STD, BackboneConfig, _gaussian_neighbourhood, build_backbone

TINY_VIT = {'embed_dim': 24, 'vision_cfg': {'layers': 2, 'width': 32, 'patch_size': 16, 'image_size': 64,
                                            'head_width': 16},
            'text_cfg': {'context_length': 16, 'width': 32, 'heads': 2, 'layers': 1}}


def _backbone(dense: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone(BackboneConfig(kind='clip', model_config=TINY_VIT, dense=dense))


def _tied(attn, source: str, target: str):
    """A copy of an nn.MultiheadAttention whose ``target`` projection (query or key) is its ``source`` one."""
    rows = {'query': slice(0, attn.embed_dim), 'key': slice(attn.embed_dim, 2 * attn.embed_dim)}
    out = copy.deepcopy(attn)
    with torch.no_grad():
        out.in_proj_weight[rows[target]] = attn.in_proj_weight[rows[source]]
        out.in_proj_bias[rows[target]] = attn.in_proj_bias[rows[source]]
    return out


def _reference(backbone, images, dense: str) -> torch.Tensor:
    """The rule written with torch's nn.MultiheadAttention on copies of the block's attention where it computes
    the same thing: keys tied to queries gives softmax(q q^T) v, queries tied to keys softmax(k k^T) v; NACLIP's
    neighbourhood enters as MultiheadAttention's additive float mask. The backbone's own weights stay untied."""
    visual = backbone.clip.visual
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    with torch.no_grad():
        grid = (images.shape[-2] // 16, images.shape[-1] // 16)
        x = backbone._tokens(images, grid)
        for blk in visual.transformer.resblocks[:-1]:
            x = blk(x)
        h = block.ln_1(x)

        def mha(source, target, mask=None):
            return _tied(attn, source, target)(h, h, h, need_weights=False, attn_mask=mask)[0]
        if dense == 'clearclip':
            out = mha('query', 'key')
        elif dense == 'naclip':
            out = mha('key', 'query', _gaussian_neighbourhood(grid, NACLIP_GAUSSIAN_STD, x.device, x.dtype))
        else:  # sclip: out_proj(A_qq v + A_kk v) = out_proj(A_qq v) + out_proj(A_kk v) - bias
            x = x + mha('query', 'key') + mha('key', 'query') - attn.out_proj.bias
            out = x + block.mlp(block.ln_2(x))
        y = visual.ln_post(out[:, 1:]) @ visual.proj
    return y.transpose(1, 2).reshape(images.shape[0], -1, *grid)


@pytest.mark.parametrize('dense', ['sclip', 'clearclip', 'naclip'])
def test_dense_rules_match_torch_attention(dense):
    backbone = _backbone(dense)
    images = backbone.normalize(torch.rand(2, 3, 64, 96))  # not the model's size: the positions are resized
    expected = _reference(backbone, images, dense)
    got = backbone.dense_features(images)
    assert got.shape == (2, 24, 4, 6)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('dense,ignores,uses', [('clearclip', 'key', 'query'), ('naclip', 'query', 'key'),
                                                ('sclip', None, 'query'), ('sclip', None, 'key')])
def test_dense_rules_read_the_projections_they_name(dense, ignores, uses):
    backbone = _backbone(dense)
    x = backbone.normalize(torch.rand(1, 3, 64, 64))
    before = backbone.dense_features(x)
    w = backbone.clip.visual.transformer.resblocks[-1].attn.in_proj_weight
    rows = {'query': slice(0, 32), 'key': slice(32, 64)}
    if ignores:
        with torch.no_grad():
            w[rows[ignores]] += torch.randn_like(w[rows[ignores]])
        torch.testing.assert_close(backbone.dense_features(x), before)
    with torch.no_grad():
        w[rows[uses]] += torch.randn_like(w[rows[uses]])
    assert not torch.allclose(backbone.dense_features(x), before, atol=1e-3)


def test_dense_rules_differ_and_native_size_keeps_the_positions():
    images = torch.rand(1, 3, 64, 64)
    feats = {d: _backbone(d).dense_features(_backbone(d).normalize(images)) for d in
             ('maskclip', 'sclip', 'clearclip', 'naclip')}
    for a in feats:
        for b in feats:
            if a < b:
                assert not torch.allclose(feats[a], feats[b], atol=1e-3), (a, b)
    backbone = _backbone('clearclip')
    x = backbone.normalize(images)
    torch.testing.assert_close(backbone._tokens(x, (4, 4)), backbone.clip.visual._embeds(x))
    with pytest.raises(ValueError, match='multiple of the patch size'):
        backbone.dense_features(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="unknown dense rule 'sclipp'"):
        _backbone('sclipp')


def test_query_post_processing_on_hand_made_scores():
    # 3 classes: 0 background (queries 0, 1), 1 (query 2), 2 (query 3); 4 pixels in a row
    scores = torch.tensor([[0.9, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 0.8],  # a second background query wins pixel 3
                           [0.0, 1.0, 0.2, 0.0],
                           [0.0, 0.0, 0.6, 0.0]]).view(4, 1, 4)
    query_class = torch.tensor([0, 0, 1, 2])
    labels = labels_from_query_scores(scores, query_class, 3, logit_scale=10.0)
    assert labels.tolist() == [[0, 1, 2, 0]]
    # each class takes its best query's probability (not their sum): pixel 0's background queries 0.9 and 0.0
    probs = (10.0 * scores).softmax(dim=0)
    assert probs[0, 0, 0] > probs[2:, 0, 0].max()
    # a probability threshold above pixel 2's best (class 2, 0.6 vs 0.2) turns it into background
    best2 = probs[:, 0, 2].max().item()
    assert labels_from_query_scores(scores, query_class, 3, 10.0, prob_thd=best2 + 1e-4)[0, 2] == 0
    assert labels_from_query_scores(scores, query_class, 3, 10.0, prob_thd=best2 - 1e-4)[0, 2] == 2
    # area threshold: classes 1 and 2 cover 1 pixel each of 2 non-background pixels (50%): kept at 0.4, dropped at 0.5
    assert labels_from_query_scores(scores, query_class, 3, 10.0, area_thd=0.4).tolist() == [[0, 1, 2, 0]]
    assert labels_from_query_scores(scores, query_class, 3, 10.0, area_thd=0.5).tolist() == [[0, 0, 0, 0]]


def test_sclip_name_files_and_protocol_settings():
    voc = query_names('voc', DATASETS['voc'].classes, 'sclip')
    assert len(voc[0]) == 26 and voc[0][:3] == ('sky', 'wall', 'tree')  # background as stuff words
    assert voc[VOC.index('boat')] == ('ship',) and voc[VOC.index('table')] == ('table',)
    assert voc[VOC.index('plant')] == ('pottedplant',) and len(voc[VOC.index('person')]) == 7
    assert voc[VOC.index('monitor')][0] == 'television monitor'
    assert query_names('voc20', DATASETS['voc20'].classes, 'sclip') == voc[1:]
    context = query_names('context', DATASETS['context'].classes, 'sclip')
    assert context[0] == ('background',) and context[1] == ('aeroplane',)
    coco = query_names('coco_object', DATASETS['coco_object'].classes, 'sclip')
    assert coco[1][-1] == 'body' and coco[5] == ('airplane',)
    stuff = query_names('coco_stuff', DATASETS['coco_stuff'].classes, 'sclip')
    assert stuff[9] == ('trafficlight',) and stuff[58] == ('pottedplant',)
    ade = query_names('ade20k', DATASETS['ade20k'].classes, 'sclip')
    assert ade[7] == ('bed',) and ('chestofdrawers',) in ade
    assert query_names('voc', DATASETS['voc'].classes, 'mmseg')[11] == ('diningtable',)
    p = get_clip_protocol('sclip')
    assert p.settings_for('voc') == {'short_side': 336, 'logit_scale': 65.0, 'prob_thd': 0.1, 'area_thd': 0.1}
    assert p.settings_for('cityscapes') == {'short_side': 560, 'logit_scale': 40.0, 'prob_thd': 0.0, 'area_thd': None}
    assert (p.crop_size, p.stride, p.templates) == (224, 112, 'full')
    assert get_clip_protocol('sclip', short_side=64).settings_for('coco_stuff')['short_side'] == 64


def test_query_embeddings_average_normalised_prompts():
    backbone = _backbone('sclip')
    templates = ('a photo of a {}.', 'art of the {}.')
    got = query_embeddings(backbone, ['circle', 'square'], templates)
    each = F.normalize(backbone.encode_texts([t.format('square') for t in templates]).float(), dim=-1)
    torch.testing.assert_close(got[1], F.normalize(each.mean(0), dim=0))


def test_eval_scores_a_training_free_clip(tmp_path, capsys):
    root = tmp_path / 'data'
    write_segmentation_set(str(root), 'voc', 3, seed=5, scene=SceneConfig(size=48), progress=False)
    os.remove(root / 'VOCdevkit/VOC2012/pgseg_classes.json')  # read as the official VOC: SCLIP's name file applies
    config = tmp_path / 'tiny_vit.json'
    config.write_text(json.dumps(TINY_VIT))
    code = eval_main(['--clip', str(config), '--dense', 'naclip', '--dataset', 'voc', '--data-root', str(root),
                      '--short-side', '64', '--crop-size', '48', '--stride', '16', '--out', str(tmp_path / 'out')])
    assert code == 0
    results = json.loads((tmp_path / 'out/results.json').read_text())
    r = results['results'][0]
    assert results['dense'] == 'naclip' and r['num_images'] == 3 and 0.0 <= r['miou'] <= 100.0
    assert 'sclip (voc): short side 64' in r['protocol'] and 'logit scale 65.0' in r['protocol']
    assert 'windows 48/16' in r['protocol'] and 'area threshold 0.1' in r['protocol']
    assert len(r['queries']['background']) == 26 and len(r['queries']['person']) == 7  # one query per synonym
    # protocols and models that do not go together are refused before anything runs
    for argv in (['--clip', str(config), '--protocol', 'pgseg'], ['--checkpoint', 'x', '--protocol', 'sclip'],
                 ['--clip', str(config), '--wandb', 'offline'], ['--checkpoint', 'x', '--dense', 'naclip']):
        with pytest.raises(SystemExit) as stop:
            eval_main(argv + ['--dataset', 'voc', '--out', str(tmp_path / 'refused')])
        assert stop.value.code == 2
    assert not (tmp_path / 'refused').exists()
    assert 'training-free protocol' in capsys.readouterr().err


def test_naclip_neighbourhood_is_a_gaussian_of_grid_distance():
    bias = _gaussian_neighbourhood((2, 3), 5.0, 'cpu', torch.float64)  # patches row by row: (0,0) (0,1) (0,2) (1,0)..
    assert bias.shape == (7, 7) and (bias[0] == 0).all() and (bias[:, 0] == 0).all()
    assert bias[1, 1] == 1.0
    assert bias[1, 2] == pytest.approx(torch.exp(torch.tensor(-1 / 50.0)).item())  # (0,0)-(0,1): d^2 = 1
    assert bias[1, 6] == pytest.approx(torch.exp(torch.tensor(-5 / 50.0)).item())  # (0,0)-(1,2): d^2 = 5
