"""Each loss against a computation written out by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pgseg.losses import (
    contrastive_loss,
    group_balance_loss,
    group_word_loss,
    multi_label_contrastive_loss,
    noun_grounding_loss,
    prototype_contrastive_loss,
)


def _ce(logits_row: torch.Tensor, target: int) -> float:
    return float(-logits_row[target] + torch.logsumexp(logits_row, 0))


def test_contrastive_loss_by_hand():
    img, txt = torch.randn(3, 5), torch.randn(3, 5)
    log_scale = torch.tensor(math.log(10.0))
    i, t = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    sim = 10.0 * i @ t.t()
    expected = 0.5 * (sum(_ce(sim[k], k) for k in range(3)) / 3 + sum(_ce(sim[:, k], k) for k in range(3)) / 3)
    assert abs(float(contrastive_loss(img, txt, log_scale)) - expected) < 1e-5


def test_logit_scale_clamped_at_100():
    img, txt = torch.randn(4, 5), torch.randn(4, 5)
    a = contrastive_loss(img, txt, torch.tensor(math.log(100.0)))
    b = contrastive_loss(img, txt, torch.tensor(math.log(1000.0)))
    torch.testing.assert_close(a, b)


def test_multi_label_loss_by_hand():
    B, K, D = 2, 3, 4
    img, prompts = torch.randn(B, D), torch.randn(B, K, D)
    i, p = F.normalize(img, dim=-1), F.normalize(prompts, dim=-1).reshape(B * K, D)
    s = 5.0
    logits_img = s * i @ p.t()  # [B, B*K]
    loss_img = 0.0
    for b in range(B):
        logp = torch.log_softmax(logits_img[b], 0)
        loss_img += float(-logp[b * K:(b + 1) * K].sum() / K)
    logits_txt = s * p @ i.t()  # [B*K, B]
    loss_txt = sum(_ce(logits_txt[r], r // K) for r in range(B * K))
    expected = 0.5 * (loss_img / B + loss_txt / (B * K))
    got = multi_label_contrastive_loss(img, prompts, torch.tensor(math.log(s)))
    assert abs(float(got) - expected) < 1e-5


def _closs_by_hand(groups, protos, scale, threshold, pair_score):
    """The release's closs written with loops: per sample, per kept pair, one cross-entropy in each direction."""
    g, p = F.normalize(groups, dim=-1), F.normalize(protos, dim=-1)
    B, G, _ = g.shape
    rows_gp, rows_pg = [], []
    for b in range(B):
        sim = g[b] @ p[b].t()  # [group i, proto j]
        for k in range(G):
            def keep(m, k=k):  # normalise column (0 or k) over rows, read row k
                col = m[:, 0] if pair_score == 'column0' else m[:, k]
                return (col[k] - col.min()) / (col.max() - col.min() + 1e-6) > threshold
            if keep(sim):
                rows_gp.append(_ce(scale * sim[:, k], k))  # prototype k against all groups
            if keep(sim.t()):
                rows_pg.append(_ce(scale * sim[k], k))  # group k against all prototypes
    return sum(rows_gp) / len(rows_gp) + sum(rows_pg) / len(rows_pg)


def test_prototype_loss_by_hand_both_variants():
    groups, protos = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    for pair_score in ('column0', 'diagonal'):
        got = prototype_contrastive_loss(groups, protos, torch.tensor(math.log(10.0)), 0.1, pair_score)
        expected = _closs_by_hand(groups, protos, 10.0, 0.1, pair_score)
        assert abs(float(got) - expected) < 1e-4, pair_score


def test_prototype_loss_with_nothing_kept_is_zero_not_nan():
    groups = torch.randn(1, 3, 4)
    # each prototype's best group is another row, so no diagonal entry is the maximum of its column
    protos = groups[:, [1, 2, 0]]
    loss = prototype_contrastive_loss(groups, protos, torch.tensor(0.0), threshold=0.999, pair_score='diagonal')
    assert float(loss) == 0.0


def test_noun_grounding_loss_by_hand():
    B, G, K, D, s = 3, 4, 3, 6, 10.0
    groups, nouns = torch.randn(B, G, D), torch.randn(B, K, D)
    area = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25] * 4, [0.1, 0.2, 0.3, 0.4]])
    valid = torch.tensor([[True, True, True], [True, False, True], [True, False, False]])  # image 2: one noun
    g, n = F.normalize(groups, dim=-1), F.normalize(nouns, dim=-1)
    terms = []
    for b in range(2):  # image 2 has a single valid noun: nothing to contrast
        ks = [k for k in range(K) if valid[b, k]]
        owned = [j for j in range(G) if area[b, j] > 0]
        for k in ks:
            w = torch.stack([area[b, j] * torch.exp(s * n[b, k] @ g[b, j]) for j in owned])
            region = F.normalize((w / w.sum()) @ g[b, owned], dim=0)
            row = torch.stack([s * region @ n[b, j] for j in ks])
            terms.append(_ce(row, ks.index(k)))
    got = noun_grounding_loss(groups, nouns, valid, area, torch.tensor(math.log(s)))
    assert abs(float(got) - sum(terms) / len(terms)) < 1e-5


def test_noun_grounding_loss_asks_for_one_noun_per_group():
    nouns = torch.eye(3)[None]  # three orthogonal nouns
    valid, area = torch.ones(1, 3, dtype=torch.bool), torch.full((1, 3), 1 / 3)
    log_scale = torch.tensor(math.log(50.0))
    # every group carries the whole caption: all regions coincide, the loss sits at log(#nouns)
    mixed = noun_grounding_loss(torch.ones(1, 3, 3), nouns, valid, area, log_scale)
    assert abs(float(mixed) - math.log(3)) < 1e-5
    # one group per noun: near 0
    assert float(noun_grounding_loss(torch.eye(3)[None], nouns, valid, area, log_scale)) < 1e-3
    # a group that wins no patch cannot stand for its noun, however well it matches
    assert float(noun_grounding_loss(torch.eye(3)[None], nouns, valid, torch.tensor([[0.5, 0.5, 0.0]]),
                                     log_scale)) > 0.2
    groups = torch.eye(3)[None].clone().requires_grad_()
    noun_grounding_loss(groups + 0.1, nouns, valid, area, log_scale).backward()
    assert groups.grad.abs().sum() > 0


def test_group_balance_loss_by_hand():
    one = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    two = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    four = torch.full((1, 4), 0.25)
    assert group_balance_loss(one, 3.0).item() == pytest.approx(math.log(3.0), abs=1e-6)
    assert group_balance_loss(two, 3.0).item() == pytest.approx(math.log(3.0) - math.log(2.0), abs=1e-6)
    assert group_balance_loss(four, 3.0).item() == 0.0  # already spread over more than 3 groups: no push
    assert group_balance_loss(torch.cat([one, four]), 3.0).item() == pytest.approx(math.log(3.0) / 2, abs=1e-6)
    usage = two.clone().requires_grad_()
    group_balance_loss(usage, 3.0).backward()
    assert usage.grad[0, 2] < usage.grad[0, 0]  # moving patches into an empty group lowers the loss
    with pytest.raises(ValueError, match='min_groups'):
        group_balance_loss(two, 0.5)


def test_group_word_loss_by_hand():
    """Each prompt scores every image by its best winning group; same-prompt images are not negatives."""
    e = torch.eye(4)
    # image 0: groups (circle, grass); image 1: groups (star, grass); image 2: groups (circle-like, unused star)
    groups = torch.stack([torch.stack([e[0], e[2]]), torch.stack([e[1], e[2]]),
                          torch.stack([F.normalize(e[0] + e[3], dim=0), e[1]])])  # [3, 2, 4]
    area = torch.tensor([[0.3, 0.7], [0.4, 0.6], [1.0, 0.0]])
    prompts = torch.stack([e[0], e[1], e[3]]).unsqueeze(1)  # one prompt per image: circle, star, other: [3, 1, 4]
    keys = torch.tensor([[10], [11], [12]])
    valid = torch.ones(3, 1, dtype=torch.bool)
    s = 10.0
    got = group_word_loss(groups, area, prompts, keys, valid, torch.tensor(math.log(s)))
    c = 1 / math.sqrt(2)
    # scores[prompt, image]: best cosine over the image's groups that win patches (image 2's star group wins none)
    scores = torch.tensor([[1.0, 0.0, c], [0.0, 1.0, 0.0], [0.0, 0.0, c]])
    expected = F.cross_entropy(s * scores, torch.arange(3))
    torch.testing.assert_close(got, expected)
    # image 2 also has the prompt 'circle' (key 10): it is left out of prompt 0's denominator, not a negative
    keys_shared = torch.tensor([[10], [11], [10]])
    got = group_word_loss(groups, area, prompts, keys_shared, valid, torch.tensor(math.log(s)))
    masked = (s * scores).masked_fill(torch.tensor([[False, False, True], [False] * 3, [True, False, False]]),
                                      float('-inf'))
    torch.testing.assert_close(got, F.cross_entropy(masked, torch.arange(3)))
    # padding prompts do not count
    valid[1, 0] = False
    got = group_word_loss(groups, area, prompts, keys, valid, torch.tensor(math.log(s)))
    ce = F.cross_entropy(s * scores, torch.arange(3), reduction='none')
    torch.testing.assert_close(got, (ce[0] + ce[2]) / 2)
