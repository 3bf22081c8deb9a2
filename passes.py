"""GRPO's passes over packed rows, between the rollout and the optimizer (grpo.py's step):

    rows = pack_rows(sequences(prompts, completions, advantages), cfg.micro_batch_tokens)
    gap = old_and_ref_logprobs(model, ref_model, rows, cfg, ctx)   # stores row["old"], row["ref"]
    metrics = update(model, optimizer, rows, cfg, ctx)             # one optimizer step per mini-batch

A row packs several traces (documents that never attend to each other) with, per token, the
target, the response mask, the trace's advantage and index, and the sampler's log-prob. Every
rank runs the same number of forwards (distributed.pad_to_ranks), and the loss of a row is a sum
over the mini-batch's global counts, so gradients summed over ranks (distributed.shard) are those
of the whole mini-batch, whatever the number of ranks.
"""

import torch

import data
import distributed as D
from objective import policy_loss


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
    for docs in data.next_fit([len(s["input_ids"]) - 1 for s in seqs], max_tokens):
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


# What a rank short of rows runs (distributed.pad_to_ranks): 2 tokens that carry no loss.
EMPTY_ROW = {"ids": [0, 0], "targets": [0, 0], "pos": [0, 1], "mask": [0, 0], "adv": [0.0, 0.0], "seq": [0, 0],
             "sampler": [0.0, 0.0], "old": [0.0, 0.0], "ref": [0.0, 0.0], "docs": [2]}


def backward_rows(model, rows, cfg, ctx):
    """Forward and backward of one mini-batch of packed rows (this rank's share), gradients
    accumulated for one optimizer step. Returns the global response-token count and this rank's
    metric sums (UPDATE_METRICS) as a tensor: no host sync per row."""
    n_tokens = D.sum_over_ranks(sum(sum(r["mask"]) for r in rows))
    n_seqs = D.sum_over_ranks(len({s for r in rows for s in r["seq"]}))
    totals = torch.zeros(len(UPDATE_METRICS), device=ctx.device)
    for row in D.pad_to_ranks(rows, EMPTY_ROW):
        t = row_tensors(row, ctx.device)
        logprobs, entropy = forward_logprobs(model, t, cfg.temperature)
        loss, sums = policy_loss(logprobs, t["old"], t["ref"], t["adv"], t["mask"], entropy,
                                 t["seq"], cfg, n_tokens, n_seqs)
        loss.backward()  # FSDP sums the ranks' gradients (distributed.shard)
        totals += torch.stack([*(sums[k] for k in UPDATE_METRICS[:-1]), loss.detach()])
    return n_tokens, totals


UPDATE_METRICS = ("clip_frac", "ppo_kl", "kl", "entropy", "dual_clip_frac", "loss")


def update(model, optimizer, rows, cfg, ctx):
    """One optimizer step on one mini-batch of packed rows (this rank's share). Returns its
    metrics as 0-d tensors (read them once per rollout step, not per micro-batch), or None when
    the mini-batch has no response token to train on (every trace masked out): no step then."""
    if D.sum_over_ranks(sum(sum(r["mask"]) for r in rows)) == 0:
        return None
    n_tokens, totals = backward_rows(model, rows, cfg, ctx)
    totals = D.all_reduce_sum(totals)
    grad_norm = D.clip_and_step(model, optimizer, cfg.grad_clip, ctx, loss=totals[-1])
    out = dict(zip(UPDATE_METRICS[:-1], totals[:-1] / n_tokens))
    out.update(loss=totals[-1], grad_norm=grad_norm)
    return out


def old_and_ref_logprobs(model, ref_model, rows, cfg, ctx):
    """Before any update: the policy's own log-probs (the PPO denominator) and the reference
    model's, stored on each row. Returns the largest |sampler - trainer| log-prob gap, which
    should be ~0 in fp32: a large one means rollout and trainer disagree (a known failure)."""
    gap = torch.zeros((), device=ctx.device)
    with torch.no_grad():
        for row in D.pad_to_ranks(rows, EMPTY_ROW):
            t = row_tensors(row, ctx.device)
            old, _ = forward_logprobs(model, t, cfg.temperature)
            gap = torch.maximum(gap, ((old - t["sampler"]) * t["mask"]).abs().max())
            row["old"] = old if cfg.recompute_old_logprobs else t["sampler"]
            row["ref"] = forward_logprobs(ref_model, t, cfg.temperature)[0] if ref_model is not None \
                else old
    return D.all_reduce_max(gap)
