"""GRPO's phases, in the order grpo.grpo_step runs them, from the policy's rollout to its updates:

    completions, texts, stats = rollout(policy, prompts, step, cfg, ctx, phases)  # n traces per prompt
    rewards = score(completions, texts, records)                    # the reward's (rewards.py)
    rnd = score_round(records, prompts, completions, texts, stats, cfg, rewards)
    kept += kept_groups(rnd, resample, share, cfg, ctx)            # the groups that train
    minis = assemble(rounds, kept, share, cfg)                     # packed Rows per mini-batch
    mismatch = logprob_passes(policy, rows, cfg, ctx)              # fills row.old_logprobs, .ref_logprobs
    updates = train_on(model, optimizer, minis, cfg, ctx)          # one optimizer step per mini-batch

A row (objective.Row) packs several traces (documents that never attend to each other) with, per
token, the target, the response mask, the trace's advantage and index, and the sampler's
log-prob. Every rank runs the same number of forwards (distributed.pad_to_ranks), and the loss of
a row is a sum over the mini-batch's global counts, so gradients summed over ranks
(distributed.shard) are those of the whole mini-batch, whatever the number of ranks. Under the
memory plan (ctx.simulated) the same functions run on fake tensors.
"""

import contextlib
import gc
from dataclasses import dataclass, replace

import torch

import distributed
import lora
import plan
import reward
import tokenization
import tp
from objective import (Row, equal_groups, group_advantages, logprob_mismatch, mismatch_metrics, overlong_penalty,
                       policy_loss, rollout_is_sums)
from rollout import SamplingParams, full_length, greedy_verdicts
from scheduler import Completion, Prompt, RolloutStats


@dataclass
class Policy:
    """What GRPO trains: the policy (FSDP2 shards, fp32 master weights; with LoRA a frozen base and
    fp32 adapters), its AdamW, its tokenizer, and the frozen reference of the KL term (None when
    kl_coef is 0; with --offload_states, where it is read for its log-probs only; and with LoRA,
    whose reference is the policy with its adapters off)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: object
    ref_model: torch.nn.Module | None


def rollout(policy: Policy, prompts: list[Prompt], step, cfg, ctx, phases, resample=0):
    """The rollout phase: n traces per prompt sampled from the current policy (decoding()).
    Seeds derive from (seed, step, oversampling round) and each Prompt's key (its place in the
    rollout batch) and sample index, so a resumed run draws the same traces and neither the
    number of ranks nor --rollout_tp changes them. With --rollout_tp the ranks of a TP group
    sample their prompts together. Returns this rank's completions, their texts and the
    sampler's RolloutStats."""
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_response_len, n=samples_per_prompt(cfg),
                            stop_token_ids=(policy.tokenizer.eos_token_id,),
                            seed=(cfg.seed * 1_000_003 + step + resample * 1_000_000_007) % 2**32)
    weights = f"TP weights (1/{cfg.rollout_tp} of every matrix)" if cfg.rollout_tp > 1 else "gathered weights"
    stats = RolloutStats()  # what the memory plan's rollout reports when its KV pool cannot be made (its phase's error)
    with phases.phase("generate", f"rollout: {weights}, KV pool, prefill, decode at full length",
                      "lower --rollout_slots or --kv_budget_gib, " + ("a larger --rollout_tp" if cfg.rollout_tp > 1 else
                      "--rollout_tp N (the full weights are gathered on every rank)") + ", or " + plan.MORE_RANKS):
        with decoding(policy.model, cfg, ctx) as decoder, torch.no_grad():
            completions, stats = tp.generate_in_group(decoder, prompts, params, ctx, kv_budget_bytes(cfg),
                                                      cfg.rollout_slots)
    if ctx.simulated:  # the memory plan: no token is sampled; its traces pack the trainer's rows fullest
        completions = full_length(len(prompts), full_rows(cfg))
    return completions, [policy.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions], stats


@contextlib.contextmanager
def decoding(model, cfg, ctx):
    """The policy as the sampler decodes it: the full weights gathered once from the FSDP2 shards,
    or with --rollout_tp a tensor-parallel copy (each rank 1/tp of every matrix, tp.py)."""
    if ctx.tp_mesh is None:
        with distributed.full_weights(model) as plain:
            yield plain
    else:
        dtype = torch.bfloat16 if ctx.gpu and cfg.bf16 else torch.float32
        yield tp.weights(model, ctx.tp_mesh, dtype, ctx.device)


def samples_per_prompt(cfg) -> int:
    """Traces sampled from each prompt: the group's n, or with --consistency_reward n / 2 from each
    of a group's two prompts (its answers in either order: grpo.Prompts.draw)."""
    return cfg.n_samples // 2 if cfg.consistency_reward else cfg.n_samples


def kv_budget_bytes(cfg):
    """--kv_budget_gib in bytes; None lets tp.kv_budget take what the device has free."""
    return int(cfg.kv_budget_gib * 2**30) if cfg.kv_budget_gib else None


def full_rows(cfg) -> SamplingParams:
    """The placeholder traces the plan trains on: as long as packs trainer rows full (k traces of
    --micro_batch_tokens / k tokens, the fewest that fill it), or at full length where a prompt
    leaves no room for that. Real traces end early and pack rows full, fuller than full-length ones
    (4,096 + 8,192 tokens: one a row, 12,287 of 16,384)."""
    k = -(-cfg.micro_batch_tokens // (cfg.max_prompt_len + cfg.max_response_len - 1))
    response = cfg.micro_batch_tokens // k + 1 - cfg.max_prompt_len
    return SamplingParams(n=samples_per_prompt(cfg), max_new_tokens=response if 1 <= response <= cfg.max_response_len
                          else cfg.max_response_len)


@dataclass
class Round:
    """One rollout round of a step (--oversample draws more): this rank's prompts, their traces
    and the traces' rewards."""
    records: list
    prompts: list[Prompt]
    completions: list[Completion]  # prompt-major, n a group (a group is two prompts with --consistency_reward)
    texts: list[str]
    rewards: torch.Tensor        # the verdicts' +1/-1 (what the metrics report, and what DAPO's filter reads)
    train_rewards: torch.Tensor  # what the advantages are computed from (+ DAPO's overlong penalty)
    stats: RolloutStats


def score_round(records, prompts, completions, texts, stats, cfg, rewards) -> Round:
    """A round with every trace's reward (the reward's: rewards.py) and, with --overlong penalty,
    DAPO's overlong penalty added to what trains."""
    train_rewards = rewards
    if cfg.overlong == "penalty":  # each trace against its own prompt's limit
        lengths = torch.tensor([float(len(c.token_ids)) for c in completions])
        limits = torch.tensor([float(prompts[c.prompt_index].max_new_tokens or cfg.max_response_len) for c in completions])
        train_rewards = rewards + overlong_penalty(lengths, limits, torch.clamp(limits, max=cfg.overlong_buffer))
    return Round(records, prompts, completions, texts, rewards, train_rewards, stats)


def kept_groups(rnd: Round, resample, share, cfg, ctx) -> list:
    """The (round, position in the rollout batch) of every group of this round that trains, over
    all ranks, in position order: all of them, or with --filter_equal_groups those whose verdicts'
    rewards differ. DAPO filters on correctness: a group of all-wrong verdicts is dropped even
    when --overlong penalty made one trace's reward differ by a few thousandths (its advantages
    would be a full-size update driven by that length penalty alone). Each rank says which of its
    share's groups it keeps; share_of(rank) gives every rank's share."""
    keep = (~equal_groups(rnd.rewards, cfg.n_samples)).tolist() if cfg.filter_equal_groups else [True] * len(share)
    kept = {p for rank, flags in enumerate(distributed.all_gather_objects(keep))
            for p, flag in zip(share_of(cfg, rank, ctx.world_size), flags) if flag}
    return [(resample, p) for p in sorted(kept)]


def share_of(cfg, rank, world_size) -> list[int]:
    """Positions in the rollout batch that a rank samples and trains on: its slice of every
    mini-batch, so that mini-batch j holds the same prompts whatever the number of ranks."""
    m = cfg.mini_batch_size // world_size
    return [j * cfg.mini_batch_size + rank * m + i
            for j in range(cfg.rollout_batch_size // cfg.mini_batch_size) for i in range(m)]


@dataclass
class Trace:
    """One trace to train on: prompt + response tokens, the prompt's length, its advantage, and
    the sampler's log-prob of each response token."""
    ids: list[int]
    prompt_len: int
    advantage: float
    sampler_logprobs: list[float]


def traces(prompts, completions, advantages) -> list[Trace]:
    return [Trace(prompts[c.prompt_index].ids + c.token_ids, len(prompts[c.prompt_index].ids), a, c.logprobs)
            for c, a in zip(completions, advantages.tolist())]


def pack_rows(seqs: list[Trace], max_tokens) -> list[Row]:
    """Pack traces into rows of <= max_tokens tokens (next-fit, in order), on the host."""
    rows = []
    for docs in tokenization.next_fit([len(s.ids) - 1 for s in seqs], max_tokens):
        ids, targets, positions, mask, advantages, seq, sampler, doc_lens = [], [], [], [], [], [], [], []
        for k in docs:
            s = seqs[k]
            n, P = len(s.ids) - 1, s.prompt_len  # inputs ids[:-1] predict targets ids[1:]
            doc_lens.append(n)
            ids += s.ids[:-1]
            targets += s.ids[1:]
            positions += range(n)
            mask += [0] * (P - 1) + [1] * (n - P + 1)
            advantages += [s.advantage] * n
            seq += [k] * n
            sampler += [0.0] * (P - 1) + list(s.sampler_logprobs)
        rows.append(Row(torch.tensor(ids), torch.tensor(targets), torch.tensor(positions), torch.tensor(mask),
                        torch.tensor(advantages, dtype=torch.float32), torch.tensor(seq),
                        torch.tensor(sampler, dtype=torch.float32), doc_lens, list(docs), sum(mask)))
    return rows


def empty_row() -> Row:
    """What a rank short of rows runs (distributed.pad_to_ranks): a row of a trace with no response
    token, so it carries no loss, with the log-probs the passes add."""
    row = pack_rows([Trace([0, 0, 0], 3, 0.0, [])], 2)[0]
    row.old_logprobs = row.ref_logprobs = row.sampler_logprobs
    return row


def forward_logprobs(model, row: Row, temperature):
    """Per-token log-probs and entropy (T,) of a packed row (on the model's device) under `model`."""
    logprobs, entropy = model(row.ids[None], position_ids=row.positions[None], doc_lens=row.doc_lens,
                              targets=row.targets[None], temperature=temperature)
    return logprobs[0], entropy[0]


def logprob_passes(policy: Policy, rows, cfg, ctx):
    """passes.old_and_ref_logprobs; with --offload_states the reference (which never changes) is
    read from --model for them and freed after."""
    if not cfg.offload_states:
        return old_and_ref_logprobs(policy.model, policy.ref_model, rows, cfg, ctx)
    ref_model = build_reference(cfg, ctx)
    mismatch = old_and_ref_logprobs(policy.model, ref_model, rows, cfg, ctx)
    del ref_model
    gc.collect()  # FSDP2's modules hold reference cycles: free the shards now, not at a later collection
    return mismatch


def old_and_ref_logprobs(model, ref_model, rows: list[Row], cfg, ctx) -> dict:
    """Before any update: the policy's own log-probs (the PPO denominator) and the reference
    model's, stored on each row (on the device). Returns how far the sampler's log-probs are from
    the trainer's (objective.mismatch_metrics, over every rank's response tokens): ~1e-6 in fp32,
    larger in bf16 and with other kernels; a run whose sampler drifts from its trainer is
    off-policy (a known failure), and these say by how much."""
    sums = {}
    with torch.no_grad():
        for row in distributed.pad_to_ranks(rows, empty_row()):
            on_device = row.to(ctx.device)
            old, _ = forward_logprobs(model, on_device, cfg.temperature)
            found = logprob_mismatch(old, on_device.sampler_logprobs, on_device.mask)
            if cfg.rollout_is != "off":  # the correction's weights are fixed for the step: logged once, here
                found |= rollout_is_sums(replace(on_device, old_logprobs=old), cfg)
            for name, value in found.items():
                sums[name] = value if name not in sums else torch.maximum(sums[name], value) if name.endswith("max") \
                    else sums[name] + value
            row.old_logprobs = old if cfg.recompute_old_logprobs else on_device.sampler_logprobs
            row.ref_logprobs = reference_logprobs(model, ref_model, on_device, old, cfg)
    if ctx.simulated or not sums:  # fake tensors hold no values; no rank has a row (every trace masked out)
        return {}
    maxima = [name for name in list(sums) if name.endswith("max")]
    largest = dict(zip(maxima, distributed.all_reduce_max(torch.stack([sums.pop(name) for name in maxima]))))
    hist = sums.pop("hist")
    totals = distributed.all_reduce_sum(torch.cat([torch.stack(list(sums.values())), hist]))  # one collective
    return mismatch_metrics(dict(zip(sums, totals)) | {"hist": totals[len(sums):]} | largest)


def reference_logprobs(model, ref_model, row: Row, old, cfg):
    """The KL term's reference log-probs of a row: the frozen reference's; with LoRA, the policy's own
    with its adapters off (the base it started from: no second model); with kl_coef 0, `old` (unused)."""
    if ref_model is not None:
        return forward_logprobs(ref_model, row, cfg.temperature)[0]
    if cfg.kl_coef and cfg.lora_rank:
        with lora.adapters_off(model):
            return forward_logprobs(model, row, cfg.temperature)[0]
    return old


def build_reference(cfg, ctx):
    """The frozen reference policy of the KL term (bf16 on GPUs); None when kl_coef is 0, or with
    LoRA, whose reference is the policy with its adapters off (reference_logprobs)."""
    return distributed.load_model(cfg.model, ctx, bf16=cfg.bf16, frozen=True) if cfg.kl_coef and not cfg.lora_rank \
        else None


def backward_rows(model, rows: list[Row], cfg, ctx):
    """Forward and backward of one mini-batch of packed rows (this rank's share), gradients
    accumulated for one optimizer step. Returns the global response-token count and this rank's
    sums of policy_loss's metrics and of the loss, as tensors: no host sync per row."""
    n_tokens = distributed.sum_over_ranks(sum(r.response_tokens for r in rows))
    n_seqs = distributed.sum_over_ranks(len({k for r in rows for k in r.traces}))
    totals = {}
    for row in distributed.pad_to_ranks(rows, empty_row()):
        on_device = row.to(ctx.device)
        logprobs, entropy = forward_logprobs(model, on_device, cfg.temperature)
        loss, sums = policy_loss(logprobs, entropy, on_device, cfg, n_tokens, n_seqs)
        loss.backward()  # FSDP sums the ranks' gradients (distributed.shard)
        for name, value in {**sums, "loss": loss.detach()}.items():
            totals[name] = totals.get(name, 0) + value
    return n_tokens, totals


def update(model, optimizer, rows: list[Row], cfg, ctx):
    """One optimizer step on one mini-batch of packed rows (this rank's share). Returns its
    metrics (policy_loss's, as means over the response tokens, the loss and the gradient norm) as
    0-d tensors (read them once per rollout step, not per micro-batch), or None when the
    mini-batch has no response token to train on (every trace masked out): no step then."""
    if distributed.sum_over_ranks(sum(r.response_tokens for r in rows)) == 0:
        return None
    n_tokens, totals = backward_rows(model, rows, cfg, ctx)
    names = list(totals)
    totals = dict(zip(names, distributed.all_reduce_sum(torch.stack([totals[k] for k in names]))))
    grad_norm = distributed.clip_and_step(model, optimizer, cfg.grad_clip, ctx, loss=totals["loss"])
    return {k: v / n_tokens for k, v in totals.items() if k != "loss"} | {"loss": totals["loss"], "grad_norm": grad_norm}


def assemble(rounds, kept, share, cfg) -> list[list[Row]]:
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
            seqs += [s for s, c in zip(traces(rounds[r].prompts, completions, advantages), completions)
                     if not (cfg.overlong == "mask" and c.finish_reason == "length")]
        minis.append(pack_rows(seqs, cfg.micro_batch_tokens))
    return minis


def train_on(model, optimizer, minis, cfg, ctx) -> list[dict]:
    """One optimizer step per mini-batch (passes.update); the metrics of those taken."""
    model.train()
    if cfg.offload_states:  # AdamW's state, on the host outside the updates (grpo.place_states)
        distributed.place(optimizer, ctx.device)
    return [u for u in (update(model, optimizer, rows, cfg, ctx) for rows in minis) if u is not None]


def place_states(optimizer, where, cfg):
    """With --offload_states, AdamW's state (which serves only the updates) waits on the host
    outside them: sent there before the rollout and back before the first update."""
    if cfg.offload_states:
        distributed.place(optimizer, where)


def evaluate(policy: Policy, held_out, cfg, ctx):
    """Greedy verdict accuracy on held-out judge prompts (this rank's data-parallel group's share;
    the ranks of a TP group judge the same prompts, so every count is tp times over, and the
    ratio is the same)."""
    index, groups = ctx.dp
    mine = list(range(index, len(held_out.ids), groups))
    with decoding(policy.model, cfg, ctx) as decoder, torch.no_grad():
        budget = tp.kv_budget(kv_budget_bytes(cfg), ctx)
        verdicts = greedy_verdicts(decoder, policy.tokenizer, [held_out.ids[i] for i in mine], cfg.max_response_len,
                                   cfg.rollout_slots, budget) if mine else []
    right = sum(verdict == reward.LETTERS[held_out.records[i]["label"]] for i, (_, verdict, _) in zip(mine, verdicts))
    counts = distributed.all_reduce_sum(torch.tensor([float(right), float(len(mine))]))
    return float(counts[0] / counts[1])
