"""Stage 2 of RM-R1: GRPO with the +1/-1 verifiable reward. The project's main job.

    torchrun --nproc_per_node=2 grpo.py                     # CPU demo: GRPO on the shipped judge
    torchrun --nproc_per_node=8 grpo.py --model runs/sft7b/hf --data rm_r1_rlvr.jsonl --out runs/grpo7b
    torchrun --nproc_per_node=8 grpo.py --model runs/sft14b/hf --data ... --lr 7e-7 --rollout_tp 2   # 14B
    torchrun --nnodes=4 --nproc_per_node=8 ... grpo.py --model R1-Distill-Qwen-32B --lr 8e-7 --rollout_tp 8  # 32B

For each rollout batch of judge prompts: sample n traces per prompt from the current policy,
score each with reward.rlvr_reward (+1 if the verdict in the last 80 characters matches the
label, else -1), normalize rewards within each prompt's group into advantages, then take
rollout_batch_size / mini_batch_size optimizer steps on the PPO clipped objective plus a k3 KL
penalty to the frozen reference model. The file reads in that order: the settings, the step
(grpo_step, phase by phase), the run around it (train: its loop), and the memory plan's walk of
the same step on fake tensors (plan_walk).

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
(--filter_equal_groups / --oversample, --overlong, --clip_ratio_c, --consistency_reward,
--ratio_level, --rollout_is, --log_traces_every, --keep_last, --export_every, --rollout_tp,
--offload_states); a record may set its own
max_new_tokens. Failing safely: every setting is checked before any data or model is read; a
non-finite loss or gradient norm stops the run before the optimizer step, naming every kept
checkpoint (--resume --resume_step K goes on from any); --resume refuses settings other than
the run's (out/config.json) but those safe to change (run.SAFE_TO_CHANGE).
"""

import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch

import data
import distributed
import lora
import plan
import reward
import run
import tokenization
import tp
from checkpoint import load_config, write_atomic
from cli import check_fields, parse_config
from data import Style
from judge import Judge
from objective import LossConfig, Row
from passes import (Policy, Round, assemble, build_reference, evaluate, kept_groups, logprob_passes, place_states,
                    rollout, score_round, share_of, train_on)
from rewards import InProcessJudge, RemoteJudge, RewardUnavailable, Verifiable, policy_metrics
from scheduler import Prompt


@dataclass
class GRPOConfig(LossConfig, lora.LoRASettings):
    """grpo.py's settings; the objective's own (clip ratios, KL, entropy, loss_agg) are those of
    objective.LossConfig, and LoRA's those of lora.LoRASettings, which it extends."""
    model: str = ""                    # policy to start from (HF dir); empty: the demo SFT judge
    data: str = ""                     # RLVR records or raw preference pairs; empty: demo pairs
    eval_data: str = ""                # held-out RLVR records scored every eval_every steps
    out: str = "runs/grpo"             # checkpoints, metrics.jsonl, hf/ export
    style: Style = "instruct"          # judge prompt style when --data holds raw pairs
    lr: float = 1e-6                   # paper: 1e-6 (7B), constant
    rollout_batch_size: int = 1024     # prompts per rollout batch
    mini_batch_size: int = 128         # prompts per optimizer step (1024/128 = 8 updates)
    micro_batch_tokens: int = 16384    # tokens per packed row in the trainer's forward/backward
    n_samples: int = 7                 # traces per prompt (the group)
    temperature: float = 1.0           # sampling temperature of the rollouts (and of the trainer's log-probs)
    top_p: float = 1.0                 # nucleus sampling of the rollouts; 1: off
    max_prompt_len: int = 4096         # longer prompts are dropped and counted
    max_response_len: int = 8192       # the longest trace; a record may set a lower max_new_tokens of its own
    reward: Literal["verifiable", "judge"] = "verifiable"  # RM-R1's +1/-1 of a judge's verdict (trains a judge), or a trained judge's verdicts on a policy's responses
    consistency_reward: bool = False   # J1: each pair judged in both answer orders in its group (n_samples / 2 traces each); a verdict earns +1 only when its partner in the other order is right too
    judge: str = ""                    # --reward judge: the judge's HF directory, loaded on these ranks (frozen; bf16 on CUDA)
    judge_url: str = ""                # --reward judge: a reward server instead (serve.py, OpenRLHF's protocol)
    judge_method: Literal["round_robin", "knockout", "reference"] = "round_robin"  # how a group's responses are ranked (judge.Judge.rewards)
    judge_tp: int = 1                  # tensor-parallel ranks per judge (its own mesh when not --rollout_tp's)
    judge_style: Style = "instruct"    # the judge's prompt style
    judge_max_new_tokens: int = 8192   # a judgment's length
    judge_max_prompt_len: int = 4096   # longer judge prompts are not judged (no verdict in either order)
    judge_retries: int = 3             # --judge_url: tries after a failed request before the run stops with a checkpoint
    judge_timeout_min: float = 10.0    # --judge_url: how long a request may take (all tries: under --dist_timeout_min)
    filter_equal_groups: bool = False  # DAPO's dynamic sampling: drop groups whose verdicts are all right or all wrong
    oversample: int = 0                # with filter_equal_groups: up to this many more rollout rounds to fill the batch
    overlong: Literal["keep", "mask", "penalty"] = "keep"  # truncated traces: kept, masked out of the loss, or DAPO's soft penalty
    overlong_buffer: int = 1024        # penalty: from a trace's limit - this many tokens, down to -1 at the limit
    norm_adv_by_std: bool = True       # False: Dr. GRPO (no division by the group's std)
    recompute_old_logprobs: bool = True  # False: trust the sampler's log-probs as the old policy's
    grad_clip: float = 1.0             # the global gradient norm's cap
    weight_decay: float = 0.01         # AdamW, as verl's default
    epochs: int = 1                    # passes over the prompts
    bf16: bool = True                  # CUDA: bf16 compute, fp32 master weights and reductions
    activation_checkpointing: bool = True  # recompute each block's activations in backward
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
    seed: int = 0                      # the data order and the sampling noise derive from it
    wandb_project: str = ""            # log to wandb too (pip install wandb)
    dist_timeout_min: float = 60.0     # how long a rank waits at a collective for ranks still sampling
    check_memory: bool = True          # CUDA: walk the memory plan before step 1; refuse what cannot fit
    plan: bool = False                 # only print the memory plan (needs --model DIR/config.json alone)
    plan_world_size: int = 8           # ranks the plan simulates
    plan_gpu_gib: float = 80.0         # GiB of each simulated GPU; 80 and 141 (GB) mean what those cards report
    plan_alternatives: bool = True     # a plan that does not fit also walks what could (more ranks, H200s, savings)


# ---- what a step trains and what it samples from ----

@dataclass
class Prompts:
    """The run's prompt records and their encoded judge prompts: what each step draws from."""
    records: list[dict]
    ids: list[list[int]]
    other_ids: list[list[int]] | None = None  # --consistency_reward: each judge prompt with its answers swapped

    def draw(self, step, resample, share, cfg: "GRPOConfig") -> tuple[list[dict], list[Prompt]]:
        """This rank's share of step's rollout batch (resample 0: data.step_prompts' order; k >= 1:
        --oversample's k-th further batch): its records and Prompts, each keyed by its place in
        the rollout batch (the sampling noise; the same whatever the number of ranks) and with the
        record's own settings (scheduler.Prompt.of). With --consistency_reward a group is two
        prompts, the record and then its answers swapped (its label flipped), keyed 2k and 2k + 1."""
        order = data.step_prompts(len(self.ids), step, cfg) if resample == 0 else \
            data.oversample_prompts(len(self.ids), step, resample, cfg)
        drawn = [(order[i], step * cfg.rollout_batch_size + i) for i in share]
        if self.other_ids is None:
            return [self.records[k] for k, _ in drawn], [Prompt.of(self.ids[k], key, self.records[k]) for k, key in drawn]
        records, prompts = [], []
        for k, key in drawn:
            swapped = self.records[k] | {"label": reward.label(self.records[k]["label"] != "model_a")}
            records += [self.records[k], swapped]
            prompts += [Prompt.of(self.ids[k], 2 * key, self.records[k]), Prompt.of(self.other_ids[k], 2 * key + 1, swapped)]
        return records, prompts


# ---- one GRPO step, phase by phase (the memory plan walks this same function) ----

PLAN_ROWS = 2  # rows the memory plan walks of each pass that accumulates (why: grpo_step)


@dataclass
class StepResult:
    metrics: dict                 # averaged over ranks; empty under the memory plan (fake tensors hold no values)
    rounds: list[Round]           # the rollout rounds (more than one with --oversample)
    minis: list[list[Row]]        # this rank's packed rows of each mini-batch


def grpo_step(policy: Policy, prompts: Prompts, step, cfg: GRPOConfig, ctx, score=Verifiable(),
              phases=None) -> StepResult:
    """One rollout batch, this rank's share of it: roll out n traces per prompt (rollout), score
    them (score_round: `score`, a reward of rewards.py, the paper's +1/-1 by default; a judge's
    is a device phase of its own), keep the groups that train
    (kept_groups: all, or with --filter_equal_groups those whose verdicts differ, drawing more
    rounds with --oversample until they fill a batch), pack each mini-batch's traces into rows with
    their group advantages (assemble), the old and reference log-probs (logprob_passes), then one
    optimizer step per mini-batch (train_on). `phases` (run.Timings in training, plan.Plan in the
    memory plan) sees each device phase: the plan measures its memory, the run its time."""
    phases, start = phases or run.Timings(), time.time()
    share = share_of(cfg, ctx.rank, ctx.world_size)
    policy.model.eval()
    place_states(policy.optimizer, ctx.host, cfg)
    rounds, kept = [], []
    for resample in range(1 + (cfg.oversample if cfg.filter_equal_groups else 0)):
        records, batch = prompts.draw(step, resample, share, cfg)
        completions, texts, stats = rollout(policy, batch, step, cfg, ctx, phases, resample)
        judging = getattr(score, "phase", None)  # (name, advice) of a reward computed on the device
        with phases.phase("judge", *judging) if judging else contextlib.nullcontext():
            rewards = score(completions, texts, records)
        rounds.append(score_round(records, batch, completions, texts, stats, cfg, rewards))
        kept += kept_groups(rounds[-1], resample, share, cfg, ctx)
        if len(kept) >= cfg.rollout_batch_size:
            break
    minis = assemble(rounds, kept[:cfg.rollout_batch_size], share, cfg)
    # The memory plan walks the first PLAN_ROWS rows of the first mini-batch: from the second row on,
    # the sharded fp32 gradients exist when a backward starts, and every later row is as long, so
    # the peak is reached by then.
    trained = [minis[0][:PLAN_ROWS]] if ctx.simulated else minis
    rows, per_mini = [row for mini in trained for row in mini], len(minis[0]) if minis else 0
    advice = f"lower --micro_batch_tokens (now {cfg.micro_batch_tokens:,})"
    with phases.phase("logprobs", f"old + reference log-probs ({len(rows)} of {per_mini} rows)" +
                      (", the reference read for them" if cfg.offload_states else
                       ", the reference: adapters off" if cfg.lora_rank and cfg.kl_coef else ""), advice):
        mismatch = logprob_passes(policy, rows, cfg, ctx)
    with phases.phase("update", f"update: forward + backward ({len(rows)} of {per_mini} rows), clip, AdamW step" +
                      (", AdamW state back" if cfg.offload_states else ""),
                      advice + ("" if cfg.offload_states else ", --offload_states") + ", or " + plan.MORE_RANKS):
        updates = train_on(policy.model, policy.optimizer, trained, cfg, ctx)
    if ctx.simulated:
        return StepResult({}, rounds, minis)
    metrics = step_metrics(rounds, updates, score, cfg) | mismatch | phases.metrics()
    metrics.update(lr=policy.optimizer.param_groups[0]["lr"], updates=len(updates),
                   kept_groups=min(len(kept), cfg.rollout_batch_size) / cfg.rollout_batch_size,
                   tokens_per_s=metrics.pop("tokens") / (time.time() - start),
                   rollout_tokens_per_s=metrics.pop("generated") / phases.seconds["generate"])
    return StepResult(metrics, rounds, minis)


def step_metrics(rounds: list[Round], updates, score, cfg: GRPOConfig) -> dict:
    """The reward's metrics of the first round (score.metrics: a judge-in-training's verdicts, or
    a policy's rewards and its judge's make-up; rewards.policy_metrics for a plain function) and
    the updates' means, over ranks; the step's token counts (all rounds) and the sampler's peaks."""
    first = rounds[0]
    own = getattr(score, "metrics", None)
    judged = own(first, cfg.n_samples) if own else policy_metrics(first, cfg.n_samples)
    metrics = dict(zip(judged, distributed.all_reduce_mean(torch.tensor(list(judged.values()))).tolist()))
    if updates:
        metrics.update({k: float(torch.stack([u[k] for u in updates]).mean()) for k in updates[0]})
    tokens = sum(len(r.prompts[c.prompt_index].ids) + len(c.token_ids) for r in rounds for c in r.completions)
    generated = sum(len(c.token_ids) for r in rounds for c in r.completions)
    sampler = distributed.all_reduce_max(torch.tensor([float(max(getattr(r.stats, k) for r in rounds)) for k in
                                                       ("peak_sequences", "peak_kv_bytes", "preemptions", "pool_pages")]))
    metrics.update(tokens=float(distributed.all_reduce_sum(torch.tensor(float(tokens)))),
                   generated=float(distributed.all_reduce_sum(torch.tensor(float(generated)))),
                   rollout_rounds=len(rounds), rollout_peak_sequences=float(sampler[0]),
                   rollout_peak_kv_gib=float(sampler[1]) / 2**30, rollout_preemptions=float(sampler[2]),
                   rollout_pool_pages=float(sampler[3]))
    return metrics


# ---- the run: data, models, the step loop ----

def train(cfg: GRPOConfig, preset="", records=None, eval_records=None, score=None):
    """One GRPO run on --data (or records(), the demo's), scored on --eval_data (or eval_records()).
    The reward is --reward's (build_reward), or `score` when given (a reward of rewards.py's
    kind: the demo's program truth, say). With --plan, only the memory plan: returns it.
    (Nothing built on the process group is returned: distributed.shutdown ends the groups once
    the run's objects are gone.)"""
    if cfg.plan:
        return memory_plan(cfg)
    check_config(cfg, distributed.world_size())
    ctx = distributed.init(cfg.dist_timeout_min, cfg.rollout_tp)
    # Settings, data and the run directory are checked before any model is loaded.
    tp.check_divisible(load_config(cfg.model), cfg.rollout_tp)
    if cfg.judge:
        tp.check_divisible(load_config(cfg.judge), cfg.judge_tp)
        tokenization.load_tokenizer(cfg.judge)  # a judge directory holds its tokenizer: said now, not after the rollout
    tokenizer = tokenization.load_tokenizer(cfg.model)
    prompts = encode(tokenizer, load_records(cfg.data, cfg, cfg.consistency_reward) if records is None else records(),
                     cfg, "train")
    held_out = eval_records() if eval_records else load_records(cfg.eval_data, cfg) if cfg.eval_data else []
    held_out = encode(tokenizer, held_out[:cfg.eval_limit], cfg, "eval")
    total_steps = steps_of(prompts, cfg)
    run.start_run(cfg.out, asdict(cfg), cfg.resume, preset)
    if ctx.gpu and cfg.check_memory:
        plan.check_before_training()

    policy = build_policy(cfg, ctx, tokenizer)
    policy.ref_model = None if cfg.offload_states else build_reference(cfg, ctx)  # offloaded: read per step
    score = score or build_reward(cfg, ctx, tokenizer)
    export = os.path.join(cfg.out, "hf")
    start = run.resume(cfg, policy.model, policy.optimizer)
    metrics = run.MetricsLogger(cfg.out, total_steps, asdict(cfg), cfg.wandb_project, start)
    shown = ("reward", "eval_accuracy", "kl", "clip_frac")
    if held_out.ids and start == 0:  # the starting policy's accuracy, once
        metrics.log(0, {"eval_accuracy": evaluate(policy, held_out, cfg, ctx)}, show=shown)
    stop = run.last_step(cfg, start, total_steps)
    for step in range(start, stop):
        try:
            with run.stop_on_non_finite(step + 1, cfg.out):
                result = grpo_step(policy, prompts, step, cfg, ctx, score)
        except RewardUnavailable as e:  # no step on made-up rewards: stop where the run is, resumable
            metrics.close()
            run.save_state(cfg.out, step, policy.model, policy.optimizer, {}, cfg.keep_last)
            raise SystemExit(f"step {step + 1}: {e}; stopped with the checkpoint of step {step}: start the reward "
                             f"server again (or check --judge_url) and go on with --resume") from None
        if run.due(cfg.log_traces_every, step + 1) and distributed.is_main():
            write_traces(os.path.join(cfg.out, "rollouts", f"step_{step + 1:08d}.jsonl"), policy.tokenizer,
                         result.rounds[0], cfg.n_samples)
        if held_out.ids and (run.due(cfg.eval_every, step + 1) or step + 1 == total_steps):
            result.metrics["eval_accuracy"] = evaluate(policy, held_out, cfg, ctx)
        metrics.log(step + 1, result.metrics, show=shown)
        if run.due(cfg.save_every, step + 1) and step + 1 < stop:
            run.save_state(cfg.out, step + 1, policy.model, policy.optimizer, {}, cfg.keep_last)
        if run.due(cfg.export_every, step + 1) and step + 1 < total_steps:
            distributed.save_hf(policy.model, policy.tokenizer, os.path.join(export, f"step_{step + 1:08d}"), cfg.model)
    metrics.close()
    run.finish(cfg, stop, total_steps, policy.model, policy.optimizer, policy.tokenizer, export)


def build_reward(cfg: GRPOConfig, ctx, tokenizer):
    """--reward's source (rewards.py): RM-R1's verifiable +1/-1; a judge loaded on these ranks
    (its own TP mesh under a --judge_tp other than --rollout_tp's); or a reward server."""
    if cfg.reward == "verifiable":
        return Verifiable(both_orders=cfg.consistency_reward)
    if cfg.judge_url:
        return RemoteJudge(cfg.judge_url, tokenizer, cfg)
    judge_ctx = ctx if cfg.judge_tp == cfg.rollout_tp else dataclasses.replace(
        ctx, decode_mesh=distributed.make_decode_mesh(ctx.device.type, ctx.world_size, cfg.judge_tp))
    judge = Judge.load(cfg.judge, judge_ctx, style=cfg.judge_style, max_new_tokens=cfg.judge_max_new_tokens,
                       max_prompt_len=cfg.judge_max_prompt_len, batch_size=cfg.rollout_slots, gather=True)
    return InProcessJudge(judge, cfg)


def load_records(path, cfg: GRPOConfig, both_orders=False):
    """--data's records: a policy's prompt records with --reward judge (data.load_prompts); else RLVR
    records, from a file of them or of raw preference pairs (data.load_rlvr_or_pairs), with their
    other answer order when both_orders (--consistency_reward's training records)."""
    if cfg.reward == "judge":
        return data.load_prompts(path, need_reference=cfg.judge_method == "reference")
    records, identical = data.load_rlvr_or_pairs(path, cfg.seed, cfg.style, both_orders)
    if identical:
        distributed.log(f"{path}: {identical} pairs dropped whose chosen and rejected answers are identical")
    return records


def encode(tokenizer, records, cfg: GRPOConfig, what) -> Prompts:
    """Every record's judge prompt as token ids; prompts over --max_prompt_len are dropped and
    counted, not cut; a record's own max_new_tokens may not exceed --max_response_len (what the
    memory plan sizes every trace for). With --consistency_reward the training prompts are
    encoded in both answer orders (a record loaded without its other order, the demo's, gets it
    from data.other_order), and a record is dropped when either is too long."""
    kept, ids = tokenization.encode_prompts(tokenizer, records, cfg.max_prompt_len)
    other_ids = None
    if cfg.consistency_reward and what == "train":
        others = [tokenization.encode_prompt(tokenizer, r["other_order"] if "other_order" in r else
                                             data.other_order(r["context_messages"], f"{what} record {i}"),
                                             cfg.max_prompt_len) for i, r in enumerate(kept)]
        both = [i for i, other in enumerate(others) if other is not None]
        kept, ids, other_ids = [kept[i] for i in both], [ids[i] for i in both], [others[i] for i in both]
    distributed.log(f"{what}: {len(kept)} prompts, {len(records) - len(kept)} dropped as longer than "
                    f"max_prompt_len={cfg.max_prompt_len}")
    over = [i for i, r in enumerate(kept) if r.get("max_new_tokens", 0) > cfg.max_response_len]
    if over:
        raise ValueError(f"{what}: {len(over)} records set max_new_tokens above --max_response_len "
                         f"{cfg.max_response_len} (the first: {kept[over[0]]['max_new_tokens']}, record {over[0]}); "
                         f"raise --max_response_len, which the memory plan sizes every trace for")
    return Prompts(kept, ids, other_ids)


def steps_of(prompts: Prompts, cfg: GRPOConfig) -> int:
    """The run's rollout steps; a packed row must hold the longest prompt and its response."""
    need = max(map(len, prompts.ids + (prompts.other_ids or [])), default=0) + cfg.max_response_len
    if cfg.micro_batch_tokens < need:  # a longer sequence would get a row of its own, past what the plan sized
        raise ValueError(f"--micro_batch_tokens {cfg.micro_batch_tokens}: a packed row must hold one prompt and "
                         f"its response, the longest prompt ({need - cfg.max_response_len} tokens) + "
                         f"--max_response_len ({cfg.max_response_len}): raise it to at least {need}")
    total_steps, unused = divmod(len(prompts.ids) * cfg.epochs, cfg.rollout_batch_size)
    if total_steps == 0:
        raise ValueError(f"{len(prompts.ids)} prompts x {cfg.epochs} epochs do not fill one rollout batch "
                         f"(--rollout_batch_size {cfg.rollout_batch_size})")
    if unused:
        distributed.log(f"{total_steps} rollout steps of {cfg.rollout_batch_size} prompts; each epoch's leftovers "
                        f"open the next epoch, and the last {unused} prompts of epoch {cfg.epochs} are not used")
    return total_steps


TRACE_GROUPS = 8  # groups of rank 0's share written per logged step


def write_traces(path, tokenizer, first: Round, n):
    """The first TRACE_GROUPS groups' prompts, traces and rewards (with a judge-in-training's label
    and verdict), one JSON line per trace: what the metrics cannot show (a right verdict for a
    wrong reason, a policy's response the judge rewarded, say)."""
    lines = []
    for c, text, r in list(zip(first.completions, first.texts, first.rewards.tolist()))[:TRACE_GROUPS * n]:
        record = first.records[c.prompt_index]
        verdict = {"label": record["label"], "verdict": reward.parse_verdict(text)} if "label" in record else {}
        lines.append(json.dumps({"prompt_index": c.prompt_index, "sample": c.sample_index,
                                 "prompt": tokenizer.decode(first.prompts[c.prompt_index].ids), **verdict,
                                 "trace": text, "reward": r, "finish_reason": c.finish_reason,
                                 "tokens": len(c.token_ids)}))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, "".join(line + "\n" for line in lines))


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
        ("n_samples", not cfg.consistency_reward or cfg.n_samples % 2 == 0 and cfg.n_samples >= 4, "must be even and "
         ">= 4 with --consistency_reward: half the group in each answer order, two pairs at least (one pair's traces "
         "share one reward, so its group would teach nothing)"),
        ("consistency_reward", not cfg.consistency_reward or cfg.reward == "verifiable", "rewards a judge's verdicts "
         "on RLVR pairs in both answer orders: it needs --reward verifiable"),
        ("temperature", cfg.temperature > 0, "must be > 0: the rollouts are sampled"),
        ("top_p", 0 < cfg.top_p <= 1, "must be in (0, 1]"),
        ("lr", cfg.lr > 0, "must be > 0"),
        ("clip_ratio_low", 0 <= cfg.clip_ratio_low < 1, "must be in [0, 1)"),
        ("clip_ratio_high", cfg.clip_ratio_high >= 0, "must be >= 0"),
        ("clip_ratio_c", cfg.clip_ratio_c == 0 or cfg.clip_ratio_c > 1, "must be > 1 (verl uses 3), or 0 for off"),
        ("rollout_is", cfg.rollout_is == "off" or cfg.recompute_old_logprobs, "weighs the trainer's old log-probs "
         "against the sampler's: it needs --recompute_old_logprobs (with the sampler's as the old, every weight is 1)"),
        ("rollout_is_cap", cfg.rollout_is_cap >= 1, "must be >= 1 (verl's default: 2)"),
        ("rollout_is_floor", 0 <= cfg.rollout_is_floor <= 1, "must be in [0, 1] (IcePop: 0.5)"),
        ("oversample", cfg.oversample >= 0, "must be >= 0"),
        ("oversample", not cfg.oversample or cfg.filter_equal_groups, "needs --filter_equal_groups"),
        ("overlong_buffer", cfg.overlong != "penalty" or 1 <= cfg.overlong_buffer <= cfg.max_response_len,
         f"must be in [1, --max_response_len ({cfg.max_response_len})] for --overlong penalty"),
        ("log_traces_every", cfg.log_traces_every >= 0, "must be >= 0 (0: never)"),
        ("kl_coef", cfg.kl_coef >= 0, "must be >= 0 (0 drops the KL term and the reference model)"),
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
        ("reward", cfg.reward == "verifiable" or bool(cfg.judge) != bool(cfg.judge_url),
         "judge needs the judge: --judge DIR (on these ranks) or --judge_url URL (a reward server), one of them"),
        ("judge", not cfg.judge and not cfg.judge_url or cfg.reward == "judge",
         "is the reward of --reward judge: add it, or drop --judge / --judge_url"),
        ("eval_data", cfg.reward == "verifiable" or not cfg.eval_data, "scores a judge's verdicts; a policy trained "
         "with --reward judge is measured by what knows its right answers (the demo's program: demo/loop.py)"),
        ("judge_tp", cfg.judge_tp >= 1 and world_size % cfg.judge_tp == 0, f"must be >= 1 and divide the {world_size} ranks"),
        ("judge_retries", cfg.judge_retries >= 0 and (cfg.judge_retries + 1) * cfg.judge_timeout_min
         + 2 ** cfg.judge_retries / 60 < cfg.dist_timeout_min, "must be >= 0, and its tries of --judge_timeout_min "
         "each end before --dist_timeout_min (other ranks wait that long for this one's rewards)"),
        ("judge_tp", not cfg.judge_url or cfg.judge_tp == 1, "is the in-process judge's: the server has its own"),
        *[(name, getattr(cfg, name) >= 1, "must be >= 1") for name in ("judge_max_new_tokens", "judge_max_prompt_len")],
        ("judge_timeout_min", cfg.judge_timeout_min > 0, "must be > 0"),
        ("lora_rank", not cfg.lora_rank or not cfg.offload_states, "does not combine with --offload_states, which "
         "moves AdamW's state and the reference model off the GPU: with LoRA the state is the adapters' (small) and "
         "the reference is the policy with its adapters off"),
        *lora.rules(cfg), *run.run_rules(cfg), *plan.rules(cfg),
    ])


def build_policy(cfg: GRPOConfig, ctx, tokenizer) -> Policy:
    """The policy (fp32 master weights, sharded) and its AdamW, as train() and the memory plan
    build them; the reference is theirs to add (build_reference)."""
    model = distributed.load_model(cfg.model, ctx, bf16=cfg.bf16, activation_checkpointing=cfg.activation_checkpointing,
                                   seed=cfg.seed, adapters=lora.of(cfg))
    return Policy(model, distributed.adamw(model, ctx, lr=cfg.lr, weight_decay=cfg.weight_decay), tokenizer,
                  ref_model=None)


# ---- the memory plan: the same step on fake tensors ----

def plan_walk(cfg: GRPOConfig, ctx, memory: plan.Plan):
    """grpo_step itself on fake tensors (plan.py), at the longest prompt and response: the policy
    and what is resident from the second step on (the reference, AdamW's state) built first, then
    the step with this plan as its `phases`: the rollout of this rank's whole share (its first
    prefill, then every slot decoding at the longest length), every group kept (memory.mixed_rewards:
    full mini-batches), and the trainer's passes over PLAN_ROWS rows of the first mini-batch,
    packed full (full_rows)."""
    with memory.fake:
        policy = build_policy(cfg, ctx, plan.PlaceholderTokenizer(load_config(cfg.model).vocab_size - 1))
    memory.track(policy.model, policy.optimizer, cfg.micro_batch_tokens)
    judge = cfg.reward == "judge" and cfg.judge  # in process: its weights are resident, its phase walked
    with memory.phase("load", ("load: policy shards, AdamW state (then to the host)" if cfg.offload_states else
                               "load: frozen bf16 base, LoRA adapters, their AdamW state" if cfg.lora_rank else
                               "load: policy shards, bf16 reference, AdamW state") + (", the judge" if judge else ""),
                      plan.MORE_RANKS + ", or a smaller model" + ("" if cfg.offload_states else ", or --offload_states")
                      + (", --judge_tp, or --judge_url" if judge else "")):
        policy.ref_model = None if cfg.offload_states else build_reference(cfg, ctx)
        memory.make_optimizer_state(policy.model, policy.optimizer)
        place_states(policy.optimizer, ctx.host, cfg)
        reward = build_reward(cfg, ctx, policy.tokenizer) if judge else memory.mixed_rewards
    share = len(share_of(cfg, ctx.rank, ctx.world_size))
    placeholders = [[0] * cfg.max_prompt_len] * cfg.rollout_batch_size
    prompts = Prompts([{"label": "model_a"}] * cfg.rollout_batch_size, placeholders,
                      placeholders if cfg.consistency_reward else None)
    result = grpo_step(policy, prompts, 0, cfg, ctx, score=memory.walking(reward), phases=memory)
    stats, mini, walked = result.rounds[0].stats, result.minis[0], result.minis[0][:PLAN_ROWS]
    rollout_phase = next(p for p in memory.phases if p.name.startswith("rollout"))
    group = share * cfg.rollout_tp * cfg.n_samples
    memory.notes += [f"rollout: {share} prompts x {cfg.n_samples} samples per rank at {cfg.max_prompt_len:,} + "
                     f"{cfg.max_response_len:,} tokens; {min(cfg.rollout_slots, group)} slots" +
                     (f" per TP group of {cfg.rollout_tp}" if cfg.rollout_tp > 1 else "") +
                     ("" if rollout_phase.error else f"; a KV pool of {stats.pool_pages:,} pages of {stats.page_size} "
                      f"({stats.pool_pages * stats.page_bytes / 2**30:.1f} GiB): "
                      f"{stats.pool_pages * stats.page_size // (cfg.max_prompt_len + cfg.max_response_len)} sequences "
                      f"at full length, more as most end early"),
                     f"trainer: {len(mini)} rows of {len(walked[0].ids):,} tokens ({len(walked[0].doc_lens)} traces of "
                     f"{walked[0].doc_lens[0]:,}) per mini-batch per rank; {len(walked)} walked (from the second on, "
                     f"gradients exist as a backward starts: the peak)"]


def memory_plan(cfg: GRPOConfig) -> plan.Plan:
    """--plan: the step walked at --plan_world_size ranks, and what would fit instead."""
    check_config(cfg, cfg.plan_world_size)
    least_row = cfg.max_prompt_len + cfg.max_response_len
    variants = ([("--offload_states", dataclasses.replace(cfg, offload_states=True))] if not cfg.offload_states
                else []) + ([(f"--micro_batch_tokens {least_row}", dataclasses.replace(cfg, micro_batch_tokens=least_row))]
                            if cfg.micro_batch_tokens > least_row else [])
    # two streams run matrix products: the trainer's, and the decode graphs' (rollout.side_stream)
    judge_mesh = cfg.reward == "judge" and bool(cfg.judge) and cfg.judge_tp not in (1, cfg.rollout_tp)
    return plan.run(plan_walk, cfg, f"memory plan of grpo.py --model {cfg.model}, per rank", tp=cfg.rollout_tp,
                    gemm_streams=2, variants=variants, extra_meshes=int(judge_mesh))


def main(argv=None):
    cfg, given = parse_config(GRPOConfig, argv, __doc__)
    # The demo's preset is for a bare `grpo.py`: data of one's own starts from a policy of one's own.
    check_fields(cfg, [("data", not (cfg.data and not cfg.model), "needs --model, the policy to start from (an SFT "
                        "export or a DeepSeek-R1-Distill checkpoint); without --model and --data grpo.py runs the demo")])
    with distributed.running():
        if cfg.model:
            result = train(cfg)
        else:  # the CPU demo: its preset, its synthetic pairs
            import demo.recipe  # the demo (and its tokenizer's transformers) only when it runs
            result = demo.recipe.grpo(cfg, given, train)
    if cfg.plan:
        sys.exit(0 if result.fits else 1)


if __name__ == "__main__":
    main()
