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

Options the paper did not use are off by default, each described by its field below
(--filter_equal_groups / --oversample, --overlong, --clip_ratio_c, --log_traces_every,
--keep_last, --export_every, --rollout_tp, --offload_states). Failing safely: every setting is
checked before any data or model is read; a non-finite loss or gradient norm stops the run before
the optimizer step, naming every kept checkpoint (--resume --resume_step K goes on from any);
--resume refuses settings other than the run's (out/config.json) but those safe to change
(run.SAFE_TO_CHANGE).
"""

import contextlib
import dataclasses
import functools
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

import data
import demo.recipe
import distributed as D
import plan
import reward
import run
import tokenization
import tp
from checkpoint import load_config, write_atomic
from cli import check_fields, parse_config
from passes import Round, assemble, kept_groups, old_and_ref_logprobs, score_round, train_on
from reward import judge_metrics, rlvr_rewards
from rollout import SamplingParams, full_length, greedy_verdicts
from scheduler import RolloutStats


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
    kv_budget_gib: float = 0.0         # rollout KV-cache memory per rank; 0: what is free then, less 10%
    eval_every: int = 0                # rollout steps between held-out evaluations; 0: start and end only
    eval_limit: int = 512              # held-out pairs per evaluation
    save_every: int = 0                # rollout steps between resumable checkpoints; 0: end only
    keep_last: int = 0                 # keep only the newest this many step_N checkpoints; 0: all
    export_every: int = 0              # rollout steps between HF exports to out/hf/step_N; 0: at the end only
    log_traces_every: int = 0          # rollout steps between writing sample traces to out/rollouts/step_N.jsonl
    resume: bool = False               # continue from out/latest: same prompts, same rollouts
    resume_step: int = -1              # with --resume: go on from step_N (0: from --model); later checkpoints set aside
    resume_data_changed: bool = False  # --resume although --data's contents changed (digest in out/config.json)
    max_steps: int = 0                 # stop (with a checkpoint) after this many steps of this run
    seed: int = 0
    wandb_project: str = ""
    dist_timeout_min: float = 60.0     # how long a rank waits at a collective for ranks still sampling
    check_memory: bool = True          # CUDA: walk the memory plan before step 1; refuse what cannot fit
    plan: bool = False                 # only print the memory plan (needs --model DIR/config.json alone)
    plan_world_size: int = 8           # ranks the plan simulates
    plan_gpu_gib: float = 80.0         # GiB of each simulated GPU; 80 and 141 (GB) mean what those cards report
    plan_alternatives: bool = True     # a plan that does not fit also walks what could (more ranks, H200s, savings)


# ---- one GRPO step, phase by phase (plan_walk walks the same phases on fake tensors) ----

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
        completions, stats = tp.generate_in_group(decoder, prompts, params, ctx, prompt_keys,
                                                  kv_budget_bytes(cfg), cfg.rollout_slots)
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
    """--kv_budget_gib in bytes; None lets tp.kv_budget take what the device has free."""
    return int(cfg.kv_budget_gib * 2**30) if cfg.kv_budget_gib else None


def rank_share(cfg: GRPOConfig, ctx):
    """Positions in the rollout batch that this rank samples and trains on: its slice of every
    mini-batch, so that mini-batch j holds the same prompts whatever the number of ranks."""
    m = cfg.mini_batch_size // ctx.world_size
    return [j * cfg.mini_batch_size + ctx.rank * m + i
            for j in range(cfg.rollout_batch_size // cfg.mini_batch_size) for i in range(m)]


def logprob_passes(model, ref_model, rows, cfg: GRPOConfig, ctx):
    """passes.old_and_ref_logprobs; with --offload_states the reference (which never changes) is
    read from --model for them and freed after."""
    if not cfg.offload_states:
        return old_and_ref_logprobs(model, ref_model, rows, cfg, ctx)
    ref_model = build_reference(cfg, ctx)
    mismatch = old_and_ref_logprobs(model, ref_model, rows, cfg, ctx)
    del ref_model
    gc.collect()  # FSDP2's modules hold reference cycles: free the shards now, not at a later collection
    return mismatch


def place_states(optimizer, where, cfg: GRPOConfig):
    """With --offload_states, AdamW's state (which serves only the updates) waits on the host
    outside them: sent there before the rollout and back before the first update."""
    if cfg.offload_states:
        D.place(optimizer, where)


def grpo_step(model, ref_model, optimizer, tokenizer, records, prompts, step, prompt_keys,
              cfg: GRPOConfig, ctx, score=rlvr_rewards, draw=None, trace_file=None):
    """One rollout batch (this rank's share of prompts, from rank_share): sample (rollout), score
    (score_round), keep the groups that train (kept_groups), pack the mini-batches (assemble),
    the old and reference log-probs (logprob_passes), then one optimizer step per mini-batch
    (train_on). prompt_keys are the prompts' global indices (they key the sampling noise). With
    filter_equal_groups, groups whose rewards are all equal are dropped, and with oversample,
    draw(k) gives (records, prompts) of this rank's share of another batch, sampled (k = 1, 2,
    ...) until the kept groups fill one. Sample traces go to trace_file when given. Returns the
    step's metrics, averaged over ranks."""
    R, share = cfg.rollout_batch_size, rank_share(cfg, ctx)
    t0 = time.time()
    model.eval()
    place_states(optimizer, ctx.host, cfg)
    rounds, kept = [], []
    for resample in range(1 + (cfg.oversample if cfg.filter_equal_groups else 0)):
        if resample:
            records, prompts = draw(resample)
        completions, texts, stats = rollout(model, tokenizer, prompts, step, cfg, ctx, prompt_keys, resample)
        rounds.append(score_round(records, prompts, completions, texts, stats, cfg, score))
        kept += kept_groups(rounds[-1], resample, share, cfg)
        if len(kept) >= R:
            break
    t_gen = time.time()
    minis = assemble(rounds, kept[:R], share, cfg)
    mismatch = logprob_passes(model, ref_model, [r for rows in minis for r in rows], cfg, ctx)
    t_logprobs = time.time()
    updates = train_on(model, optimizer, minis, cfg, ctx)
    t_update = time.time()
    if trace_file is not None:
        write_traces(trace_file, tokenizer, rounds[0], cfg.n_samples)
    m = step_metrics(rounds, updates, cfg)
    m.update(mismatch, lr=optimizer.param_groups[0]["lr"], updates=len(updates),
             kept_groups=min(len(kept), R) / R, time_generate=t_gen - t0, time_logprobs=t_logprobs - t_gen,
             time_update=t_update - t_logprobs, tokens_per_s=m.pop("tokens") / (t_update - t0),
             rollout_tokens_per_s=m.pop("generated") / (t_gen - t0))
    return m


def step_metrics(rounds: list[Round], updates, cfg: GRPOConfig) -> dict:
    """The judge's metrics of the first round and the updates' means, over ranks; the step's
    token counts (all rounds) and the sampler's peaks."""
    first, n = rounds[0], cfg.n_samples
    labels = [first.records[c.prompt_index]["label"] for c in first.completions]
    verdicts = [reward.parse_verdict(t) for t in first.texts]
    m = {k: float(v) for k, v in judge_metrics(first.completions, labels, first.rewards, verdicts, n).items()}
    m = dict(zip(m, D.all_reduce_mean(torch.tensor(list(m.values()))).tolist()))
    if updates:
        m.update({k: float(torch.stack([u[k] for u in updates]).mean()) for k in updates[0]})
    tokens = sum(len(r.prompts[c.prompt_index]) + len(c.token_ids) for r in rounds for c in r.completions)
    generated = sum(len(c.token_ids) for r in rounds for c in r.completions)
    sampler = D.all_reduce_max(torch.tensor([float(max(getattr(r.stats, k) for r in rounds)) for k in
                                             ("peak_sequences", "peak_kv_bytes", "preemptions", "pool_pages")]))
    m.update(tokens=float(D.all_reduce_sum(torch.tensor(float(tokens)))),
             generated=float(D.all_reduce_sum(torch.tensor(float(generated)))), rollout_rounds=len(rounds),
             rollout_peak_sequences=float(sampler[0]), rollout_peak_kv_gib=float(sampler[1]) / 2**30,
             rollout_preemptions=float(sampler[2]), rollout_pool_pages=float(sampler[3]))
    return m


TRACE_GROUPS = 8  # groups of rank 0's share written per logged step


def write_traces(path, tokenizer, rnd: Round, n):
    """The first TRACE_GROUPS groups' judge prompts, traces, verdicts and rewards, one JSON line per
    trace: what the metrics cannot show (a right verdict for a wrong reason, say)."""
    lines = []
    for c, text, r in list(zip(rnd.completions, rnd.texts, rnd.rewards.tolist()))[:TRACE_GROUPS * n]:
        lines.append(json.dumps({"prompt_index": c.prompt_index, "sample": c.sample_index,
                                 "prompt": tokenizer.decode(rnd.prompts[c.prompt_index]),
                                 "label": rnd.records[c.prompt_index]["label"], "trace": text,
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
        budget = tp.kv_budget(kv_budget_bytes(cfg), ctx)
        verdicts = greedy_verdicts(decoder, tokenizer, [prompts[i] for i in mine], cfg.max_response_len,
                                   cfg.rollout_slots, budget) if mine else []
    right = sum(verdict == reward.LETTERS[records[i]["label"]] for i, (_, verdict, _) in zip(mine, verdicts))
    counts = D.all_reduce_sum(torch.tensor([float(right), float(len(mine))]))
    return float(counts[0] / counts[1])


# ---- data and models ----

def load_records(path, cfg: GRPOConfig):
    """RLVR records of --data: a file of them, or of raw preference pairs (data.load_rlvr_or_pairs)."""
    records, identical = data.load_rlvr_or_pairs(path, cfg.seed, cfg.style)
    if identical:
        D.log(f"{path}: {identical} pairs dropped whose chosen and rejected answers are identical")
    return records


def encode_all(tokenizer, records, max_len, what):
    """Prompt ids for every record; prompts over max_len are dropped and counted, not cut."""
    kept, prompts = tokenization.encode_prompts(tokenizer, records, max_len)
    D.log(f"{what}: {len(kept)} prompts, {len(records) - len(kept)} dropped as longer than max_prompt_len={max_len}")
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
        *run.run_rules(cfg), *plan.rules(cfg),
    ])


def build_policy(cfg: GRPOConfig, ctx):
    """The policy (fp32 master weights, sharded) and its AdamW, as train() and the plan build them."""
    model = D.load_model(cfg.model, ctx, bf16=cfg.bf16, activation_checkpointing=cfg.activation_checkpointing)
    return model, D.adamw(model, ctx, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_reference(cfg: GRPOConfig, ctx):
    """The frozen reference policy of the KL term (bf16 on GPUs); None when kl_coef is 0."""
    return D.load_model(cfg.model, ctx, bf16=cfg.bf16, frozen=True) if cfg.kl_coef else None


PLAN_ROWS = 2  # rows the plan walks of each pass that accumulates (why: plan_walk)


def full_rows(cfg: GRPOConfig) -> SamplingParams:
    """The placeholder traces the plan trains on: as long as packs trainer rows full (k traces of
    --micro_batch_tokens / k tokens, the fewest that fill it), or at full length where a prompt
    leaves no room for that. Real traces end early and pack rows full, fuller than full-length ones
    (4,096 + 8,192 tokens: one a row, 12,287 of 16,384)."""
    k = -(-cfg.micro_batch_tokens // (cfg.max_prompt_len + cfg.max_response_len - 1))
    response = cfg.micro_batch_tokens // k + 1 - cfg.max_prompt_len
    return SamplingParams(n=cfg.n_samples, max_new_tokens=response if 1 <= response <= cfg.max_response_len
                          else cfg.max_response_len)


def plan_walk(cfg: GRPOConfig, ctx, memory):
    """grpo_step's phases in its order on fake tensors (plan.py), at the longest prompt and
    response: the rollout of this rank's whole share (rollout.Sampler.walk: its first prefill,
    then every slot decoding at the longest length), every group kept (full mini-batches), and
    the trainer's passes over PLAN_ROWS rows of the first mini-batch, packed full (full_rows):
    from the second row on, the sharded fp32 gradients exist when a backward starts, and every
    later row is as long, so the peak is reached by then."""
    model, optimizer = build_policy(cfg, ctx)
    memory.track(model, optimizer, cfg.micro_batch_tokens)
    share = rank_share(cfg, ctx)
    records, prompts = [{"label": "model_a"}] * len(share), [[0] * cfg.max_prompt_len] * len(share)
    with memory.phase("load: policy shards, AdamW state (then to the host)" if cfg.offload_states else
                    "load: policy shards, bf16 reference, AdamW state",
                    plan.MORE_RANKS + ", or a smaller model" + ("" if cfg.offload_states else ", or --offload_states")):
        ref_model = None if cfg.offload_states else build_reference(cfg, ctx)
        memory.make_optimizer_state(model, optimizer)
        model.eval()
        place_states(optimizer, ctx.host, cfg)
    weights = f"TP weights (1/{cfg.rollout_tp} of every matrix)" if cfg.rollout_tp > 1 else "gathered weights"
    with memory.phase(f"rollout: {weights}, KV pool, prefill, decode at full length",
                    "lower --rollout_slots or --kv_budget_gib, " + ("a larger --rollout_tp" if cfg.rollout_tp > 1 else
                    "--rollout_tp N (the full weights are gathered on every rank)") + ", or " + plan.MORE_RANKS) as phase:
        _, _, stats = rollout(model, memory.tokenizer(model.config), prompts, 0, cfg, ctx, share)
    if phase.error:  # no KV pool: the trainer's phases are still measured
        stats = RolloutStats()
    completions = full_length(len(prompts), full_rows(cfg))
    with memory.on_host():  # scoring and packing hold nothing on the GPU; the first mini-batch is packed
        rnd = score_round(records, prompts, completions, [""] * len(completions), stats, cfg, memory.mixed_rewards)
        minis = assemble([rnd], [(0, p) for p in range(cfg.mini_batch_size)], share, cfg)
    rows = minis[0][:PLAN_ROWS]
    group = len(prompts) * cfg.rollout_tp * cfg.n_samples
    memory.notes += [f"rollout: {len(prompts)} prompts x {cfg.n_samples} samples per rank at {cfg.max_prompt_len:,} + "
                   f"{cfg.max_response_len:,} tokens; {min(cfg.rollout_slots, group)} slots" +
                   (f" per TP group of {cfg.rollout_tp}" if cfg.rollout_tp > 1 else "") +
                   ("" if phase.error else f"; a KV pool of {stats.pool_pages:,} pages of {stats.page_size} "
                    f"({stats.pool_pages * stats.page_bytes / 2**30:.1f} GiB): "
                    f"{stats.pool_pages * stats.page_size // (cfg.max_prompt_len + cfg.max_response_len)} sequences "
                    f"at full length, more as most end early"),
                   f"trainer: {len(minis[0])} rows of {len(rows[0]['ids']):,} tokens ({len(rows[0]['docs'])} traces of "
                   f"{rows[0]['docs'][0]:,}) per mini-batch per rank; {len(rows)} walked (from the second on, "
                   f"gradients exist as a backward starts: the peak)"]
    advice = f"lower --micro_batch_tokens (now {cfg.micro_batch_tokens:,})"
    with memory.phase(f"old + reference log-probs ({len(rows)} of {len(minis[0])} rows)" +
                    (", the reference read for them" if cfg.offload_states else ""), advice):
        logprob_passes(model, ref_model, rows, cfg, ctx)
    with memory.phase(f"update: forward + backward ({len(rows)} of {len(minis[0])} rows), clip, AdamW step" +
                    (", AdamW state back" if cfg.offload_states else ""),
                    advice + ("" if cfg.offload_states else ", --offload_states") + ", or " + plan.MORE_RANKS):
        train_on(model, optimizer, [rows], cfg, ctx)


def train(cfg: GRPOConfig, preset="", records=None, eval_records=None):
    """One GRPO run on --data (or records(), the demo's), scored on --eval_data (or eval_records()).
    With --plan, only the memory plan: returns it. (Nothing built on the process group is
    returned: distributed.shutdown ends the groups once the run's objects are gone.)"""
    if cfg.plan:
        check_config(cfg, cfg.plan_world_size)
        least_row = cfg.max_prompt_len + cfg.max_response_len
        variants = ([("--offload_states", dataclasses.replace(cfg, offload_states=True))] if not cfg.offload_states
                    else []) + ([(f"--micro_batch_tokens {least_row}", dataclasses.replace(cfg, micro_batch_tokens=least_row))]
                                if cfg.micro_batch_tokens > least_row else [])
        # two streams run matrix products: the trainer's, and the decode graphs' (rollout.side_stream)
        return plan.run(plan_walk, cfg, f"memory plan of grpo.py --model {cfg.model}, per rank", tp=cfg.rollout_tp,
                        gemm_streams=2, variants=variants)
    check_config(cfg, D.world_size())
    ctx = D.init(cfg.dist_timeout_min, cfg.rollout_tp)
    # Settings, data and the run directory are checked before any model is loaded.
    tp.check_divisible(load_config(cfg.model), cfg.rollout_tp)
    tokenizer = tokenization.load_tokenizer(cfg.model)
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
    run.start_run(cfg.out, asdict(cfg), cfg.resume, preset)
    if ctx.gpu and cfg.check_memory:
        plan.check_before_training()

    model, optimizer = build_policy(cfg, ctx)
    ref_model = None if cfg.offload_states else build_reference(cfg, ctx)  # offloaded: read per step
    share = rank_share(cfg, ctx)

    def step_fn(step):
        order = data.step_prompts(len(records), step, cfg)
        mine = [order[i] for i in share]
        logged = cfg.log_traces_every and (step + 1) % cfg.log_traces_every == 0 and D.is_main()
        traces = os.path.join(cfg.out, "rollouts", f"step_{step + 1:08d}.jsonl") if logged else None
        m = grpo_step(model, ref_model, optimizer, tokenizer, [records[i] for i in mine],
                      [prompts[i] for i in mine], step, [step * R + i for i in share], cfg, ctx,
                      draw=data.oversampler(records, prompts, step, cfg, share), trace_file=traces)
        if eval_prompts and (cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == total_steps):
            m["eval_accuracy"] = evaluate(model, tokenizer, eval_records, eval_prompts, cfg, ctx)
        return m

    def on_start(start, metrics):  # the starting policy's accuracy, once
        if eval_prompts and start == 0:
            metrics.log(0, {"eval_accuracy": evaluate(model, tokenizer, eval_records, eval_prompts, cfg, ctx)},
                        show=("eval_accuracy",))

    run.run_steps(cfg, model, optimizer, tokenizer, total_steps, step_fn, os.path.join(cfg.out, "hf"),
                show=("reward", "eval_accuracy", "kl", "clip_frac"), on_start=on_start)


def main(argv=None):
    cfg, given = parse_config(GRPOConfig, argv, __doc__)
    # The demo's preset is for a bare `grpo.py`: data of one's own starts from a policy of one's own.
    check_fields(cfg, [("data", not (cfg.data and not cfg.model), "needs --model, the policy to start from (an SFT "
                        "export or a DeepSeek-R1-Distill checkpoint); without --model and --data grpo.py runs the demo")])
    with D.running():
        if cfg.model:
            result = train(cfg)
        else:  # the CPU demo: its preset, its synthetic pairs
            result = demo.recipe.grpo(cfg, given, train)
    if cfg.plan:
        sys.exit(0 if result.fits else 1)


if __name__ == "__main__":
    main()
