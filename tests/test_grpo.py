"""GRPO's pieces (objective.py, passes.py) against values worked out by hand."""

import math

import pytest
import torch

from grpo import GRPOConfig
from conftest import loss_row
from objective import group_advantages, kl_penalty, policy_loss
from passes import Trace, pack_rows


def loss(x, cfg, **counts):
    """policy_loss on loss_inputs-shaped tensors (logp, old, ref, adv, mask, ent, seq)."""
    logp, old, ref, adv, mask, ent, seq = x
    return policy_loss(logp, ent, loss_row(old, ref, adv, mask, seq), cfg, **counts)


def test_group_advantages_by_hand():
    r = torch.tensor([1., -1., -1., 1., 1., 1.])  # groups of 3: (1,-1,-1) and (1,1,1)
    adv = group_advantages(r, 3)
    mean, std = -1 / 3, math.sqrt(((4 / 3) ** 2 + 2 * (2 / 3) ** 2) / 2)  # unbiased std
    expected = torch.tensor([(1 - mean) / std, (-1 - mean) / std, (-1 - mean) / std, 0, 0, 0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    dr = group_advantages(r, 3, norm_by_std=False)
    torch.testing.assert_close(dr, torch.tensor([4 / 3, -2 / 3, -2 / 3, 0, 0, 0]))


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    d = logp - ref  # 0.5, -1.0
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), d)
    torch.testing.assert_close(kl_penalty(logp, ref, "mse"), torch.tensor([0.125, 0.5]))
    k3 = torch.tensor([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1])
    torch.testing.assert_close(kl_penalty(logp, ref, "low_var_kl"), k3)
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([30.0]), "low_var_kl").item() == 10.0
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(logp, ref, "k4")


@pytest.mark.parametrize("estimator", ["k1", "mse", "low_var_kl"])
def test_kl_gradient_is_finite_far_from_the_reference(estimator):
    """A token 100 nats below (or above) the reference: exp(-log_ratio) overflows fp32 past ~88,
    and backward through a clamp of inf is 0 * inf = NaN unless the exponent is clamped first."""
    logp = torch.tensor([-100.0, 0.0, -1.0], requires_grad=True)
    ref = torch.tensor([0.0, -100.0, -1.5])
    kl = kl_penalty(logp, ref, estimator)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(logp.grad).all(), f"{kl} {logp.grad}"
    if estimator == "low_var_kl":
        assert kl[:2].tolist() == [10.0, 10.0]  # clamped either way, as verl does
        # inside the clamps the gradient is k3's own: d/dlogp (e^-d + d - 1) = 1 - e^-d, d = 0.5
        torch.testing.assert_close(logp.grad[2], torch.tensor(1 - math.exp(-0.5)))


def loss_inputs():
    # Two sequences of 3 tokens; the last token of sequence 1 is padding (mask 0).
    logp = torch.tensor([-1.0, -0.5, -2.0, -1.2, -0.8, -9.0])
    old = torch.tensor([-1.0, -0.9, -1.0, -1.2, -0.3, -1.0])
    ref = torch.tensor([-1.1, -0.5, -2.0, -1.0, -0.3, -1.0])
    adv = torch.tensor([1.0, 1.0, 1.0, -2.0, -2.0, -2.0])
    mask = torch.tensor([1, 1, 1, 1, 1, 0])
    ent = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1, 7.0])
    seq = torch.tensor([0, 0, 0, 1, 1, 1])
    return logp, old, ref, adv, mask, ent, seq


def by_hand(cfg, logp, old, ref, adv, mask, ent, seq):
    per = []
    for i in range(6):
        ratio = math.exp(logp[i] - old[i])
        clipped = min(max(ratio, 1 - cfg.clip_ratio_low), 1 + cfg.clip_ratio_high)
        pg = max(-adv[i] * ratio, -adv[i] * clipped)
        kl = math.exp(ref[i] - logp[i]) - (ref[i] - logp[i]) - 1
        per.append(float(pg + cfg.kl_coef * kl - cfg.entropy_coef * ent[i]))
    if cfg.loss_agg == "token-mean":
        return sum(p for p, m in zip(per, mask) if m) / int(mask.sum())
    s0 = sum(per[:3]) / 3
    s1 = (per[3] + per[4]) / 2
    return (s0 + s1) / 2


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_by_hand(agg):
    cfg = GRPOConfig(kl_coef=0.1, entropy_coef=0.01, loss_agg=agg, clip_ratio_high=0.28)
    x = loss_inputs()
    total, sums = loss(x, cfg, n_tokens=5, n_seqs=2)
    assert total.item() == pytest.approx(by_hand(cfg, *x), rel=1e-6)
    # Clipping binds where the ratio left [0.8, 1.28] in the advantage's favour: token 1
    # (ratio e^0.4, A > 0) and token 4 (ratio e^-0.5, A < 0); not token 2 (e^-1, A > 0).
    assert sums["clip_frac"].item() == 2


@pytest.mark.parametrize("agg,splits", [
    ("token-mean", ([3], [2, 4], [1, 3, 5])),
    ("seq-mean-token-mean", ([3],)),  # rows never split a sequence, so split at its boundary
])
def test_micro_batch_losses_add_up_to_the_full_loss(agg, splits):
    cfg = GRPOConfig(kl_coef=0.1, loss_agg=agg)
    x = loss_inputs()
    full, _ = loss(x, cfg, n_tokens=5, n_seqs=2)
    for split in splits:
        bounds = [0, *split, 6]
        parts = [loss([t[a:b] for t in x], cfg, n_tokens=5, n_seqs=2)[0]
                 for a, b in zip(bounds, bounds[1:])]
        torch.testing.assert_close(sum(parts), full, msg=f"split {split}")


def test_ratio_one_gives_the_policy_gradient():
    cfg = GRPOConfig(kl_coef=0.0, entropy_coef=0.0)
    logp, _, ref, adv, mask, ent, seq = loss_inputs()
    logp = logp.clone().requires_grad_()
    total, _ = loss((logp, logp.detach(), ref, adv, mask, ent, seq), cfg, n_tokens=5, n_seqs=2)
    total.backward()
    # d/dlogp of -A * exp(logp - old) at logp == old is -A; token mean over the 5 real tokens.
    torch.testing.assert_close(logp.grad, -adv * mask / 5)


def test_pack_rows_marks_response_targets():
    seqs = [Trace([1, 2, 3, 4, 5], 3, 0.5, [-0.1, -0.2]), Trace([6, 7, 8], 2, -1.0, [-0.3])]
    rows = pack_rows(seqs, max_tokens=6)
    assert len(rows) == 1
    r = rows[0]
    assert r.ids.tolist() == [1, 2, 3, 4, 6, 7] and r.targets.tolist() == [2, 3, 4, 5, 7, 8]
    assert r.positions.tolist() == [0, 1, 2, 3, 0, 1] and r.doc_lens == [4, 2] and r.traces == [0, 1]
    assert r.mask.tolist() == [0, 0, 1, 1, 0, 1] and r.response_tokens == 3  # targets 4, 5 and 8 are response tokens
    assert r.advantages.tolist() == [0.5] * 4 + [-1.0] * 2 and r.seq.tolist() == [0] * 4 + [1] * 2
    torch.testing.assert_close(r.sampler_logprobs, torch.tensor([0.0, 0.0, -0.1, -0.2, 0.0, -0.3]))
    assert len(pack_rows(seqs, max_tokens=5)) == 2


def test_sampler_trainer_mismatch_figures_by_hand():
    from objective import logprob_mismatch, mismatch_metrics
    # 100 response tokens: 98 off by 0.01, one by -0.5, one by 3; one prompt token (mask 0) by 50
    sampler = torch.tensor([0.01] * 98 + [-0.5, 3.0, 50.0])
    trainer, mask = torch.zeros(101), torch.tensor([1.0] * 100 + [0.0])
    # two rows summed as passes.old_and_ref_logprobs sums them over rows and ranks
    a, b = logprob_mismatch(trainer[:60], sampler[:60], mask[:60]), logprob_mismatch(trainer[60:], sampler[60:], mask[60:])
    sums = {k: torch.maximum(a[k], b[k]) if k == "max" else a[k] + b[k] for k in a}
    m = mismatch_metrics(sums)
    d = [0.01] * 98 + [-0.5, 3.0]
    assert m["rollout_logprob_diff_mean"] == pytest.approx(sum(map(abs, d)) / 100)
    assert m["rollout_logprob_diff_max"] == pytest.approx(3.0), "the prompt token is not counted"
    assert m["rollout_kl_k1"] == pytest.approx(sum(d) / 100)
    assert m["rollout_kl_k3"] == pytest.approx(sum(math.exp(-x) + x - 1 for x in d) / 100)
    # the 99th of 100 is |-0.5|: reported as the upper edge of its bin, at most 15.5% above it
    assert 0.5 <= m["rollout_logprob_diff_p99"] <= 0.5 * 10 ** (1 / 16)


def test_importing_the_trainer_pulls_in_neither_the_demo_nor_transformers():
    import subprocess
    import sys
    from pathlib import Path
    code = "import sys, grpo; print(sorted(m for m in sys.modules if m.split('.')[0] in ('demo', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
