"""Each loss against a computation written out by hand."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pgseg.losses import contrastive_loss, multi_label_contrastive_loss, prototype_contrastive_loss


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
