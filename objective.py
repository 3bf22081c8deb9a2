"""GRPO's objective as pure functions on tensors: group advantages, the KL estimators, the
clipped surrogate (with dual clip, GSPO's sequence-level ratio, and rollout correction's
weights), and DAPO's overlong penalty and all-equal-group filter.
grpo.py calls them; tests check them against values worked out by hand.

    advantages = group_advantages(rewards, group_size=7)            # (G * n,)
    loss, sums = policy_loss(logprobs, entropy, row, cfg, n_tokens, n_seqs)   # row: a packed Row

A new objective is a change here: its settings are fields of LossConfig (grpo.GRPOConfig extends
it, so each is a flag of grpo.py as it is), a per-token quantity it needs is a field of Row (and
the place in passes.py that fills it), its metrics more entries of policy_loss's dict of sums,
which passes.py sums over rows and ranks and logs under their names.
"""

from dataclasses import dataclass, fields, replace
from typing import Literal, get_args

import torch


@dataclass
class LossConfig:
    """What policy_loss reads: grpo.GRPOConfig extends it, so each is a flag of grpo.py."""
    clip_ratio_low: float = 0.2        # PPO's clip below 1: the ratio's floor is 1 - this
    clip_ratio_high: float = 0.2       # PPO's clip above 1; > clip_ratio_low: DAPO's clip-higher
    clip_ratio_c: float = 0.0          # dual clip: a negative advantage's loss <= -A * c (verl: 3); 0: off
    kl_coef: float = 1e-3              # weight of the KL-to-reference loss term; 0 skips the ref model
    kl_estimator: Literal["k1", "mse", "low_var_kl"] = "low_var_kl"  # k1, k2 (mse) or k3 (low_var_kl) of KL(policy || ref)
    entropy_coef: float = 0.0          # weight of the entropy bonus
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"  # one mean over the mini-batch's tokens, or of each trace's mean
    ratio_level: Literal["token", "sequence"] = "token"  # PPO's ratio per token, or GSPO's per trace (the geometric mean of its tokens' ratios, clipped once; GSPO clips at 3e-4 / 4e-4 with seq-mean-token-mean)
    rollout_is: Literal["off", "token", "sequence"] = "off"  # rollout correction: weight the policy-gradient loss by the old policy's trainer / sampler probability, per token or per trace (their product)
    rollout_is_mode: Literal["truncate", "mask"] = "truncate"  # weights over rollout_is_cap cut to it (TIS), or tokens (traces) with a weight outside [rollout_is_floor, rollout_is_cap] left out of the policy gradient (IcePop)
    rollout_is_cap: float = 2.0        # the weights' upper bound (verl's default threshold)
    rollout_is_floor: float = 0.5      # --rollout_is_mode mask: the lower bound


@dataclass
class Row:
    """One packed row of traces (documents that never attend to each other), per token (T,):
    what the trainer's forward reads and what the loss reads. passes.pack_rows builds it on the
    host; to(device) moves it; the log-prob pass fills old_logprobs and ref_logprobs."""
    ids: torch.Tensor               # (T,) input tokens
    targets: torch.Tensor           # (T,) the token each position predicts
    positions: torch.Tensor         # (T,) position ids, restarting at 0 with each trace
    mask: torch.Tensor              # (T,) 1 where the target is a response token: what trains
    advantages: torch.Tensor        # (T,) each token's trace's advantage
    seq: torch.Tensor               # (T,) which trace of the mini-batch a token belongs to
    sampler_logprobs: torch.Tensor  # (T,) the sampler's log-prob of each response target (0 elsewhere)
    doc_lens: list[int]             # the traces' lengths in the row, for the attention (host ints:
    traces: list[int]               # each trace's index in the mini-batch, and the row's count of
    response_tokens: int            # response targets, so counting them never waits on a device)
    old_logprobs: torch.Tensor | None = None  # (T,) the policy before this step's updates (PPO's denominator)
    ref_logprobs: torch.Tensor | None = None  # (T,) the reference policy's (the KL term)

    def to(self, device) -> "Row":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def group_advantages(rewards, group_size, norm_by_std=True, eps=1e-6):
    """rewards (G * n,) -> advantages (G * n,): r_i - mean of its group, divided by the group's
    std unless Dr. GRPO. A group whose rewards are all equal gets zero advantages.

    >>> group_advantages(torch.tensor([1., -1., -1., -1.]), 2, norm_by_std=False)
    tensor([ 1.,  -1.,  0.,  0.])
    """
    r = rewards.view(-1, group_size)
    adv = r - r.mean(-1, keepdim=True)
    if norm_by_std:
        adv = adv / (r.std(-1, keepdim=True) + eps)  # unbiased std, as the GRPO reference does
    return adv.flatten()


def overlong_penalty(lengths, max_len, buffer):
    """DAPO's soft overlong punishment, added to the reward: 0 up to max_len - buffer tokens, then
    falling linearly to -1 at max_len (where the sampler cuts a trace).

    >>> overlong_penalty(torch.tensor([8., 12., 16.]), max_len=16, buffer=8)
    tensor([ 0.0000, -0.5000, -1.0000])
    """
    return ((max_len - buffer - lengths) / buffer).clamp(-1.0, 0.0)


def equal_groups(rewards, group_size):
    """(G,) True where a group's rewards are all equal: its advantages are all 0, it teaches
    nothing, and its tokens would only dilute the token mean."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(-1)


def kl_penalty(logprobs, ref_logprobs, estimator):
    """Per-token KL(policy || ref) estimate from sampled tokens.

    k1 = log p - log r; k2 ("mse") = (log p - log r)^2 / 2; k3 ("low_var_kl") = r/p - log(r/p) - 1,
    clamped to [-10, 10]. k3 is unbiased and always >= 0, so it is safe as a loss term.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "mse":
        return 0.5 * log_ratio ** 2
    if estimator == "low_var_kl":
        # exp overflows past ~88 nats, and backward through the outer clamp would then be 0 * inf
        # = NaN: clamp the exponent first, as verl does (there its gradient is 0, as the outer clamp's).
        log_ratio = log_ratio.clamp(-20, 20)
        return (torch.exp(-log_ratio) + log_ratio - 1).clamp(-10, 10)
    raise ValueError(f"kl_estimator {estimator!r}: not one of {get_args(LossConfig.__annotations__['kl_estimator'])}")


# |sampler - trainer| log-prob differences are binned on a log scale (MISMATCH_BINS_PER_DECADE bins
# per factor of 10 from MISMATCH_FLOOR to 100 nats), so the 99th percentile over every rank's
# tokens is one all-reduce of a fixed-size histogram, exact to a bin's width (15%).
MISMATCH_FLOOR, MISMATCH_BINS_PER_DECADE = 1e-8, 16
MISMATCH_EDGES = torch.logspace(-8, 2, 10 * MISMATCH_BINS_PER_DECADE + 1, dtype=torch.float64)


def logprob_mismatch(trainer, sampler, mask):
    """Sums that say how far the sampler's log-probs (of the tokens it sampled) are from the
    trainer's for the same weights, over the response tokens (mask), to be added over rows and
    ranks and read by mismatch_metrics: the token count, sum and max of |d| with d = sampler -
    trainer, the sums of the two KL(sampler || trainer) estimators over the sampler's tokens (k1 =
    d, k3 = exp(-d) + d - 1, which is >= 0), and the histogram of |d| (MISMATCH_EDGES)."""
    mask = mask.double()
    d = sampler.double() - trainer.double()
    bins = torch.bucketize(d.abs(), MISMATCH_EDGES.to(d.device))
    hist = torch.zeros(len(MISMATCH_EDGES) + 1, dtype=torch.float64, device=d.device).index_add_(0, bins, mask)
    return {"tokens": mask.sum(), "abs": (d.abs() * mask).sum(), "max": (d.abs() * mask).amax(),
            "k1": (d * mask).sum(), "k3": ((torch.exp(-d) + d - 1) * mask).sum(), "hist": hist}


def mismatch_metrics(sums) -> dict:
    """logprob_mismatch's sums (over every row and rank) as per-token figures: the mean, 99th
    percentile (the upper edge of its bin) and max of |sampler - trainer|, and the two KL estimates;
    with rollout_is_sums' too, the correction's mean and largest weight and the share outside its bounds.

    >>> mismatch_metrics(logprob_mismatch(torch.tensor([0., 0.]), torch.tensor([0.1, -0.1]), torch.ones(2)))
    {'rollout_logprob_diff_mean': 0.1000..., ..., 'rollout_kl_k1': 0.0, 'rollout_kl_k3': 0.0050...}
    """
    n = float(sums["tokens"])
    if n == 0:
        return {}
    cumulative = torch.cumsum(sums["hist"], 0)
    bin_99 = int(torch.searchsorted(cumulative, 0.99 * cumulative[-1]))
    p99 = float(MISMATCH_EDGES[min(bin_99, len(MISMATCH_EDGES) - 1)]) if bin_99 else 0.0
    corrected = {"rollout_is_weight_mean": float(sums["is_weight"]) / n, "rollout_is_weight_max": float(sums["is_max"]),
                 "rollout_is_outside": float(sums["is_outside"]) / n} if "is_weight" in sums else {}
    return {"rollout_logprob_diff_mean": float(sums["abs"]) / n, "rollout_logprob_diff_p99": p99,
            "rollout_logprob_diff_max": float(sums["max"]), "rollout_kl_k1": float(sums["k1"]) / n,
            "rollout_kl_k3": float(sums["k3"]) / n} | corrected


def per_trace(values, row: Row):
    """Sums of a per-token quantity (T,) over each trace of the row, indexed by the trace's place
    in the mini-batch (row.seq): (max trace index + 1,), zero for traces in other rows."""
    size = max(row.traces) + 1 if row.traces else 0  # host ints: no device sync
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, row.seq, values)


def rollout_is_weights(row: Row, cfg: LossConfig):
    """Rollout correction (Yao et al., 2025): the sampler's probabilities differ from the trainer's
    for the same weights (other kernels, bf16), so on-policy rollouts are slightly off-policy; each
    response token's policy-gradient loss is weighted by w = pi_old(trainer) / pi_old(sampler),
    per token, or per trace (the product over its tokens, each of its tokens weighted alike).
    Returns (applied, raw) (T,), constants: raw w, and w truncated at rollout_is_cap (TIS), or with
    mode "mask" zero outside [rollout_is_floor, rollout_is_cap] (IcePop's two-sided mask).

    >>> row = Row(*[torch.zeros(3, dtype=torch.long)] * 3, torch.ones(3), torch.zeros(3), torch.tensor([0, 0, 1]),
    ...           torch.log(torch.tensor([0.5, 0.5, 0.1])), [2, 1], [0, 1], 3, torch.log(torch.tensor([0.5, 0.8, 0.4])))
    >>> rollout_is_weights(row, LossConfig(rollout_is="token"))
    (tensor([1.0000, 1.6000, 2.0000]), tensor([1.0000, 1.6000, 4.0000]))
    >>> rollout_is_weights(row, LossConfig(rollout_is="sequence", rollout_is_mode="mask"))[0]
    tensor([1.6000, 1.6000, 0.0000])
    """
    log_w = (row.old_logprobs - row.sampler_logprobs).float() * row.mask
    if cfg.rollout_is == "sequence":
        log_w = per_trace(log_w, row)[row.seq]
    raw = torch.exp(log_w.clamp(-20.0, 20.0))
    if cfg.rollout_is_mode == "truncate":
        return raw.clamp(max=cfg.rollout_is_cap), raw
    return torch.where((raw >= cfg.rollout_is_floor) & (raw <= cfg.rollout_is_cap), raw, 0.0), raw


def rollout_is_sums(row: Row, cfg: LossConfig) -> dict:
    """What a step logs of the rollout correction's weights, as sums over the response tokens to
    be added over rows and ranks (is_max: the largest): the raw weights' sum and max, and the
    count truncated or masked (outside [floor, cap]; in truncate mode, over the cap). Per token
    in sequence mode too: a trace's weight counts once per token, so the logged mean is
    length-weighted and the share outside is of tokens, not of traces."""
    mask = row.mask.double()  # summed with logprob_mismatch's doubles
    raw = rollout_is_weights(row, cfg)[1].double()
    outside = (raw > cfg.rollout_is_cap) | ((raw < cfg.rollout_is_floor) if cfg.rollout_is_mode == "mask" else False)
    return {"is_weight": (raw * mask).sum(), "is_max": (raw * mask).amax() if mask.numel() else raw.new_zeros(()),
            "is_outside": (outside.double() * mask).sum()}


def policy_loss(logprobs, entropy, row: Row, cfg: LossConfig, n_tokens, n_seqs):
    """PPO clipped objective + kl_coef * KL - entropy_coef * entropy, as a sum that callers add
    over micro-batches and ranks: n_tokens / n_seqs are the mini-batch's global counts, so the
    total is one token mean (or one mean over sequences of per-sequence token means) however
    the mini-batch was split. logprobs and entropy (T,) are the policy's on the row's targets;
    the row gives the old and reference log-probs, advantages, response mask and trace ids.
    Returns (loss, {metric: sum over the response tokens}), the sums to be divided by the token
    count once they are summed everywhere.
    """
    mask, advantages = row.mask.float(), row.advantages
    log_ratio = logprobs - row.old_logprobs
    if cfg.ratio_level == "sequence":
        # GSPO: a trace's ratio is the geometric mean of its tokens' (its log: their mean), the same
        # value at each of its tokens, so the clip below takes or drops the trace whole. Written as
        # GSPO-token (log p_t - sg(log p_t) + sg(mean)): the same value and, the advantage being a
        # trace's, the same gradient, while a per-token weight (--rollout_is token) stays per token.
        mean = (per_trace(log_ratio * mask, row) / per_trace(mask, row).clamp(min=1))[row.seq]
        log_ratio = logprobs - logprobs.detach() + mean.detach()
    # Clamped as verl does: exp() overflows past ~88 in fp32, and 0 * inf (a zero advantage) is NaN.
    log_ratio = log_ratio.clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)
    per_token = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(per_token, dtype=torch.bool)
    if cfg.clip_ratio_c:
        # Dual clip (Ye et al. 2020): with A < 0 a huge ratio would make an unbounded loss.
        dual = (advantages < 0) & (per_token > -advantages * cfg.clip_ratio_c)
        per_token = torch.where(dual, -advantages * cfg.clip_ratio_c, per_token)
    if cfg.rollout_is != "off":
        per_token = per_token * rollout_is_weights(row, cfg)[0]  # the policy gradient only, not KL or entropy
    kl = kl_penalty(logprobs, row.ref_logprobs, cfg.kl_estimator) if cfg.kl_coef else torch.zeros_like(logprobs)
    per_token = per_token + cfg.kl_coef * kl - cfg.entropy_coef * entropy
    if cfg.loss_agg == "token-mean":
        loss = (per_token * mask).sum() / n_tokens
    elif cfg.loss_agg == "seq-mean-token-mean":
        loss = (per_trace(per_token * mask, row) / per_trace(mask, row).clamp(min=1)).sum() / n_seqs
    else:
        raise ValueError(f"loss_agg {cfg.loss_agg!r}: not one of {get_args(LossConfig.__annotations__['loss_agg'])}")
    with torch.no_grad():
        sums = {"clip_frac": ((clipped > unclipped).float() * mask).sum(),
                "ppo_kl": (-log_ratio * mask).sum(), "kl": (kl * mask).sum(),
                "entropy": (entropy * mask).sum(), "dual_clip_frac": (dual.float() * mask).sum()}
    return loss, sums
