"""Rollout correction (--rollout_is) and GSPO's sequence-level ratio (--ratio_level sequence),
each against a reference written out per token or per trace, with a sampler-vs-trainer mismatch
injected: on the CPU in fp32 the two agree to ~1e-6, where every weight is 1 and a test that did
not inject one could not fail."""

import math

import pytest
import torch

from cli import parse_config
from conftest import loss_row
from grpo import GRPOConfig, check_config
from objective import policy_loss, rollout_is_sums, rollout_is_weights

# two traces of 3 and 2 response tokens (trace ids 0 and 1), the first token a prompt position
MASK = torch.tensor([0.0, 1, 1, 1, 0, 1, 1])
SEQ = torch.tensor([0, 0, 0, 0, 1, 1, 1])
ADV = torch.tensor([1.0, 1, 1, 1, -0.5, -0.5, -0.5])
OLD = torch.tensor([0.0, -1.0, -0.5, -2.0, 0.0, -0.3, -1.2])
# the sampler's log-probs of the same tokens; old - sampler: 0.1, -1.0, 0.9 (trace 0) and -0.2, 0.05 (trace 1)
SAMPLER = torch.tensor([0.0, -1.1, 0.5, -2.9, 0.0, -0.1, -1.25])
NEW = torch.tensor([0.0, -0.9, -0.45, -1.7, 0.0, -0.35, -1.0])


def row():
    return loss_row(OLD, OLD, ADV, MASK, SEQ, sampler=SAMPLER)


def pg(ratio, a, lo=0.2, hi=0.2):
    """PPO's clipped per-token loss, max(-A r, -A clip(r)), by hand."""
    return max(-a * ratio, -a * min(max(ratio, 1 - lo), 1 + hi))


def loss_and_grad(cfg, n_tokens=5, n_seqs=2):
    new = NEW.clone().requires_grad_(True)
    loss, sums = policy_loss(new, torch.zeros(7), row(), cfg, n_tokens, n_seqs)
    loss.backward()
    return float(loss.detach()), new.grad, sums


def reference(per_token_loss):
    """The loss and its gradient of a per-token loss written with Python floats per token (autograd
    through plain scalar arithmetic: no tensor code of the project)."""
    new = [torch.tensor(float(x), requires_grad=True) for x in NEW]
    loss = per_token_loss(new)
    loss.backward()
    return float(loss.detach()), torch.tensor([float(x.grad) if x.grad is not None else 0.0 for x in new])


def test_rollout_correction_token_level_truncates_at_the_cap():
    cfg = GRPOConfig(kl_coef=0.0, rollout_is="token", rollout_is_cap=2.0)
    w = [min(math.exp(OLD[t] - SAMPLER[t]), 2.0) for t in range(7)]  # 1.105, 0.368, 2.460 -> 2; 0.819, 1.051

    def by_hand(new):
        return sum(pg(torch.exp(new[t] - float(OLD[t])), float(ADV[t])) * w[t] for t in range(7) if MASK[t]) / 5

    loss, grad, _ = loss_and_grad(cfg)
    want, want_grad = reference(by_hand)
    assert loss == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    off, _, _ = loss_and_grad(GRPOConfig(kl_coef=0.0))
    assert abs(off - loss) > 1e-2, "the injected mismatch must change the loss"


def test_rollout_correction_sequence_level_weights_a_trace_by_its_product():
    cfg = GRPOConfig(kl_coef=0.0, rollout_is="sequence", rollout_is_cap=2.0)
    # trace 0: exp(0.1 - 1.0 + 0.9) = 1; trace 1: exp(-0.2 + 0.05) = 0.861
    w = {0: min(math.exp(0.1 - 1.0 + 0.9), 2.0), 1: math.exp(-0.2 + 0.05)}

    def by_hand(new):
        return sum(pg(torch.exp(new[t] - float(OLD[t])), float(ADV[t])) * w[int(SEQ[t])]
                   for t in range(7) if MASK[t]) / 5

    loss, grad, _ = loss_and_grad(cfg)
    want, want_grad = reference(by_hand)
    assert loss == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_the_two_sided_mask_leaves_out_tokens_outside_its_bounds():
    cfg = GRPOConfig(kl_coef=0.0, rollout_is="token", rollout_is_mode="mask", rollout_is_cap=2.0, rollout_is_floor=0.5)
    raw = [math.exp(OLD[t] - SAMPLER[t]) for t in range(7)]
    kept = [0.5 <= r <= 2.0 for r in raw]
    assert [k for k, m in zip(kept, MASK) if m] == [True, False, False, True, True]  # 1.105, 0.368, 2.460, 0.819, 1.051

    loss, grad, _ = loss_and_grad(cfg)
    assert grad[2] == 0 and grad[3] == 0 and grad[1] != 0 and grad[5] != 0
    want, _ = reference(lambda new: sum(pg(torch.exp(new[t] - float(OLD[t])), float(ADV[t])) * raw[t]
                                        for t in range(7) if MASK[t] and kept[t]) / 5)
    assert loss == pytest.approx(want, rel=1e-5)
    sums = rollout_is_sums(row(), cfg)
    assert float(sums["is_outside"]) == 2 and float(sums["is_max"]) == pytest.approx(math.exp(0.9), rel=1e-5)
    assert float(sums["is_weight"]) == pytest.approx(sum(r for r, m in zip(raw, MASK) if m), rel=1e-5)


def test_truncated_weights_are_counted_over_the_cap_only():
    cfg = GRPOConfig(rollout_is="token", rollout_is_cap=2.0)
    applied, raw = rollout_is_weights(row(), cfg)
    assert float(applied.max()) == 2.0 and float(raw.max()) == pytest.approx(math.exp(0.9), rel=1e-5)
    assert float(rollout_is_sums(row(), cfg)["is_outside"]) == 1  # 2.46 over the cap; 0.37 kept as it is


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_gspo_sequence_ratio_against_a_per_trace_reference(agg):
    lo, hi = 0.02, 0.03  # narrow, so that trace 0's ratio is clipped and trace 1's is not
    cfg = GRPOConfig(kl_coef=0.0, ratio_level="sequence", clip_ratio_low=lo, clip_ratio_high=hi, loss_agg=agg)
    traces = {0: [1, 2, 3], 1: [5, 6]}

    def by_hand(new):
        total = 0.0
        for i, tokens in traces.items():
            s = torch.exp(sum(new[t] - float(OLD[t]) for t in tokens) / len(tokens))  # the geometric mean
            loss_i = pg(s, float(ADV[tokens[0]]), lo, hi)
            total = total + (loss_i / 2 if agg == "seq-mean-token-mean" else loss_i * len(tokens) / 5)
        return total

    loss, grad, sums = loss_and_grad(cfg)
    want, want_grad = reference(by_hand)
    assert loss == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    # trace 0: s = exp(0.45 / 3) = 1.16 > 1.03 with A > 0: clipped whole, no gradient; trace 1:
    # s = exp(0.15 / 2) = 1.08 with A < 0, unclipped (PPO's max keeps the larger loss)
    assert torch.all(grad[1:4] == 0) and torch.all(grad[5:7] != 0)
    assert float(sums["clip_frac"]) == 3  # the clipped trace's 3 tokens
    token, _, _ = loss_and_grad(GRPOConfig(kl_coef=0.0, clip_ratio_low=lo, clip_ratio_high=hi, loss_agg=agg))
    assert abs(token - loss) > 1e-3, "per-token ratios give another loss"


@pytest.mark.parametrize("flags, match", [
    (["--rollout_is", "token", "--no-recompute_old_logprobs"], r"--rollout_is 'token': .*--recompute_old_logprobs"),
    (["--rollout_is_cap", "0.5"], r"--rollout_is_cap 0.5: must be >= 1"),
    (["--rollout_is_floor", "1.5"], r"--rollout_is_floor 1.5: must be in \[0, 1\]"),
])
def test_corrections_are_checked_by_flag(flags, match):
    cfg, _ = parse_config(GRPOConfig, flags)
    with pytest.raises(ValueError, match=match):
        check_config(cfg, world_size=1)


@pytest.mark.parametrize("flags", [["--rollout_is", "seq"], ["--ratio_level", "trace"], ["--rollout_is_mode", "clip"]])
def test_corrections_take_only_their_choices(flags):
    with pytest.raises(SystemExit):
        parse_config(GRPOConfig, flags)


def test_corrections_are_off_by_default():
    cfg = GRPOConfig()
    assert cfg.rollout_is == "off" and cfg.ratio_level == "token"


def test_a_token_level_mask_holds_per_token_under_the_sequence_ratio():
    # GSPO's ratio is one value per trace; the correction's weights must still act per token
    cfg = GRPOConfig(kl_coef=0.0, ratio_level="sequence", rollout_is="token", rollout_is_mode="mask",
                     loss_agg="seq-mean-token-mean")
    _, grad, _ = loss_and_grad(cfg)
    assert grad[2] == 0 and grad[3] == 0, grad  # weights 0.37 and 2.46: masked
    assert grad[1] != 0 and grad[5] != 0 and grad[6] != 0
