"""Model shapes, assignment semantics, gradient flow, official sizes and key sets, buffer behaviour."""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

import pgseg
from pgseg.config import ConfigError
from pgseg.losses.objective import build_objective
from pgseg.models.grouping import straight_through_hard
from pgseg.models.image_encoder import resize_pos_embed
from pgseg.models.npr import em_prototypes
from pgseg.models.text_encoder import valid_token_mask
from tests.helpers import ROOT, tiny_batch, tiny_model_config


@pytest.mark.parametrize('arch,variant', [('pgseg', 'paper'), ('pgseg', 'reference'), ('groupvit', 'paper')])
def test_shapes_and_maps(arch, variant):
    cfg = tiny_model_config(arch, variant)
    model = pgseg.build_model(cfg).eval()
    images = torch.randn(2, 3, 48, 40)  # not the training size: position embedding is resized (6 x 5 grid)
    out = model.encode_image(images)
    assert out.grid == (6, 5)
    assert out.image_embeds.shape == (2, cfg.output_dim)
    assert out.group_embeds.shape == (2, 4, cfg.output_dim)
    assert [m.shape for m in out.group_maps] == [(2, 30, 8), (2, 30, 4)]
    for m in out.group_maps:  # composed soft maps are distributions over groups for every patch
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 30))
    text = model.encode_text(pgseg.tokenize(['a cat', 'a dog'], context_length=16))
    assert text.shape == (2, cfg.output_dim)


def test_float64_model_keeps_float64_and_agrees_with_float32():
    """A float64 model (the exact reference that ``scripts/parity_ties.py`` compares against) computes in float64
    throughout: the assignment's softmax is never narrowed to float32."""
    cfg = tiny_model_config('pgseg', 'paper')
    model = pgseg.build_model(cfg).eval()
    model64 = copy.deepcopy(model).double()
    images = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        out, out64 = model.encode_image(images), model64.encode_image(images.double())
    assert all(m.dtype == torch.float64 for m in out64.group_maps) and out64.group_embeds.dtype == torch.float64
    for m, m64 in zip(out.group_maps, out64.group_maps):
        torch.testing.assert_close(m.double(), m64, atol=1e-5, rtol=1e-4)


def test_hard_assignment_is_one_hot_with_soft_gradient(tiny_cfg):
    model = pgseg.build_model(tiny_cfg).train()
    images, _ = tiny_batch()
    feats = model.img_encoder(images)
    for stage in feats.stages:
        a = stage.grouping.assignment  # [B, G, N]
        assert set(a.detach().unique().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(a.detach().sum(dim=1), torch.ones(a.shape[0], a.shape[2]))
    # straight-through: value one-hot, gradient of the soft input
    soft = torch.softmax(torch.randn(3, 5, 7), dim=1).requires_grad_()
    hard = straight_through_hard(soft, dim=1)
    (hard * torch.arange(5.).view(1, 5, 1)).sum().backward()
    torch.testing.assert_close(soft.grad, torch.arange(5.).view(1, 5, 1).expand(3, 5, 7))


def test_gumbel_noise_only_in_training(tiny_cfg):
    model = pgseg.build_model(tiny_cfg)
    images, _ = tiny_batch()
    model.eval()
    a = model.img_encoder(images).stages[0].grouping.assignment
    b = model.img_encoder(images).stages[0].grouping.assignment
    assert torch.equal(a, b)
    model.train()
    draws = {tuple(model.img_encoder(images).stages[0].grouping.assignment.argmax(1).flatten().tolist())
             for _ in range(4)}
    assert len(draws) > 1  # noisy in training


def _twin(base: torch.nn.Module, other: torch.nn.Module):
    """``other`` takes ``base``'s weights; both in eval mode; with 4 groups and 9 tokens of width 16 to feed them."""
    other.load_state_dict(base.state_dict())
    return base.eval(), other.eval(), torch.randn(2, 4, 16), torch.randn(2, 9, 16)


def test_assign_temperature_scales_the_assignment_logits():
    from pgseg.models.grouping import AssignAttention
    torch.manual_seed(0)
    base, cold, groups, x = _twin(AssignAttention(16), AssignAttention(16, temperature=0.25))
    logits = (base.q_proj(groups) @ base.k_proj(x).transpose(1, 2)) * 16 ** -0.5
    torch.testing.assert_close(base(groups, x)[2], logits.softmax(dim=1))
    torch.testing.assert_close(cold(groups, x)[2], (4 * logits).softmax(dim=1))
    with pytest.raises(ValueError, match='temperature'):
        AssignAttention(16, temperature=0.0)


def test_assign_gain_scales_only_the_assigned_mean():
    from pgseg.models.grouping import AssignAttention, GroupingBlock
    torch.manual_seed(0)
    base, loud, groups, x = _twin(AssignAttention(16), AssignAttention(16, gain=8.0))
    (out, hard, soft, _), (out8, hard8, soft8, _) = base(groups, x), loud(groups, x)
    torch.testing.assert_close(out8, 8 * out)
    torch.testing.assert_close(hard8, hard)  # the assignment itself is unchanged
    torch.testing.assert_close(soft8, soft)
    # in the block, the gain applies to the assigned mean and not to the group token added back
    block, loud_block, _, _ = _twin(GroupingBlock(16, 16, 2, 4, 4), GroupingBlock(16, 16, 2, 4, 4, assign_gain=8.0))
    seen = {}
    loud_block.assign.register_forward_hook(lambda m, i, o: seen.update(assigned=o[0]))
    loud_block.pre_assign_attn.register_forward_hook(lambda m, i, o: seen.update(query=o))
    out_block = loud_block(x, groups)[0]
    mixed = seen['query'] + seen['assigned']
    expected = loud_block.reduction(mixed) + loud_block.mlp_channels(loud_block.norm_new_x(mixed))
    torch.testing.assert_close(out_block, expected)
    assert not torch.allclose(out_block, block(x, groups)[0])
    with pytest.raises(ValueError, match='gain'):
        AssignAttention(16, gain=0.0)


@pytest.mark.parametrize('arch,variant', [('pgseg', 'paper'), ('pgseg', 'reference'), ('groupvit', 'paper')])
def test_gradient_reaches_every_parameter(arch, variant):
    model = pgseg.build_model(tiny_model_config(arch, variant)).train()
    images, tokens = tiny_batch()
    losses = model.compute_losses(images, tokens)
    assert ('npr' in losses) == (arch == 'pgseg')
    losses['loss'].backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []
    assert torch.isfinite(losses['loss'])


def test_multi_label_tokens():
    cfg = tiny_model_config('groupvit')
    cfg.multi_label = 2
    model = pgseg.build_model(cfg).train()
    images, tokens = tiny_batch()
    prompts = pgseg.tokenize(['a photo of a dog'] * 8, context_length=16).reshape(4, 2, 16)
    losses = model.compute_losses(images, torch.cat([tokens.unsqueeze(1), prompts], dim=1))
    assert 'multi_label' in losses and losses['multi_label'] > 0
    torch.testing.assert_close(losses['loss'], losses['itc'] + losses['multi_label'])
    losses['loss'].backward()
    assert model.multi_label_logit_scale.grad is not None


def test_noun_grounding_in_the_model():
    cfg = tiny_model_config('pgseg', 'paper')
    cfg.grounding_weight = 0.5
    with pytest.raises(ConfigError, match='model.multi_label'):
        pgseg.build_model(cfg)
    cfg.multi_label, cfg.multi_label_loss_weight = 2, 0.0
    model = pgseg.build_model(cfg).train()
    images, tokens = tiny_batch()
    prompts = pgseg.tokenize(['a photo of a dog', 'a photo of a cat'] * 4, context_length=16).reshape(4, 2, 16)
    running = model.img_projector.linear_hidden[1].running_mean.clone()
    losses = model.compute_losses(images, torch.cat([tokens.unsqueeze(1), prompts], dim=1))
    assert 'multi_label' not in losses  # weight 0: GroupViT's loss is skipped, its prompts still feed grounding
    assert losses['grounding'] > 0
    torch.testing.assert_close(losses['loss'], losses['itc'] + losses['npr'] + 0.5 * losses['grounding'])
    # the groups are projected with frozen statistics: only the pooled embedding moves the running mean, once
    model.img_projector(model.img_encoder(images).tokens.mean(dim=1))
    assert not torch.equal(running, model.img_projector.linear_hidden[1].running_mean)
    model.zero_grad()
    losses['grounding'].backward()
    last_grouping = [layer.downsample for layer in model.img_encoder.layers if layer.downsample is not None][-1]
    assert last_grouping.assign.v_proj.weight.grad.abs().sum() > 0
    # the soft variant weights the groups by their mean soft assignment: another value, the same terms
    model.cfg.grounding_area = 'soft'
    soft = model.compute_losses(images, torch.cat([tokens.unsqueeze(1), prompts], dim=1))
    assert torch.isfinite(soft['grounding']) and soft['grounding'] > 0
    model.cfg.grounding_area = 'hard'
    # padding prompts (the caption again) are not nouns: with one real noun per image there is nothing to contrast
    padded = torch.stack([tokens, prompts[:, 0], tokens], dim=1)
    assert float(model.compute_losses(images, padded)['grounding'].detach()) == 0.0


def test_group_word_loss_in_the_model():
    cfg = tiny_model_config('pgseg', 'paper')
    cfg.group_word_weight = 0.5
    with pytest.raises(ConfigError, match='model.multi_label'):
        pgseg.build_model(cfg)
    cfg.multi_label = 2
    model = pgseg.build_model(cfg).train()
    images, tokens = tiny_batch()
    nouns = ['dog', 'cat', 'bird', 'car', 'dog', 'tree', 'boat', 'sky']
    prompts = pgseg.tokenize([f'a photo of a {n}' for n in nouns], context_length=16).reshape(4, 2, 16)
    losses = model.compute_losses(images, torch.cat([tokens.unsqueeze(1), prompts], dim=1))
    torch.testing.assert_close(losses['loss'], losses['itc'] + losses['npr'] + losses['multi_label']
                               + 0.5 * losses['group_word'])
    assert losses['group_word'] > 0
    model.zero_grad()
    losses['group_word'].backward()
    last_grouping = [layer.downsample for layer in model.img_encoder.layers if layer.downsample is not None][-1]
    assert last_grouping.assign.v_proj.weight.grad.abs().sum() > 0
    assert model.text_encoder.token_embedding.weight.grad.abs().sum() > 0
    keys = pgseg.losses.objective._prompt_keys(prompts)
    assert keys[0, 0] == keys[2, 0] and len(set(keys.flatten().tolist())) == 7
    # every caption holds the same two nouns: no image is a negative, so there is nothing to learn
    same = pgseg.tokenize(['a photo of a dog', 'a photo of a cat'] * 4, context_length=16).reshape(4, 2, 16)
    value = model.compute_losses(images, torch.cat([tokens.unsqueeze(1), same], dim=1))['group_word']
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-6)
    # before model.noun_losses_start_step the trainer passes noun_losses=False: the noun losses are left out
    early = model.compute_losses(images, torch.cat([tokens.unsqueeze(1), prompts], dim=1), noun_losses=False)
    assert 'group_word' not in early and 'multi_label' in early
    assert 'group_word' in model.compute_losses(images, torch.cat([tokens.unsqueeze(1), prompts], dim=1),
                                                noun_losses=True)


@pytest.mark.parametrize('variant', ['paper', 'reference'])
def test_training_losses_do_not_depend_on_padding(variant):
    """The trainer cuts every batch's padding after its last EOT: each loss must be what the full context gives."""
    cfg = tiny_model_config('pgseg', variant)
    cfg.multi_label, cfg.grounding_weight = 2, 1.0
    model = pgseg.build_model(cfg).train()
    images, tokens = tiny_batch()
    prompts = pgseg.tokenize(['a photo of a dog', 'a photo of a cat'] * 4, context_length=16).reshape(4, 2, 16)
    full = torch.cat([tokens.unsqueeze(1), prompts], dim=1)
    trimmed = pgseg.data.text.trim_padding(full)
    assert trimmed.shape[-1] < full.shape[-1]
    twin = copy.deepcopy(model)  # a training forward moves the prototype buffers: each call gets the same start
    torch.manual_seed(0)
    a = model.compute_losses(images, full)
    torch.manual_seed(0)
    b = twin.compute_losses(images, trimmed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)


def test_eval_never_mutates_buffers():
    model = pgseg.build_model(tiny_model_config('pgseg', 'reference')).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, tokens = tiny_batch()
    with torch.no_grad():
        model.compute_losses(images, tokens)
        model.class_embeddings(['cat', 'dog'])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _step_buffers(model, images, tokens):
    """What the trainer does to the buffers in a step: the objective's losses, the backward pass, then the momentum
    updates the objective returned."""
    objective = build_objective(model)
    losses, updates = objective(images, tokens)
    losses['loss'].backward()
    objective.apply_updates(updates)
    return losses


def test_momentum_updates_by_variant():
    images, tokens = tiny_batch()
    ref = pgseg.build_model(tiny_model_config('pgseg', 'reference')).train()
    mu_img, mu_txt = ref.img_encoder.layers[0].downsample_spatial.mu.clone(), ref.text_encoder.Atten.mu.clone()
    ref.compute_losses(images, tokens)
    assert torch.equal(ref.text_encoder.Atten.mu, mu_txt)  # a loss never moves a buffer
    _step_buffers(ref, images, tokens)
    assert torch.equal(ref.img_encoder.layers[0].downsample_spatial.mu, mu_img)  # the release never updates it
    assert not torch.equal(ref.text_encoder.Atten.mu, mu_txt)
    paper = pgseg.build_model(tiny_model_config('pgseg', 'paper')).train()
    mu_img = paper.img_encoder.layers[0].downsample_spatial.mu.clone()
    mu_tok = paper.text_encoder.token_prototypes.mu.clone()
    _step_buffers(paper, images, tokens)
    new = paper.img_encoder.layers[0].downsample_spatial.mu
    # stage-0 EM runs on the patch embeddings, which no noise touches: the update can be recomputed exactly
    x0, grid = paper.img_encoder.patch_embed(images)
    em, _ = em_prototypes(x0 + resize_pos_embed(paper.img_encoder.pos_embed, grid), mu_img, 10)
    expected = 0.9 * mu_img + 0.1 * em.mean(dim=0, keepdim=True)
    torch.testing.assert_close(new, expected / (1e-6 + expected.norm(dim=-1, keepdim=True)), atol=1e-5, rtol=1e-5)
    assert not torch.equal(paper.text_encoder.token_prototypes.mu, mu_tok)


def test_paper_variant_leaves_projection_running_stats_to_inference_batches(tiny_cfg):
    model = pgseg.build_model(tiny_cfg).train()
    images, tokens = tiny_batch()
    bn = model.text_projector.linear_hidden[1]
    model.img_encoder.requires_grad_(False)
    with torch.no_grad():
        model.compute_losses(images, tokens)
        after_losses = bn.running_mean.clone()
        bn.reset_running_stats()
        model.text_projector(model.text_encoder(tokens))
    # the running statistics moved only by the caption batch, not by the prototype batch
    torch.testing.assert_close(bn.running_mean, after_losses)


@pytest.mark.parametrize('variant', ['paper', 'reference'])
def test_image_pooling_after_projection(variant):
    """model.image_pooling=embeds: the image embedding is the mean of the projected groups, and in training the
    projection head's BatchNorm takes its statistics from the B*G groups that inference projects one by one."""
    cfg = tiny_model_config('pgseg', variant)
    cfg.image_pooling = 'embeds'
    model = pgseg.build_model(cfg)
    images, tokens = tiny_batch()
    model.eval()
    out = model.encode_image(images)
    torch.testing.assert_close(out.image_embeds, out.group_embeds.mean(dim=1))
    model.train()
    bn = model.img_projector.linear_hidden[1]
    model.img_encoder.eval()  # no Gumbel noise: the training forward below sees these tokens
    with torch.no_grad():
        tokens_out = model.img_encoder(images).tokens  # [B, G, C]
        model.compute_losses(images, tokens)
    lin = model.img_projector.linear_hidden[0]
    hidden = F.linear(tokens_out.reshape(-1, tokens_out.shape[-1]), lin.weight.squeeze(-1), lin.bias)
    torch.testing.assert_close(bn.running_mean, bn.momentum * hidden.mean(dim=0), atol=1e-5, rtol=1e-4)
    cfg.image_pooling = 'max'
    with pytest.raises(pgseg.ConfigError, match='image_pooling'):
        pgseg.build_model(cfg)


def test_group_balance_in_the_model():
    """model.balance_weight: the patches' shares of the final groups under the training assignment, with a gradient
    into both groupings' assignment projections."""
    cfg = tiny_model_config()
    cfg.balance_weight, cfg.balance_min_groups = 0.5, 3.0
    model = pgseg.build_model(cfg).train()
    images, tokens = tiny_batch()
    losses = model.compute_losses(images, tokens)
    feats = model.img_encoder(images)
    usage = pgseg.losses.objective._final_group_usage(feats, cfg.image.assign_temperature)
    assert usage.shape == (images.shape[0], cfg.image.num_output_groups[-1])
    torch.testing.assert_close(usage.sum(dim=-1), torch.ones(images.shape[0]))
    assert 0.0 <= losses['balance'].item() <= math.log(3.0) + 1e-6
    model.zero_grad()
    pgseg.losses.group_balance_loss(usage, 8.0).backward()  # 8 > G: never met, always a gradient
    for stage in model.img_encoder.layers:
        if stage.downsample is not None:
            assert stage.downsample.assign.q_proj.weight.grad.abs().sum() > 0
    bad = tiny_model_config()
    bad.balance_min_groups = 0.5
    with pytest.raises(pgseg.ConfigError, match='balance'):
        pgseg.build_model(bad)


def test_class_embeddings_normalised_and_mode_restored(tiny_cfg):
    model = pgseg.build_model(tiny_cfg).train()
    emb = model.class_embeddings(['cat', 'dog', 'sky'], templates=('a photo of a {}.', 'a {}'))
    assert emb.shape == (3, tiny_cfg.output_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert model.training


def test_resize_pos_embed():
    table = torch.randn(1, 16, 8)
    assert resize_pos_embed(table, (4, 4)) is table
    out = resize_pos_embed(table, (6, 3))
    assert out.shape == (1, 18, 8)
    with pytest.raises(ValueError, match='square'):
        resize_pos_embed(torch.randn(1, 15, 8), (3, 5))


def test_official_sizes_and_keys():
    """The official configurations have the official parameter counts and state-dict keys
    (docs/fidelity.md#model-configuration, docs/fidelity.md#checkpoint-format)."""
    cfg = pgseg.load_config(os.path.join(ROOT, 'configs', 'pgseg_gcc_redcaps.yaml')).model
    cfg.npr.variant = 'reference'
    model = pgseg.build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 64_677_394
    keys = model.state_dict().keys()
    assert len(keys) == 437
    cfg.arch = 'groupvit'
    groupvit = pgseg.build_model(cfg).state_dict()
    assert len(groupvit) == 406
    assert sum(v.numel() for k, v in groupvit.items() if 'running' not in k and 'num_batches' not in k) == 55_726_609
    assert set(keys) - set(groupvit) == {k for k in keys if pgseg.checkpoint.NPR_ONLY_KEY.search(k)}
    assert len(set(keys) - set(groupvit)) == 31


def test_bad_model_config_errors():
    cfg = tiny_model_config()
    cfg.image.num_output_groups = [8]
    with pytest.raises(ValueError, match='num_output_groups'):
        pgseg.build_model(cfg)
    cfg = tiny_model_config()
    cfg.npr.num_text_prototypes = 3
    with pytest.raises(pgseg.ConfigError, match='num_text_prototypes'):
        pgseg.build_model(cfg)
    model = pgseg.build_model(tiny_model_config('pgseg', 'paper'))
    with pytest.raises(ValueError, match='reference'):
        model.compute_losses(*tiny_batch(), npr_variant='reference')


@pytest.mark.parametrize('variant', ['paper', 'reference'])
def test_npr_terms_combine_and_matching_direction(variant, monkeypatch):
    """npr = weight * (sum of stage terms + text_weight * text term); the paper variant maximises the matching."""
    from pgseg.models import matching
    calls = []
    real = matching.hungarian_indices

    def spy(sim, maximize):
        calls.append(maximize)
        return real(sim, maximize)
    monkeypatch.setattr(matching, 'hungarian_indices', spy)
    cfg = tiny_model_config('pgseg', variant)
    cfg.npr.weight, cfg.npr.text_weight = 0.3, 0.2
    losses = pgseg.build_model(cfg).train().compute_losses(*tiny_batch())
    expected = 0.3 * (losses['npr_image_0'] + losses['npr_image_1'] + 0.2 * losses['npr_text'])
    torch.testing.assert_close(losses['npr'].detach(), expected)
    torch.testing.assert_close(losses['loss'].detach(), (losses['itc'] + losses['npr']).detach())
    assert calls == [variant == 'paper'] * 3


def test_valid_token_mask_keeps_exclamation_marks():
    tokens = pgseg.tokenize(['!$', 'a cat'], context_length=8)
    assert tokens[0, 1] == 0  # '!' inside a punctuation run is BPE id 0, the same value as the padding
    mask = valid_token_mask(tokens)
    assert mask[0].tolist() == [False, True, True, True, False, False, False, False]  # !, $, EOT
    assert mask[1].tolist() == [False, True, True, True, False, False, False, False]  # a, cat, EOT


def test_bf16_autocast_losses_are_float32():
    model = pgseg.build_model(tiny_model_config()).train()
    images, tokens = tiny_batch()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = model.compute_losses(images, tokens)
    assert all(v.dtype == torch.float32 for v in losses.values())
    losses['loss'].backward()
    assert torch.isfinite(losses['loss'])


def test_group_class_affinity_by_hand():
    from pgseg.eval.inference import group_class_affinity
    groups, image = torch.randn(1, 3, 4), torch.randn(1, 4)
    classes = F.normalize(torch.randn(5, 4), dim=-1)
    got = group_class_affinity(groups, image, classes, torch.log(torch.tensor(20.0)), topk=2)[0]
    logits = 20 * F.normalize(groups[0], dim=-1) @ classes.t()
    top = (20 * F.normalize(image, dim=-1) @ classes.t()).softmax(-1)[0].topk(2).indices.tolist()
    for g in range(3):
        for k in range(5):
            restricted = logits[g, top].softmax(0)[top.index(k)] if k in top else 0.0
            assert float(got[g, k]) == pytest.approx(float(restricted * logits[g].softmax(0)[k]), abs=1e-6)


def test_attention_kernel_choice():
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends

    from pgseg.models.attention import current_attention_kernel
    model = pgseg.build_model(tiny_model_config()).train()
    cpu = torch.device('cpu')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with model.attention_kernels(cpu):  # CPU bf16 training: shifted bf16 matmuls + softmax, SDPA math for text
            assert current_attention_kernel() == 'shifted'
            assert _cur_sdpa_kernel_backends() == [SDPBackend.MATH]
    model.attention = 'math'
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with model.attention_kernels(cpu):  # math: float32 logits, SDPA's math backend for the text tower
            assert current_attention_kernel() == 'math'
            assert _cur_sdpa_kernel_backends() == [SDPBackend.MATH]
    model.attention = 'auto'
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with torch.no_grad(), model.attention_kernels(cpu):  # inference: fused
            assert current_attention_kernel() == 'fused'
            assert SDPBackend.FLASH_ATTENTION in _cur_sdpa_kernel_backends()
    with model.attention_kernels(cpu):  # fp32 training: fused
        assert current_attention_kernel() == 'fused'
    assert current_attention_kernel() == 'fused'  # the default outside any choice
    model.attention = 'math'
    with torch.no_grad(), model.attention_kernels(cpu):
        assert current_attention_kernel() == 'math'
    model.cfg.attention = 'flash'
    expected = "model.attention must be 'auto', 'math', 'shifted' or 'fused', got 'flash'"
    with pytest.raises(pgseg.ConfigError, match=expected):
        pgseg.config.validate(model.cfg)


def test_matmul_attention_matches_sdpa():
    """pgseg's Attention (timm's parameters and keys) gives timm's output and gradients with either kernel."""
    from timm.layers import Attention as TimmAttention

    from pgseg.models.attention import Attention, attention_kernel
    torch.manual_seed(0)
    ours, ref = Attention(32, num_heads=4, qkv_bias=True), TimmAttention(32, num_heads=4, qkv_bias=True)
    assert ours.load_state_dict(ref.state_dict()) is not None and ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    ours, ref = ours.double(), ref.double()
    expected = ref(x)
    (g_ref,) = torch.autograd.grad(expected.square().sum(), x)
    for kernel in ('fused', 'math', 'shifted'):
        with attention_kernel(kernel):
            got = ours(x)
        (g,) = torch.autograd.grad(got.square().sum(), x)
        assert torch.allclose(got, expected, atol=1e-10), kernel
        assert torch.allclose(g, g_ref, atol=1e-10), kernel
    with pytest.raises(ValueError, match="attention kernel must be one of 'fused', 'math', 'shifted', got 'flash'"):
        with attention_kernel('flash'):
            pass


def test_matmul_kernel_keeps_logits_in_float32_under_bf16_autocast():
    """Large logits (a trained model's) rounded to bf16 shift the softmax: about 0.08 off here, against bf16's own
    output rounding (below 0.016) when the logits and the softmax stay in float32."""
    from pgseg.models.attention import attention_kernel, scaled_dot_product_attention
    torch.manual_seed(0)
    q, k = (torch.randn(2, 2, 50, 16) * 3).bfloat16(), (torch.randn(2, 2, 50, 16) * 3).bfloat16()
    v = torch.randn(2, 2, 50, 16).bfloat16()
    exact = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4, -1) @ v.double()
    with attention_kernel('math'), torch.autocast('cpu', dtype=torch.bfloat16):
        out = scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert (out.double() - exact).abs().max() < 0.016


def test_shifted_kernel_keeps_large_logits_precise_in_bf16():
    """The shifted kernel computes in bf16 throughout, yet its output stays within bf16's own output rounding of the
    exact attention at logits up to about 30, where plain bf16 logits are off by 0.08; its gradients are as close to
    float64's as the float32-logit kernel's."""
    from pgseg.models.attention import attention_kernel, scaled_dot_product_attention
    torch.manual_seed(0)
    q, k = (torch.randn(2, 2, 50, 16) * 3).bfloat16(), (torch.randn(2, 2, 50, 16) * 3).bfloat16()
    v, grad = torch.randn(2, 2, 50, 16).bfloat16(), torch.randn(2, 2, 50, 16)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    exact = torch.softmax(q64 @ k64.transpose(-1, -2) / 4, -1) @ v64
    exact_grads = torch.autograd.grad(exact, (q64, k64, v64), grad.double())
    errors = {}
    for kernel in ('math', 'shifted'):
        qk = [t.clone().requires_grad_() for t in (q, k, v)]
        with attention_kernel(kernel), torch.autocast('cpu', dtype=torch.bfloat16):
            out = scaled_dot_product_attention(*qk)
        grads = torch.autograd.grad(out, qk, grad.bfloat16())
        errors[kernel] = [float((g.double() - e).norm() / e.norm()) for g, e in zip(grads, exact_grads)]
        assert out.dtype == torch.bfloat16
        assert (out.double() - exact).abs().max() < 0.016, kernel
    plain = torch.softmax((q @ k.transpose(-1, -2)) / 4, -1) @ v  # bf16 logits, no shift
    assert (plain.double() - exact).abs().max() > 0.05
    for shifted, float32_logits in zip(errors['shifted'], errors['math']):
        assert shifted < 2 * float32_logits + 2e-3, errors


@pytest.mark.parametrize('kernel', ['math', 'shifted'])
def test_matmul_kernels_equal_exact_attention_in_float64_for_cross_attention(kernel):
    """The grouping blocks' cross-attention: 8 group tokens attend to 50 image tokens (S != N). In float64 both
    matmul kernels are the exact attention, the shifted one included (its shift cancels in the softmax)."""
    from pgseg.models.attention import attention_kernel, scaled_dot_product_attention
    torch.manual_seed(0)
    q = torch.randn(2, 3, 8, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, 50, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    exact = torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v
    with attention_kernel(kernel):
        out = scaled_dot_product_attention(q, k, v)
    assert out.shape == (2, 3, 8, 16) and torch.allclose(out, exact, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    exact_grads = torch.autograd.grad(exact.square().sum(), (q, k, v))
    for g, e in zip(grads, exact_grads):
        assert torch.allclose(g, e, atol=1e-10)


def test_matmul_kernel_routes_every_image_attention(monkeypatch):
    """Under the matmul kernel no attention of the image tower (ViT blocks, grouping blocks) reaches SDPA."""
    import torch.nn.functional as F

    from pgseg.models.attention import attention_kernel
    model = pgseg.build_model(tiny_model_config()).train()
    images, _ = tiny_batch()
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    for kernel in ('math', 'shifted'):
        with attention_kernel(kernel):
            model.img_encoder(images)
        assert calls == [], kernel
    with attention_kernel('fused'):
        model.img_encoder(images)
    groupings = sum(layer.downsample is not None for layer in model.img_encoder.layers)  # one cross-attention each
    assert groupings > 0 and len(calls) == sum(model.cfg.image.depths) + groupings


@pytest.mark.parametrize('attention', ['auto', 'math', 'shifted', 'fused'])
def test_activation_checkpointing_under_cpu_bf16_attention_matches(attention):
    """The CPU bf16 training path runs attention as matmuls + softmax (``auto`` = ``shifted``, ``math``) or flash
    (``fused``); checkpointed blocks must be recomputed with the same kernels (a different kernel saves different
    tensors and checkpointing refuses), in both towers."""
    images, tokens = tiny_batch()
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        cfg = tiny_model_config()
        cfg.attention = attention
        model = pgseg.build_model(cfg).train()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(1)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = model.compute_losses(images, tokens)['loss']
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-3, atol=1e-5), name
