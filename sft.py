"""Stage 1 of RM-R1: distillation. Fine-tune a judge on reasoning traces, loss on the trace only.

    python sft.py                                  # CPU demo (demo/recipe.py): rebuilds demo/sft
    torchrun --nproc_per_node=8 sft.py --model Qwen2.5-7B-Instruct --data rm_r1_sft.jsonl --out runs/sft7b

Data: RM-R1 distillation records ({"context_messages": [system, user], "winner": trace}), any
JSON/JSONL/Parquet. Each step takes `batch_size` sequences in a seeded order, packs them into
rows of at most `max_len` tokens (documents never attend to each other), spreads the rows over
the ranks, and takes one optimizer step on the token-mean loss over every trace token of the
step, whatever the number of ranks. Output: `out/hf` or `--export` (a Hugging Face model
directory with the tokenizer; the demo exports to demo/sft) and resumable checkpoints in `out/`
(`--resume`, `--max_steps`).

Departures from the paper: none in the objective. The CPU demo (neither --model nor --data)
trains a ~1M-parameter Qwen2-architecture judge from scratch instead of fine-tuning an LLM; its
preset and recipe live in demo/recipe.py, which hands train() a Scratch: the tokenizer and
config to build the model from, and copying steps to take before distillation.
"""

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

import data
import demo.recipe
import distributed as D
import plan
from cli import check_fields, parse_config
from checkpoint import load_config
from model import ModelConfig, document_lengths
from plan import MORE_RANKS


@dataclass
class SFTConfig:
    model: str = ""                  # HF model directory; empty: the demo judge from scratch
    data: str = ""                   # distillation records; empty: synthetic demo traces
    out: str = "runs/sft"            # checkpoints and metrics.jsonl
    export: str = ""                 # Hugging Face export directory; empty: out/hf
    lr: float = 5e-6                 # paper: 5e-6
    schedule: str = "constant"       # constant | cosine (to 0 over the run), after warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 128            # sequences per optimizer step, over all ranks (paper: 128)
    max_len: int = 12288             # tokens per packed row and per sequence (paper: 12288)
    epochs: int = 1
    grad_clip: float = 1.0
    bf16: bool = True                # bf16 compute with fp32 master weights (CUDA only)
    activation_checkpointing: bool = True
    save_every: int = 0              # steps between resumable checkpoints; 0: only at the end
    keep_last: int = 0               # keep only the newest K step_N checkpoints; 0: keep all
    export_every: int = 0            # also export HF weights to EXPORT/step_N every N steps; 0: only at the end
    resume: bool = False             # continue from out/latest
    resume_data_changed: bool = False # --resume although --data's contents changed (digest in out/config.json)
    max_steps: int = 0               # stop (with a checkpoint) after this many steps of this run; 0: no limit
    seed: int = 0
    wandb_project: str = ""          # log to wandb too (pip install wandb)
    dist_timeout_min: float = 60.0   # how long a rank waits at a collective
    check_memory: bool = True        # CUDA: walk the memory plan before step 1, refuse a run that cannot fit
    plan: bool = False               # only print the memory plan (needs --model DIR/config.json alone)
    plan_world_size: int = 8         # ranks the plan simulates
    plan_gpu_gib: float = 80.0       # GiB of each simulated GPU; 80 and 141 (GB) mean what those cards report
    plan_alternatives: bool = True   # a plan that does not fit also walks what could (more ranks, H200s)


@dataclass
class Scratch:
    """A model trained from scratch rather than from --model (the CPU demo's judge; demo/recipe.py
    makes one): the tokenizer, built under the run's directory, the model's config, and
    prelude_steps optimizer steps on prelude_rows(step, vocab_size) (packed rows) before the
    distillation data, with a learning-rate phase of their own (lr_lambda)."""
    tokenizer: Callable            # out dir -> a tokenizer saved there
    config: Callable               # tokenizer -> ModelConfig
    prelude_steps: int = 0
    prelude_rows: Callable | None = None


def load_examples(cfg: SFTConfig, tokenizer, records=None):
    """Tokenized (input_ids, loss_mask) pairs of --data, or of records() when given (the demo's);
    sequences over max_len are dropped and counted."""
    records = data.load_sft(cfg.data) if records is None else records()
    examples, dropped = [], 0
    for r in records:
        enc = data.encode_sft(tokenizer, r["context_messages"], r["trace"], cfg.max_len)
        if enc is None:
            dropped += 1
        else:
            examples.append(enc)
    D.log(f"{len(examples)} sequences, {dropped} dropped as longer than max_len={cfg.max_len}")
    if not examples:
        raise ValueError("no training sequence fits max_len")
    return examples


def step_rows(examples, step, cfg: SFTConfig, steps_per_epoch, vocab_size, scratch: Scratch | None = None):
    """The packed rows of optimizer step `step`: a pure function of (seed, step), so a resumed
    run sees exactly the data an uninterrupted one would. A Scratch's prelude steps come first."""
    prelude = scratch.prelude_steps if scratch else 0
    if step < prelude:
        return scratch.prelude_rows(step, vocab_size)
    epoch, k = divmod(step - prelude, steps_per_epoch)
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(examples))
    batch = [examples[i] for i in order[k * cfg.batch_size:(k + 1) * cfg.batch_size]]
    return data.pack(batch, cfg.max_len)


def sft_loss(model, row, n_tokens, device):
    """Summed negative log-likelihood of the row's trace tokens / the step's trace-token count.

    The division by the global count (not per micro-batch or per rank) makes the step's loss one
    token mean, whatever the split (FSDP sums the ranks' gradients: distributed.shard).
    Returns (loss to backpropagate, summed NLL for logging).
    """
    batch = data.collate([row], pad_id=0)
    ids = batch["input_ids"].to(device)
    mask = batch["loss_mask"][:, 1:].to(device).float()  # position t predicts token t + 1
    logprobs, _ = model(ids[:, :-1], position_ids=batch["position_ids"][:, :-1].to(device),
                        doc_lens=document_lengths([row["position_ids"][:-1]]), targets=ids[:, 1:])
    nll = -(logprobs * mask).sum()
    return nll / n_tokens, nll.detach()


def lr_lambda(cfg: SFTConfig, total_steps, prelude_steps=0):
    """Warmup, then constant or cosine to 0 at total_steps. A Scratch's prelude steps (the demo's
    copying) are a phase of their own (warmup, then constant), and distillation starts its
    schedule afresh: decayed by the copying steps, the rate left for distillation teaches a judge
    far less."""
    def phase(step, length, schedule):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, length - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    def f(step):
        if step < prelude_steps:
            return phase(step, prelude_steps, "constant")
        return phase(step - prelude_steps, total_steps - prelude_steps, cfg.schedule)
    return f


def build(cfg: SFTConfig, ctx, config: ModelConfig | None = None):
    """The model and its AdamW, as train() and the memory plan build them: --model's weights, or
    fresh ones of `config` (a Scratch's)."""
    if config is None:
        model = D.load_model(cfg.model, ctx, bf16=cfg.bf16, activation_checkpointing=cfg.activation_checkpointing)
    else:
        model = D.load_model(None, ctx, config=config, seed=cfg.seed,
                             activation_checkpointing=cfg.activation_checkpointing)
    return model, D.adamw(model, ctx, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))


def sft_step(model, optimizer, rows, n_tokens, cfg: SFTConfig, ctx):
    """One optimizer step on this rank's packed rows: each row's forward and backward (gradients
    accumulate; FSDP sums them over ranks), then clip and AdamW. n_tokens is the step's trace-token
    count over all ranks. Returns the summed NLL over ranks and the gradient norm."""
    nll_sum = torch.zeros((), device=ctx.device)
    for row in D.pad_to_ranks(rows, EMPTY_ROW):
        loss, nll = sft_loss(model, row, n_tokens, ctx.device)
        loss.backward()
        nll_sum += nll
    nll_total = D.all_reduce_sum(nll_sum)
    return nll_total, D.clip_and_step(model, optimizer, cfg.grad_clip, ctx, loss=nll_total)


# What a rank short of rows runs (distributed.pad_to_ranks): 2 tokens that carry no loss.
EMPTY_ROW = {"input_ids": [0, 0], "loss_mask": [0, 0], "position_ids": [0, 1]}
PLAN_ROWS = 2  # rows of a step the plan walks (why: plan_walk)


def plan_walk(cfg: SFTConfig, ctx, plan):
    """sft_step on fake tensors (plan.py) over PLAN_ROWS packed rows of max_len tokens: from the
    second row on, the sharded fp32 gradients exist when a backward starts, and every later row
    is alike, so the peak is reached by then."""
    model, optimizer = build(cfg, ctx)
    plan.track(model, optimizer, cfg.max_len)
    per_rank = math.ceil(cfg.batch_size / ctx.world_size)
    rows = data.pack([([0] * cfg.max_len, [1] * cfg.max_len)] * min(PLAN_ROWS, per_rank), cfg.max_len)
    plan.notes += [f"a step: {cfg.batch_size} sequences, at most {per_rank} packed rows of <= {cfg.max_len:,} tokens "
                   f"per rank; {len(rows)} walked (from the second on, gradients exist as a backward starts: the peak)"]
    with plan.phase("load: shards, AdamW state", MORE_RANKS + ", or a smaller model"):
        plan.make_optimizer_state(model, optimizer)
    model.train()
    with plan.phase(f"step: forward + backward ({len(rows)} of {per_rank} rows of {cfg.max_len:,} tokens), clip, "
                    f"AdamW step", "lower --max_len, or " + MORE_RANKS):
        sft_step(model, optimizer, rows, cfg.max_len * len(rows), cfg, ctx)


def check_config(cfg: SFTConfig):
    """Every setting, before any data or model is read; an error names the flag."""
    check_fields(cfg, [
        ("schedule", cfg.schedule in ("constant", "cosine"), "must be constant or cosine"),
        ("lr", cfg.lr > 0, "must be > 0"),
        ("warmup_steps", cfg.warmup_steps >= 0, "must be >= 0"),
        ("weight_decay", cfg.weight_decay >= 0, "must be >= 0"),
        ("batch_size", cfg.batch_size >= 1, "must be >= 1"),
        ("max_len", cfg.max_len >= 2, "must be >= 2"),
        ("epochs", cfg.epochs >= 1, "must be >= 1"),
        ("grad_clip", cfg.grad_clip > 0, "must be > 0"),
        *D.run_rules(cfg), *plan.rules(cfg),
    ])


def train(cfg: SFTConfig, preset="", records=None, scratch: Scratch | None = None, recorded=None) -> bool:
    """One run; True when it did all its steps (False: stopped by --max_steps). records() stands
    in for --data, a Scratch for --model (both from demo/recipe.py); `recorded` joins the settings
    out/config.json keeps (a resume must match them)."""
    check_config(cfg)
    if (scratch is None) == (not cfg.model):
        raise ValueError("--model names the model to fine-tune" if scratch is None else
                         "a model from scratch cannot also start from --model")
    if cfg.plan:
        if not cfg.model:
            raise ValueError("--plan needs --model DIR (its config.json is all it reads)")
        return plan.run(plan_walk, cfg, f"memory plan of sft.py --model {cfg.model}, per rank")
    ctx = D.init(cfg.dist_timeout_min)
    torch.manual_seed(cfg.seed)
    # Settings, data and the run directory are checked before any model is loaded.
    if cfg.model:
        load_config(cfg.model)
        tokenizer = data.load_tokenizer(cfg.model)
    else:
        tokenizer = scratch.tokenizer(os.path.join(cfg.out, "tokenizer"))
    examples = load_examples(cfg, tokenizer, records)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    prelude = scratch.prelude_steps if scratch else 0
    total_steps = prelude + steps_per_epoch * cfg.epochs
    D.start_run(cfg.out, asdict(cfg) | (recorded or {}), cfg.resume, preset)
    if ctx.gpu and cfg.check_memory and cfg.model:
        plan.check_before_training()
    model, optimizer = build(cfg, ctx, scratch.config(tokenizer) if scratch else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps, prelude))
    n_params = sum(p.numel() for p in model.parameters())
    D.log(f"{n_params / 1e6:.2f}M parameters, {total_steps} steps, {ctx.world_size} rank(s)")
    model.train()

    def step_fn(step):
        t0 = time.time()
        rows = step_rows(examples, step, cfg, steps_per_epoch, tokenizer.vocab_size, scratch)
        n_tokens = sum(sum(r["loss_mask"][1:]) for r in rows)
        nll_total, grad_norm = sft_step(model, optimizer, rows[ctx.rank::ctx.world_size], n_tokens, cfg, ctx)
        grad_norm = float(grad_norm)
        scheduler.step()
        return {"loss": float(nll_total) / n_tokens, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "trace_tokens": n_tokens, "tokens_per_s": sum(len(r["input_ids"]) for r in rows) / (time.time() - t0)}

    def on_start(start, metrics):
        scheduler.last_epoch = start  # the schedule goes on from the resumed step

    stop = D.run_steps(cfg, model, optimizer, tokenizer, total_steps, step_fn, cfg.export or os.path.join(cfg.out, "hf"),
                       on_start=on_start)
    return stop == total_steps


def main(argv=None):
    judge, judge_flags, argv = demo.recipe.judge_flags(argv)  # the demo judge's own --demo_* flags
    cfg, given = parse_config(SFTConfig, argv, __doc__)
    check_fields(cfg, [("data", not (cfg.data and not cfg.model), "needs --model, the model to fine-tune; "
                        "without --model and --data sft.py builds the demo judge")])
    if cfg.plan:
        sys.exit(0 if train(cfg).fits else 1)
    if cfg.model:
        if judge_flags:
            raise ValueError(f"--demo_{judge_flags[0]} is a setting of the demo judge, which has no --model")
        train(cfg)
    else:  # the CPU demo: its preset and its rounds
        demo.recipe.sft(cfg, given, judge, train, Scratch)
    D.shutdown()


if __name__ == "__main__":
    main()
