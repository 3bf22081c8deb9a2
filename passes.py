"""GRPO between the rollout and the optimizer (grpo.grpo_step's phases after rollout):

    rnd = score_round(records, prompts, completions, texts, stats, cfg, rlvr_rewards)  # rewards
    kept += kept_groups(rnd, resample, share, cfg)                 # the groups that train
    minis = assemble(rounds, kept, share, cfg)                     # packed rows per mini-batch
    mismatch = old_and_ref_logprobs(model, ref_model, rows, cfg, ctx)  # stores row["old"], row["ref"]
    updates = train_on(model, optimizer, minis, cfg, ctx)          # one optimizer step per mini-batch

A row packs several traces (documents that never attend to each other) with, per token, the
target, the response mask, the trace's advantage and index, and the sampler's log-prob. Every
rank runs the same number of forwards (distributed.pad_to_ranks), and the loss of a row is a sum
over the mini-batch's global counts, so gradients summed over ranks (distributed.shard) are those
of the whole mini-batch, whatever the number of ranks.
"""

from dataclasses import dataclass

import torch

import tokenization
import distributed as D
from objective import (LossConfig, equal_groups, group_advantages, logprob_mismatch, mismatch_metrics, overlong_penalty,
                       policy_loss)
from scheduler import RolloutStats


@dataclass
class Round:
    """One rollout round of a step (--oversample draws more): this rank's prompts, their traces
    and the traces' rewards."""
    records: list
    prompts: list
    completions: list            # len(prompts) * n, prompt-major
    texts: list
    rewards: torch.Tensor        # the verdicts' +1/-1 (what the metrics report)
    train_rewards: torch.Tensor  # what the advantages are computed from (+ DAPO's overlong penalty)
    stats: RolloutStats


def score_round(records, prompts, completions, texts, stats, cfg, score) -> Round:
    """Score every trace with score(completions, texts, records) (the paper's rlvr_rewards in a
    run) and add DAPO's overlong penalty to what trains, with --overlong penalty."""
    rewards = score(completions, texts, records)
    train_rewards = rewards
    if cfg.overlong == "penalty":
        lengths = torch.tensor([float(len(c.token_ids)) for c in completions])
        train_rewards = rewards + overlong_penalty(lengths, cfg.max_response_len, cfg.overlong_buffer)
    return Round(records, prompts, completions, texts, rewards, train_rewards, stats)


def kept_groups(rnd: Round, resample, share, cfg) -> list:
    """The (round, position in the rollout batch) of every group of this round that trains, over
    all ranks: all of them, or with --filter_equal_groups those whose verdicts' rewards differ.
    DAPO filters on correctness: a group of all-wrong verdicts is dropped even when --overlong
    penalty made one trace's reward differ by a few thousandths (its advantages would be a
    full-size update driven by that length penalty alone)."""
    keep = torch.zeros(cfg.rollout_batch_size)
    keep[share] = (~equal_groups(rnd.rewards, cfg.n_samples)).float() if cfg.filter_equal_groups else 1.0
    return [(resample, p) for p in torch.nonzero(D.all_reduce_sum(keep)).flatten().tolist()]


def sequences(prompts, completions, advantages):
    """One dict per trace: tokens, the mask of response targets, its advantage, sampler logprobs."""
    out = []
    for c, a in zip(completions, advantages.tolist()):
        p = prompts[c.prompt_index]
        ids = p + c.token_ids
        out.append({"input_ids": ids, "prompt_len": len(p), "advantage": a,
                    "sampler_logprobs": c.logprobs})
    return out


def pack_rows(seqs, max_tokens):
    """Pack traces into rows of <= max_tokens (next-fit, in order). Each row holds per-token
    targets, response mask, advantages and the index of the trace each token belongs to."""
    rows = []
    for docs in tokenization.next_fit([len(s["input_ids"]) - 1 for s in seqs], max_tokens):
        row = {"ids": [], "targets": [], "pos": [], "mask": [], "adv": [], "seq": [], "sampler": [], "docs": []}
        for k in docs:
            s = seqs[k]
            ids, P = s["input_ids"], s["prompt_len"]
            n = len(ids) - 1  # inputs ids[:-1] predict targets ids[1:]
            row["docs"].append(n)
            row["ids"] += ids[:-1]
            row["targets"] += ids[1:]
            row["pos"] += range(n)
            row["mask"] += [0] * (P - 1) + [1] * (n - P + 1)
            row["adv"] += [s["advantage"]] * n
            row["seq"] += [k] * n
            row["sampler"] += [0.0] * (P - 1) + list(s["sampler_logprobs"])
        rows.append(row)
    return rows


def row_tensors(row, device):
    """Lists -> tensors on device; tensors already there (old/ref log-probs) and the document
    lengths (host ints for the attention) pass through."""
    t = {k: v if torch.is_tensor(v) or k == "docs" else torch.tensor(v, device=device)
         for k, v in row.items()}
    for k in ("adv", "sampler", "old", "ref"):
        if k in t:
            t[k] = t[k].float()
    return t


def forward_logprobs(model, row, temperature):
    """Per-token log-probs and entropy (T,) of a packed row under `model`."""
    logprobs, entropy = model(row["ids"][None], position_ids=row["pos"][None], doc_lens=row["docs"],
                              targets=row["targets"][None], temperature=temperature)
    return logprobs[0], entropy[0]


def empty_row():
    """What a rank short of rows runs (distributed.pad_to_ranks): pack_rows' row of a sequence
    with no response token, so it carries no loss, with the log-probs the passes add."""
    row = pack_rows([{"input_ids": [0, 0, 0], "prompt_len": 3, "advantage": 0.0, "sampler_logprobs": []}], 2)[0]
    return row | {"old": row["sampler"], "ref": row["sampler"]}


def backward_rows(model, rows, cfg, ctx):
    """Forward and backward of one mini-batch of packed rows (this rank's share), gradients
    accumulated for one optimizer step. Returns the global response-token count and this rank's
    sums of policy_loss's metrics and of the loss, as tensors: no host sync per row."""
    loss_cfg = LossConfig.of(cfg)
    n_tokens = D.sum_over_ranks(sum(sum(r["mask"]) for r in rows))
    n_seqs = D.sum_over_ranks(len({s for r in rows for s in r["seq"]}))
    totals = {}
    for row in D.pad_to_ranks(rows, empty_row()):
        t = row_tensors(row, ctx.device)
        logprobs, entropy = forward_logprobs(model, t, cfg.temperature)
        loss, sums = policy_loss(logprobs, t["old"], t["ref"], t["adv"], t["mask"], entropy,
                                 t["seq"], loss_cfg, n_tokens, n_seqs)
        loss.backward()  # FSDP sums the ranks' gradients (distributed.shard)
        for name, value in {**sums, "loss": loss.detach()}.items():
            totals[name] = totals.get(name, 0) + value
    return n_tokens, totals


def update(model, optimizer, rows, cfg, ctx):
    """One optimizer step on one mini-batch of packed rows (this rank's share). Returns its
    metrics (policy_loss's, as means over the response tokens, the loss and the gradient norm) as
    0-d tensors (read them once per rollout step, not per micro-batch), or None when the
    mini-batch has no response token to train on (every trace masked out): no step then."""
    if D.sum_over_ranks(sum(sum(r["mask"]) for r in rows)) == 0:
        return None
    n_tokens, totals = backward_rows(model, rows, cfg, ctx)
    names = list(totals)
    totals = dict(zip(names, D.all_reduce_sum(torch.stack([totals[k] for k in names]))))
    grad_norm = D.clip_and_step(model, optimizer, cfg.grad_clip, ctx, loss=totals["loss"])
    return {k: v / n_tokens for k, v in totals.items() if k != "loss"} | {"loss": totals["loss"], "grad_norm": grad_norm}


def old_and_ref_logprobs(model, ref_model, rows, cfg, ctx) -> dict:
    """Before any update: the policy's own log-probs (the PPO denominator) and the reference
    model's, stored on each row. Returns how far the sampler's log-probs are from the trainer's
    (objective.mismatch_metrics, over every rank's response tokens): ~1e-6 in fp32, larger in bf16
    and with other kernels; a run whose sampler drifts from its trainer is off-policy (a known
    failure), and these say by how much."""
    sums = {}
    with torch.no_grad():
        for row in D.pad_to_ranks(rows, empty_row()):
            t = row_tensors(row, ctx.device)
            old, _ = forward_logprobs(model, t, cfg.temperature)
            for name, value in logprob_mismatch(old, t["sampler"], t["mask"]).items():
                sums[name] = value if name not in sums else torch.maximum(sums[name], value) if name == "max" \
                    else sums[name] + value
            row["old"] = old if cfg.recompute_old_logprobs else t["sampler"]
            row["ref"] = forward_logprobs(ref_model, t, cfg.temperature)[0] if ref_model is not None \
                else old
    if ctx.simulated or not sums:  # fake tensors hold no values; no rank has a row (every trace masked out)
        return {}
    largest, hist = D.all_reduce_max(sums.pop("max")), sums.pop("hist")
    totals = D.all_reduce_sum(torch.cat([torch.stack(list(sums.values())), hist]))  # one collective
    return mismatch_metrics(dict(zip(sums, totals)) | {"hist": totals[len(sums):], "max": largest})


def assemble(rounds, kept, share, cfg) -> list[list[dict]]:
    """This rank's packed rows of each mini-batch, from the rollout rounds (Round): mini-batch j
    trains on kept groups j*M..(j+1)*M in (round, position) order, each rank on its own, so the
    mini-batches are the same whatever the number of ranks. Each trace's advantage is computed
    within its group; --overlong mask leaves truncated traces out."""
    n, M = cfg.n_samples, cfg.mini_batch_size
    mine = {(r, p): i for r in range(len(rounds)) for i, p in enumerate(share)}
    minis = []
    for j in range(0, len(kept), M):
        seqs = []
        for r, p in kept[j:j + M]:
            if (r, p) not in mine:
                continue
            block = slice(mine[r, p] * n, (mine[r, p] + 1) * n)
            completions = rounds[r].completions[block]
            advantages = group_advantages(rounds[r].train_rewards[block], n, cfg.norm_adv_by_std)
            seqs += [s for s, c in zip(sequences(rounds[r].prompts, completions, advantages), completions)
                     if not (cfg.overlong == "mask" and c.finish_reason == "length")]
        minis.append(pack_rows(seqs, cfg.micro_batch_tokens))
    return minis


def train_on(model, optimizer, minis, cfg, ctx) -> list[dict]:
    """One optimizer step per mini-batch (passes.update); the metrics of those taken."""
    model.train()
    if cfg.offload_states:  # AdamW's state, on the host outside the updates (grpo.place_states)
        D.place(optimizer, ctx.device)
    return [u for u in (update(model, optimizer, rows, cfg, ctx) for rows in minis) if u is not None]
