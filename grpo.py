"""Stage 2 of RM-R1: GRPO with the +1/-1 verifiable reward. The project's main job.

    torchrun --nproc_per_node=2 grpo.py                     # CPU demo: GRPO on the shipped judge
    torchrun --nproc_per_node=8 grpo.py --model runs/sft7b/hf --data rm_r1_rlvr.jsonl --out runs/grpo7b
    torchrun --nproc_per_node=8 grpo.py --model runs/sft14b/hf --data ... --lr 7e-7 --rollout_tp 2   # 14B
    torchrun --nnodes=4 --nproc_per_node=8 ... grpo.py --model R1-Distill-Qwen-32B --lr 8e-7 --rollout_tp 8  # 32B

For each rollout batch of judge prompts: sample n traces per prompt from the current policy,
score each with reward.rlvr_reward (+1 if the verdict in the last 80 characters matches the
label, else -1), normalize rewards within each prompt's group into advantages, then take
rollout_batch_size / mini_batch_size optimizer steps on the PPO clipped objective plus a k3 KL
penalty to the frozen reference model.

The CPU demo (40 steps of 32 prompts x 7 traces) teaches the shipped judge to solve the
arithmetic questions that its distillation taught it to file as Chat and answer A
(demo.HASTY_SHARE); the README has its figures.

Paper defaults apply with --model; with neither --model nor --data, the demo's (demo/recipe.py),
and the run says so.
Departures from the paper: none in the objective (KL is verl's low_var_kl, clamped to [-10, 10],
a loss term, not in the reward; the log-ratio is clamped to [-20, 20] before exp, as in verl);
sequences are packed into rows for the trainer's forward passes rather than padded; an epoch's
leftover prompts open the next epoch rather than being dropped.

Options the paper did not use, all off by default:
- --filter_equal_groups (DAPO's dynamic sampling): drop groups whose rewards are all equal;
  --oversample K: then sample up to K further batches, drawn from all prompts by (seed, step),
  until the kept groups fill the batch. The same groups for any number of ranks and on resume.
- --overlong mask: truncated traces leave the loss; --overlong penalty: DAPO's soft overlong
  penalty over the last --overlong_buffer tokens, added to the reward.
- --clip_ratio_c C: dual clip, a negative advantage's loss is at most -A * C (verl: 3).
- --log_traces_every N: sample prompts, traces, verdicts and rewards to out/rollouts/step_N.jsonl.
- --keep_last K: only the newest K step_N checkpoints; --export_every N: a HF export at
  out/hf/step_N during the run (export.py makes one from any step_N afterwards).
- --rollout_tp N: the rollout decodes tensor-parallel (tp.py), each rank 1/N of every matrix;
  the same traces as without it. --offload_states: AdamW's state waits in host memory outside
  the updates, and the reference is read from --model for its log-probs only (32B on one node).
Failing safely: every setting is checked before any data or model is read; a non-finite loss or
gradient norm stops the run before the optimizer step, naming the last good checkpoint, and no
checkpoint or export is ever written from non-finite weights; --resume refuses other settings
than the run's (out/config.json) but those safe to change, and a fresh run refuses a used --out.
"""

import contextlib
import functools
import gc
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch

import data
import demo.recipe
import distributed as D
import plan
import reward
import tp
from checkpoint import load_config, write_atomic
from cli import check_fields, parse_config
from objective import equal_groups, group_advantages, overlong_penalty
from passes import backward_rows, old_and_ref_logprobs, pack_rows, sequences, update
from plan import MORE_RANKS
from rollout import (PAGE_SIZE, PREFILL_TOKENS, SamplingParams, cache_pages, decode, greedy_verdicts,
                     kv_budget, new_cache, prefill)


@dataclass
class GRPOConfig:
    model: str = ""                    # policy to start from (HF dir); empty: the demo SFT judge
    data: str = ""                     # RLVR records or raw preference pairs; empty: demo pairs
    eval_data: str = ""                # held-out RLVR records scored every eval_every steps
    out: str = "runs/grpo"             # checkpoints, metrics.jsonl, hf/ export
    style: str = "instruct"            # judge prompt style when --data holds raw pairs
    lr: float = 1e-6                   # paper: 1e-6 (7B), constant
    rollout_batch_size: int = 1024     # prompts per rollout batch
    mini_batch_size: int = 128         # prompts per optimizer step (1024/128 = 8 updates)
    micro_batch_tokens: int = 16384    # tokens per packed row in the trainer's forward/backward
    n_samples: int = 7                 # traces per prompt (the group)
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_len: int = 4096         # longer prompts are dropped and counted
    max_response_len: int = 8192
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2       # > clip_ratio_low: DAPO's clip-higher
    clip_ratio_c: float = 0.0          # dual clip: a negative advantage's loss <= -A * c (verl: 3); 0: off
    filter_equal_groups: bool = False  # DAPO's dynamic sampling: drop groups whose rewards are all equal
    oversample: int = 0                # with filter_equal_groups: up to this many more rollout rounds to fill the batch
    overlong: str = "keep"             # truncated traces: keep | mask (out of the loss) | penalty (DAPO's soft one)
    overlong_buffer: int = 1024        # penalty: from max_response_len - this many tokens, down to -1 at the limit
    kl_coef: float = 1e-3              # weight of the KL-to-reference loss term; 0 skips the ref model
    kl_estimator: str = "low_var_kl"   # k1 | mse (k2) | low_var_kl (k3)
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"       # token-mean | seq-mean-token-mean
    norm_adv_by_std: bool = True       # False: Dr. GRPO (no division by the group's std)
    recompute_old_logprobs: bool = True  # False: trust the sampler's log-probs as the old policy's
    grad_clip: float = 1.0
    weight_decay: float = 0.01         # AdamW, as verl's default
    epochs: int = 1                    # passes over the prompts
    bf16: bool = True                  # CUDA: bf16 compute, fp32 master weights and reductions
    activation_checkpointing: bool = True
    rollout_slots: int = 256           # most sequences decoded at once per rank, or per TP group (the KV budget may allow fewer)
    offload_states: bool = False       # AdamW state in host memory outside the updates; the reference re-read for its log-probs only
    rollout_tp: int = 1                # tensor-parallel ranks per rollout (tp.py): each holds 1/tp of the weights and KV heads
    kv_budget_gib: float = 0.0         # rollout KV-cache memory per rank; 0: what is free then, less 5%
    eval_every: int = 0                # rollout steps between held-out evaluations; 0: start and end only
    eval_limit: int = 512              # held-out pairs per evaluation
    save_every: int = 0                # rollout steps between resumable checkpoints; 0: end only
    keep_last: int = 0                 # keep only the newest this many step_N checkpoints; 0: all
    export_every: int = 0              # rollout steps between HF exports to out/hf/step_N; 0: at the end only
    log_traces_every: int = 0          # rollout steps between writing sample traces to out/rollouts/step_N.jsonl
    resume: bool = False               # continue from out/latest: same prompts, same rollouts
    resume_data_changed: bool = False  # --resume although --data's contents changed (digest in out/config.json)
    max_steps: int = 0                 # stop (with a checkpoint) after this many steps of this run
    seed: int = 0
    wandb_project: str = ""
    dist_timeout_min: float = 60.0     # how long a rank waits at a collective for ranks still sampling
    check_memory: bool = True          # CUDA: walk the memory plan before step 1; refuse what cannot fit
    plan: bool = False                 # only print the memory plan (needs --model DIR/config.json alone)
    plan_world_size: int = 8           # ranks the plan simulates
    plan_gpu_gib: float = 80.0         # memory of each simulated GPU


# ---- rollouts ----

def rollout(model, tokenizer, prompts, step, cfg: GRPOConfig, ctx, prompt_keys, resample=0):
    """Sample n traces per prompt with the current policy (decoding()). Seeds derive from (seed,
    step, oversampling round, global prompt index, sample index), so a resumed run draws the same
    traces and neither the number of ranks nor --rollout_tp changes them. With --rollout_tp the
    ranks of a TP group sample their prompts together. Returns this rank's completions, their
    texts and the sampler's RolloutStats."""
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_response_len, n=cfg.n_samples,
                            stop_token_ids=(tokenizer.eos_token_id,),
                            seed=(cfg.seed * 1_000_003 + step + resample * 1_000_000_007) % 2**32)
    with decoding(model, cfg, ctx) as decoder, torch.no_grad():
        completions, stats = tp.generate_in_group(decoder, prompts, params, ctx.tp_mesh, prompt_keys,
                                                  max_batch_size=cfg.rollout_slots,
                                                  kv_budget_bytes=kv_budget_bytes(cfg))
    return completions, [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions], stats


@contextlib.contextmanager
def decoding(model, cfg: GRPOConfig, ctx):
    """The policy as the sampler decodes it: the full weights gathered once from the FSDP2 shards,
    or with --rollout_tp a tensor-parallel copy (each rank 1/tp of every matrix, tp.py)."""
    if ctx.tp_mesh is None:
        with D.full_weights(model) as plain:
            yield plain
    else:
        dtype = torch.bfloat16 if ctx.gpu and cfg.bf16 else torch.float32
        yield tp.weights(model, ctx.tp_mesh, dtype, ctx.device)


def kv_budget_bytes(cfg: GRPOConfig):
    """--kv_budget_gib in bytes; None lets the sampler take what the device has free."""
    return int(cfg.kv_budget_gib * 2**30) if cfg.kv_budget_gib else None


def judge_metrics(completions, labels, rewards, verdicts, n):
    """What none of the general frameworks log for a judge: verdict balance vs gold, invalid
    format, k-of-n correct histogram, all-equal groups, lengths of right vs wrong traces."""
    right = rewards > 0
    lengths = torch.tensor([float(len(c.token_ids)) for c in completions])
    groups = right.view(-1, n).sum(-1)
    m = {"reward": rewards.mean(), "accuracy": right.float().mean(),
         "share_A": np.mean([v == "A" for v in verdicts]),
         "gold_share_A": np.mean([l == "model_a" for l in labels]),
         "invalid_format": np.mean([v is None for v in verdicts]),
         "all_equal_groups": ((groups == 0) | (groups == n)).float().mean(),
         "response_len": lengths.mean(), "response_len_max": lengths.max(),
         "truncated": np.mean([c.finish_reason == "length" for c in completions]),
         "len_right": lengths[right].mean() if right.any() else 0.0,
         "len_wrong": lengths[~right].mean() if (~right).any() else 0.0}
    hist = Counter(groups.tolist())
    m.update({f"groups_{k}_of_{n}": hist.get(k, 0) / len(groups) for k in range(n + 1)})
    return m


def rlvr_rewards(completions, texts, records):
    """The paper's reward: +1/-1 from the verdict in the last 80 characters vs the label."""
    return torch.tensor([reward.rlvr_reward(t, records[c.prompt_index]["label"])
                         for c, t in zip(completions, texts)])


def rank_share(cfg: GRPOConfig, ctx):
    """Positions in the rollout batch that this rank samples and trains on: its slice of every
    mini-batch, so that mini-batch j holds the same prompts whatever the number of ranks."""
    m = cfg.mini_batch_size // ctx.world_size
    return [j * cfg.mini_batch_size + ctx.rank * m + i
            for j in range(cfg.rollout_batch_size // cfg.mini_batch_size) for i in range(m)]


def grpo_step(model, ref_model, optimizer, tokenizer, records, prompts, step, prompt_keys,
              cfg: GRPOConfig, ctx, score=rlvr_rewards, draw=None, trace_file=None):
    """One rollout batch (this rank's share of prompts, from rank_share): sample, score, compute
    advantages, then one optimizer step per mini-batch. prompt_keys are the prompts' global
    indices (they key the sampling noise). With filter_equal_groups, groups whose rewards are all
    equal are dropped, and with oversample, draw(k) gives (records, prompts) of this rank's share
    of another batch, sampled (k = 1, 2, ...) until the kept groups fill one. Sample traces go
    to trace_file when given. Returns the step's metrics, averaged over ranks."""
    n, R, share = cfg.n_samples, cfg.rollout_batch_size, rank_share(cfg, ctx)
    t0 = time.time()
    model.eval()
    # Per resample: this rank's groups and the sampler's stats; then the (resample, position)s kept.
    # AdamW's state serves only the updates: with --offload_states it waits on the host until then.
    if cfg.offload_states:
        D.place(optimizer, ctx.host)
    groups, engine, kept = [], [], []
    for resample in range(1 + (cfg.oversample if cfg.filter_equal_groups else 0)):
        if resample:
            records, prompts = draw(resample)
        completions, texts, rollout_stats = rollout(model, tokenizer, prompts, step, cfg, ctx, prompt_keys,
                                                    resample)
        rewards = score(completions, texts, records)
        train_rewards = rewards
        if cfg.overlong == "penalty":
            lengths = torch.tensor([float(len(c.token_ids)) for c in completions])
            train_rewards = rewards + overlong_penalty(lengths, cfg.max_response_len, cfg.overlong_buffer)
        groups.append((records, prompts, completions, texts, rewards, train_rewards))
        engine.append(rollout_stats)
        keep = torch.zeros(R)
        if cfg.filter_equal_groups:
            keep[share] = (~equal_groups(train_rewards, n)).float()
        else:
            keep[share] = 1.0
        kept += [(resample, p) for p in torch.nonzero(D.all_reduce_sum(keep)).flatten().tolist()]
        if len(kept) >= R:
            break
    t_gen = time.time()

    # Mini-batch j trains on kept groups j*M..(j+1)*M in (resample, position) order, each rank
    # on its own: the same mini-batches whatever the number of ranks.
    kept, M = kept[:R], cfg.mini_batch_size
    mine = {(r, p): i for r in range(len(groups)) for i, p in enumerate(share)}
    minis = []
    for j in range(0, len(kept), M):
        seqs = []
        for r, p in kept[j:j + M]:
            if (r, p) not in mine:
                continue
            g = mine[r, p]
            _, prompts_r, completions, _, _, train_rewards = groups[r]
            block = slice(g * n, (g + 1) * n)
            advantages = group_advantages(train_rewards[block], n, cfg.norm_adv_by_std)
            seqs += [s for s, c in zip(sequences(prompts_r, completions[block], advantages), completions[block])
                     if not (cfg.overlong == "mask" and c.finish_reason == "length")]
        minis.append(pack_rows(seqs, cfg.micro_batch_tokens))
    gap = logprob_passes(model, ref_model, [r for rows in minis for r in rows], cfg, ctx)
    t_logprobs = time.time()

    model.train()
    if cfg.offload_states:
        D.place(optimizer, ctx.device)
    updates = [u for u in (update(model, optimizer, rows, cfg, ctx) for rows in minis) if u is not None]
    t_update = time.time()

    records, prompts, completions, texts, rewards, _ = groups[0]
    if trace_file is not None:
        write_traces(trace_file, tokenizer, records, prompts, completions, texts, rewards, n)
    labels = [records[c.prompt_index]["label"] for c in completions]
    verdicts = [reward.parse_verdict(t) for t in texts]
    m = {k: float(v) for k, v in judge_metrics(completions, labels, rewards, verdicts, n).items()}
    m = dict(zip(m, D.all_reduce_mean(torch.tensor(list(m.values()))).tolist()))
    if updates:
        m.update({k: float(torch.stack([u[k] for u in updates]).mean()) for k in updates[0]})
    tokens = sum(len(prompts_r[c.prompt_index]) + len(c.token_ids) for _, prompts_r, cs, *_ in groups for c in cs)
    n_tokens = D.all_reduce_sum(torch.tensor(float(tokens)))
    generated = sum(len(c.token_ids) for _, _, cs, *_ in groups for c in cs)
    generated = D.all_reduce_sum(torch.tensor(float(generated)))
    sampler = D.all_reduce_max(torch.tensor([float(max(getattr(s, k) for s in engine)) for k in
                                             ("peak_sequences", "peak_kv_bytes", "preemptions", "pool_pages")]))
    m.update(rollout_logprob_gap=float(gap), lr=optimizer.param_groups[0]["lr"], updates=len(updates),
             kept_groups=len(kept) / R, rollout_rounds=len(groups),
             time_generate=t_gen - t0, time_logprobs=t_logprobs - t_gen,
             time_update=t_update - t_logprobs, tokens_per_s=float(n_tokens) / (t_update - t0),
             rollout_tokens_per_s=float(generated) / (t_gen - t0), rollout_peak_sequences=float(sampler[0]),
             rollout_peak_kv_gib=float(sampler[1]) / 2**30, rollout_preemptions=float(sampler[2]),
             rollout_pool_pages=float(sampler[3]))
    return m


TRACE_GROUPS = 8  # groups of rank 0's share written per logged step


def write_traces(path, tokenizer, records, prompts, completions, texts, rewards, n):
    """The first TRACE_GROUPS groups' judge prompts, traces, verdicts and rewards, one JSON line per
    trace: what the metrics cannot show (a right verdict for a wrong reason, say)."""
    lines = []
    for c, text, r in list(zip(completions, texts, rewards.tolist()))[:TRACE_GROUPS * n]:
        lines.append(json.dumps({"prompt_index": c.prompt_index, "sample": c.sample_index,
                                 "prompt": tokenizer.decode(prompts[c.prompt_index]),
                                 "label": records[c.prompt_index]["label"], "trace": text,
                                 "verdict": reward.parse_verdict(text), "reward": r,
                                 "finish_reason": c.finish_reason, "tokens": len(c.token_ids)}))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, "".join(line + "\n" for line in lines))


def evaluate(model, tokenizer, records, prompts, cfg: GRPOConfig, ctx):
    """Greedy verdict accuracy on held-out judge prompts (this rank's data-parallel group's share;
    the ranks of a TP group judge the same prompts, so every count is tp times over, and the
    ratio is the same)."""
    index, groups = ctx.dp
    mine = list(range(index, len(prompts), groups))
    with decoding(model, cfg, ctx) as decoder, torch.no_grad():
        budget = tp.agreed_budget(kv_budget_bytes(cfg), ctx.device, ctx.tp_mesh)
        verdicts = greedy_verdicts(decoder, tokenizer, [prompts[i] for i in mine], cfg.max_response_len,
                                   cfg.rollout_slots, budget) if mine else []
    right = sum(verdict == reward.LETTERS[records[i]["label"]] for i, (_, verdict, _) in zip(mine, verdicts))
    counts = D.all_reduce_sum(torch.tensor([float(right), float(len(mine))]))
    return float(counts[0] / counts[1])


# ---- data and models ----

def load_records(path, cfg: GRPOConfig):
    """RLVR records ({context_messages, winner}) from a file of them or of raw preference pairs."""
    rows = data.read_records(path)
    rlvr = ["context_messages" in r for _, r in rows]
    if any(kind != rlvr[0] for kind in rlvr):
        where = rows[rlvr.index(not rlvr[0])][0]
        kinds = ("RLVR records (context_messages, winner)", "raw preference pairs")
        raise ValueError(f"{where}: a {kinds[rlvr[0]]} record in a file that starts with "
                         f"{kinds[not rlvr[0]]}: a data file holds one kind")
    if rlvr[0]:
        return data.load_rlvr(path)
    records, identical = data.pairs_to_rlvr(path, seed=cfg.seed, style=cfg.style)
    D.log(f"{path}: {identical} pairs dropped whose chosen and rejected answers are identical")
    if not records:
        raise ValueError(f"{path}: no pair is left to train on")
    return records


def encode_all(tokenizer, records, max_len, what):
    """Prompt ids for every record; prompts over max_len are dropped and counted, not cut."""
    kept, prompts = [], []
    for r in records:
        ids = data.encode_prompt(tokenizer, r["context_messages"], max_len)
        if ids is not None:
            kept.append(r)
            prompts.append(ids)
    D.log(f"{what}: {len(kept)} prompts, {len(records) - len(kept)} dropped as longer than "
          f"max_prompt_len={max_len}")
    return kept, prompts


def check_config(cfg: GRPOConfig, world_size):
    """Every setting, before any data or model is read; an error names the flag."""
    check_fields(cfg, [
        ("rollout_batch_size", cfg.rollout_batch_size >= 1, "must be >= 1"),
        ("mini_batch_size", cfg.mini_batch_size >= 1, "must be >= 1"),
        ("rollout_batch_size", cfg.rollout_batch_size % max(1, cfg.mini_batch_size) == 0,
         f"must be a multiple of --mini_batch_size ({cfg.mini_batch_size})"),
        ("mini_batch_size", cfg.mini_batch_size % world_size == 0, f"must be a multiple of the {world_size} ranks"),
        ("n_samples", cfg.n_samples >= 2, "must be >= 2: GRPO's advantages compare the samples of a group "
         "(the std of one sample is NaN)"),
        ("temperature", cfg.temperature > 0, "must be > 0: the rollouts are sampled"),
        ("top_p", 0 < cfg.top_p <= 1, "must be in (0, 1]"),
        ("lr", cfg.lr > 0, "must be > 0"),
        ("clip_ratio_low", 0 <= cfg.clip_ratio_low < 1, "must be in [0, 1)"),
        ("clip_ratio_high", cfg.clip_ratio_high >= 0, "must be >= 0"),
        ("clip_ratio_c", cfg.clip_ratio_c == 0 or cfg.clip_ratio_c > 1, "must be > 1 (verl uses 3), or 0 for off"),
        ("oversample", cfg.oversample >= 0, "must be >= 0"),
        ("oversample", not cfg.oversample or cfg.filter_equal_groups, "needs --filter_equal_groups"),
        ("overlong", cfg.overlong in ("keep", "mask", "penalty"), "must be keep, mask or penalty"),
        ("overlong_buffer", cfg.overlong != "penalty" or 1 <= cfg.overlong_buffer <= cfg.max_response_len,
         f"must be in [1, --max_response_len ({cfg.max_response_len})] for --overlong penalty"),
        ("log_traces_every", cfg.log_traces_every >= 0, "must be >= 0 (0: never)"),
        ("kl_coef", cfg.kl_coef >= 0, "must be >= 0 (0 drops the KL term and the reference model)"),
        ("kl_estimator", cfg.kl_estimator in ("k1", "mse", "low_var_kl"), "must be k1, mse or low_var_kl"),
        ("loss_agg", cfg.loss_agg in ("token-mean", "seq-mean-token-mean"),
         "must be token-mean or seq-mean-token-mean"),
        ("style", cfg.style in data.STYLES, f"must be one of {data.STYLES}"),
        ("grad_clip", cfg.grad_clip > 0, "must be > 0"),
        ("epochs", cfg.epochs >= 1, "must be >= 1"),
        ("eval_every", cfg.eval_every >= 0, "must be >= 0 (0: at the start and end only)"),
        ("eval_limit", cfg.eval_limit >= 1, "must be >= 1"),
        ("micro_batch_tokens", cfg.micro_batch_tokens >= 2, "must be >= 2"),
        ("max_prompt_len", cfg.max_prompt_len >= 1, "must be >= 1"),
        ("max_response_len", cfg.max_response_len >= 1, "must be >= 1"),
        ("rollout_slots", cfg.rollout_slots >= 1, "must be >= 1"),
        ("rollout_tp", cfg.rollout_tp >= 1 and world_size % cfg.rollout_tp == 0,
         f"must be >= 1 and divide the {world_size} ranks: start grpo.py under torchrun with a multiple of "
         f"{cfg.rollout_tp} ranks (--nproc_per_node x --nnodes), or leave --rollout_tp at 1"),
        ("kv_budget_gib", cfg.kv_budget_gib >= 0, "must be >= 0 (0: what is free at rollout time)"),
        *D.run_rules(cfg), *plan.rules(cfg),
    ])


def build_policy(cfg: GRPOConfig, ctx, fill=True):
    """The policy (fp32 master weights, sharded) and its AdamW, as train() and the plan build them."""
    model = D.load_model(cfg.model, ctx, bf16=cfg.bf16,
                         activation_checkpointing=cfg.activation_checkpointing, fill=fill)
    return model, D.adamw(model, ctx, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_reference(cfg: GRPOConfig, ctx, fill=True):
    """The frozen reference policy of the KL term (bf16 on GPUs); None when kl_coef is 0."""
    return D.load_model(cfg.model, ctx, bf16=cfg.bf16, frozen=True, fill=fill) if cfg.kl_coef else None


def logprob_passes(model, ref_model, rows, cfg: GRPOConfig, ctx, fill=True):
    """passes.old_and_ref_logprobs; with --offload_states the reference (which never changes) is
    read from --model for them and freed after (fill=False: the plan's unfilled build)."""
    if not cfg.offload_states:
        return old_and_ref_logprobs(model, ref_model, rows, cfg, ctx)
    ref_model = build_reference(cfg, ctx, fill=fill)
    gap = old_and_ref_logprobs(model, ref_model, rows, cfg, ctx)
    del ref_model
    gc.collect()  # FSDP2's modules hold reference cycles: free the shards now, not at a later collection
    return gap


def plan_walk(cfg: GRPOConfig, ctx, plan):
    """One GRPO step in train()'s order on fake tensors (plan.py): the rollout at the longest
    prompt and response, the trainer's passes over one packed row of the longest sequences."""
    model, optimizer = build_policy(cfg, ctx, fill=False)
    plan.track(model, optimizer)
    W = ctx.world_size
    prompts_per_rank = cfg.rollout_batch_size // W
    seq_len = cfg.max_prompt_len + cfg.max_response_len
    seqs = [{"input_ids": [0] * seq_len, "prompt_len": cfg.max_prompt_len, "advantage": 1.0,
             "sampler_logprobs": [0.0] * cfg.max_response_len}] * (cfg.mini_batch_size // W * cfg.n_samples)
    rows = pack_rows(seqs, cfg.micro_batch_tokens)
    plan.notes += [f"rollout: {prompts_per_rank} prompts x {cfg.n_samples} samples per rank, at "
                   f"{cfg.max_prompt_len:,} + {cfg.max_response_len:,} tokens",
                   f"trainer: {len(rows)} packed rows of {len(rows[0]['ids']):,} tokens per mini-batch "
                   f"per rank (one measured: each is alike)"]
    with plan.phase("load: policy shards, AdamW state (then to the host)" if cfg.offload_states else
                    "load: policy shards, bf16 reference, AdamW state",
                    MORE_RANKS + ", or a smaller model" + ("" if cfg.offload_states else ", or --offload_states")):
        ref_model = None if cfg.offload_states else build_reference(cfg, ctx, fill=False)
        plan.make_optimizer_state(model, optimizer)
        if cfg.offload_states:
            D.place(optimizer, ctx.host)

    tp_size = cfg.rollout_tp
    with contextlib.ExitStack() as rollout_weights:
        weights = (f"rollout: tensor-parallel weights (1/{tp_size} of every matrix)" if tp_size > 1 else
                   "rollout: gather full weights")
        with plan.phase(weights, MORE_RANKS + ("; a larger --rollout_tp splits them further" if tp_size > 1 else
                        "; the full weights are gathered on every rank (--rollout_tp splits them)")):
            plain = rollout_weights.enter_context(decoding(model, cfg, ctx))
        # A TP group decodes its ranks' prompts together, each rank holding 1/tp of every KV head.
        group_prompts = prompts_per_rank * tp_size
        slots, cache = min(cfg.rollout_slots, group_prompts * cfg.n_samples), None
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, n=cfg.n_samples,
                                max_new_tokens=cfg.max_response_len)
        with plan.phase("rollout: KV pool", "") as phase:
            dtype = plain.embed_tokens.weight.dtype
            budget = kv_budget_bytes(cfg) or kv_budget(plan.free(), plan.total)
            try:
                n_pages = cache_pages(plain.config, [[0] * cfg.max_prompt_len] * group_prompts, params, dtype,
                                      budget, slots)
                cache = new_cache(plain, slots, seq_len, PAGE_SIZE, n_pages)
                phase.name += (f" ({n_pages:,} pages of {PAGE_SIZE}: {n_pages * PAGE_SIZE // seq_len} "
                               f"sequences at full length, more as most end early)")
            except ValueError as e:
                phase.error = str(e)  # the trainer's phases below are still measured
        advice = "lower --rollout_slots, or --kv_budget_gib below the default"
        if cache is not None:
            n = max(1, min(PREFILL_TOKENS // cfg.max_prompt_len, group_prompts))
            with plan.phase(f"rollout: prefill ({n} prompts of {cfg.max_prompt_len:,} tokens)", advice):
                prompt_pages = cache.pages_for(cfg.max_prompt_len - 1)
                prefill(plain, cache, [([0] * (cfg.max_prompt_len - 1), cache.take(prompt_pages))
                                       for _ in range(n)])
        with plan.phase(f"rollout: decode step ({slots} sequences), then release" if cache is not None else
                        "rollout: release the gathered weights", advice, counted=cache is not None):
            if cache is not None:
                state = torch.zeros(4, slots, dtype=torch.long, device=ctx.device)
                decode(plain, cache, state, params, seq_len)  # every slot at the longest length
            del plain, cache
            rollout_weights.close()  # reshard inside the phase, where the tracker sees it
    advice = f"lower --micro_batch_tokens (now {cfg.micro_batch_tokens:,})"
    with plan.phase("old + reference log-probs (one row)" + (", the reference read for them" if cfg.offload_states
                                                              else ""), advice):
        logprob_passes(model, ref_model, rows[:1], cfg, ctx, fill=False)
    model.train()
    with plan.phase("update: forward + backward (one row)" + (", AdamW state back" if cfg.offload_states else ""),
                    advice + ("" if cfg.offload_states else ", or --offload_states")):
        if cfg.offload_states:
            D.place(optimizer, ctx.device)
        backward_rows(model, rows[:1], cfg, ctx)
    with plan.phase("update: clip + AdamW step", MORE_RANKS):
        D.clip_and_step(model, optimizer, cfg.grad_clip)


def step_prompts(n_records, step, cfg: GRPOConfig) -> list[int]:
    """The prompts of rollout step `step`, as indices into the records: one seeded permutation
    per epoch, the epochs end to end, each step the next rollout_batch_size of them. An epoch's
    leftovers open the next epoch's first step instead of being dropped, and the order is a pure
    function of (seed, step), so a resumed run takes the same prompts."""
    first, end = step * cfg.rollout_batch_size, (step + 1) * cfg.rollout_batch_size
    orders = {epoch: np.random.default_rng([cfg.seed, epoch]).permutation(n_records)
              for epoch in range(first // n_records, (end - 1) // n_records + 1)}
    return [int(orders[p // n_records][p % n_records]) for p in range(first, end)]


def oversampler(records, prompts, step, cfg: GRPOConfig, share):
    """draw(k) for grpo_step: this rank's share of the k-th further batch of a step, drawn from all
    the prompts with the seed (seed, step, k), so that resumed runs and any number of ranks draw
    the same ones."""
    def draw(resample):
        rng = np.random.default_rng([cfg.seed, step, resample])
        passes = -(-cfg.rollout_batch_size // len(records))
        order = np.concatenate([rng.permutation(len(records)) for _ in range(passes)])
        return [records[order[i]] for i in share], [prompts[order[i]] for i in share]
    return draw


def train(cfg: GRPOConfig, preset="", records=None, eval_records=None):
    """One GRPO run on --data (or records(), the demo's), scored on --eval_data (or eval_records())."""
    if cfg.plan:
        check_config(cfg, cfg.plan_world_size)
        return plan.run(plan_walk, cfg, cfg.plan_world_size, cfg.plan_gpu_gib,
                        f"memory plan of grpo.py --model {cfg.model}, per rank", tp=cfg.rollout_tp)
    check_config(cfg, D.world_size())
    ctx = D.init(cfg.dist_timeout_min, cfg.rollout_tp)
    # Settings, data and the run directory are checked before any model is loaded.
    tp.check_divisible(load_config(cfg.model), cfg.rollout_tp)
    tokenizer = data.load_tokenizer(cfg.model)
    records, prompts = encode_all(tokenizer, load_records(cfg.data, cfg) if records is None else records(),
                                  cfg.max_prompt_len, "train")
    held_out = eval_records or (functools.partial(load_records, cfg.eval_data, cfg) if cfg.eval_data else None)
    eval_records, eval_prompts = encode_all(tokenizer, held_out()[:cfg.eval_limit], cfg.max_prompt_len, "eval") \
        if held_out else ([], [])
    need = max(map(len, prompts), default=0) + cfg.max_response_len
    if cfg.micro_batch_tokens < need:  # a longer sequence would get a row of its own, past what the plan sized
        raise ValueError(f"--micro_batch_tokens {cfg.micro_batch_tokens}: a packed row must hold one prompt and "
                         f"its response, the longest prompt ({need - cfg.max_response_len} tokens) + "
                         f"--max_response_len ({cfg.max_response_len}): raise it to at least {need}")
    R = cfg.rollout_batch_size
    total_steps, unused = divmod(len(records) * cfg.epochs, R)
    if total_steps == 0:
        raise ValueError(f"{len(records)} prompts x {cfg.epochs} epochs do not fill one rollout batch "
                         f"(--rollout_batch_size {R})")
    if unused:
        D.log(f"{total_steps} rollout steps of {R} prompts; each epoch's leftovers open the next epoch, "
              f"and the last {unused} prompts of epoch {cfg.epochs} are not used")
    D.start_run(cfg.out, asdict(cfg), cfg.resume, preset)
    if ctx.gpu and cfg.check_memory:
        plan.check_before_training()

    model, optimizer = build_policy(cfg, ctx)
    ref_model = None if cfg.offload_states else build_reference(cfg, ctx)  # offloaded: read per step
    share = rank_share(cfg, ctx)

    def step_fn(step):
        order = step_prompts(len(records), step, cfg)
        mine = [order[i] for i in share]
        logged = cfg.log_traces_every and (step + 1) % cfg.log_traces_every == 0 and D.is_main()
        traces = os.path.join(cfg.out, "rollouts", f"step_{step + 1:08d}.jsonl") if logged else None
        m = grpo_step(model, ref_model, optimizer, tokenizer, [records[i] for i in mine],
                      [prompts[i] for i in mine], step, [step * R + i for i in share], cfg, ctx,
                      draw=oversampler(records, prompts, step, cfg, share), trace_file=traces)
        if eval_prompts and (cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == total_steps):
            m["eval_accuracy"] = evaluate(model, tokenizer, eval_records, eval_prompts, cfg, ctx)
        return m

    def on_start(start, metrics):  # the starting policy's accuracy, once
        if eval_prompts and start == 0:
            metrics.log(0, {"eval_accuracy": evaluate(model, tokenizer, eval_records, eval_prompts, cfg, ctx)},
                        show=("eval_accuracy",))

    D.run_steps(cfg, model, optimizer, tokenizer, total_steps, step_fn, os.path.join(cfg.out, "hf"),
                show=("reward", "eval_accuracy", "kl", "clip_frac"), on_start=on_start)
    return model


def main(argv=None):
    cfg, given = parse_config(GRPOConfig, argv, __doc__)
    # The demo's preset is for a bare `grpo.py`: data of one's own starts from a policy of one's own.
    check_fields(cfg, [("data", not (cfg.data and not cfg.model), "needs --model, the policy to start from (an SFT "
                        "export or a DeepSeek-R1-Distill checkpoint); without --model and --data grpo.py runs the demo")])
    if cfg.model:
        result = train(cfg)
    else:  # the CPU demo: its preset, its synthetic pairs
        result = demo.recipe.grpo(cfg, given, train)
    D.shutdown()
    if cfg.plan:
        sys.exit(0 if result.fits else 1)


if __name__ == "__main__":
    main()
