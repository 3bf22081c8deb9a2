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
distils a ~1M-parameter Qwen2-architecture judge it builds itself instead of an LLM; its preset
and recipe live in demo/recipe.py, which writes that model's directory and hands train() its
records and a Schedule of its own (copying steps first) through the same interface a user has.
"""

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

import data
import distributed
import lora
import plan
import run
import tokenization
from checkpoint import load_config
from cli import check_fields, parse_config
from model import document_lengths


@dataclass
class SFTConfig(lora.LoRASettings):
    model: str = ""                  # HF model directory; empty: the demo judge from scratch
    data: str = ""                   # distillation records; empty: synthetic demo traces
    out: str = "runs/sft"            # checkpoints and metrics.jsonl
    export: str = ""                 # Hugging Face export directory; empty: out/hf
    lr: float = 5e-6                 # paper: 5e-6
    schedule: Literal["constant", "cosine"] = "constant"  # after warmup: constant, or a cosine to 0 over the run
    warmup_steps: int = 0            # linear warmup of the learning rate over this many steps
    weight_decay: float = 0.0        # AdamW's
    batch_size: int = 128            # sequences per optimizer step, over all ranks (paper: 128)
    max_len: int = 12288             # tokens per packed row and per sequence (paper: 12288)
    epochs: int = 1                  # passes over the records
    grad_clip: float = 1.0           # the global gradient norm's cap
    bf16: bool = True                # bf16 compute with fp32 master weights (CUDA only)
    activation_checkpointing: bool = True  # recompute each block's activations in backward
    save_every: int = 0              # steps between resumable checkpoints; 0: only at the end
    keep_last: int = 0               # keep only the newest K step_N checkpoints; 0: keep all
    export_every: int = 0            # also export HF weights to EXPORT/step_N every N steps; 0: only at the end
    resume: bool = False             # continue from out/latest
    resume_step: int = -1            # with --resume: go on from step_N (0: from --model); later checkpoints set aside
    resume_data_changed: bool = False # --resume although --data's contents changed (digest in out/config.json)
    max_steps: int = 0               # stop (with a checkpoint) after this many steps of this run; 0: no limit
    seed: int = 0                    # the data order derives from it
    wandb_project: str = ""          # log to wandb too (pip install wandb)
    dist_timeout_min: float = 60.0   # how long a rank waits at a collective
    check_memory: bool = True        # CUDA: walk the memory plan before step 1, refuse a run that cannot fit
    plan: bool = False               # only print the memory plan (needs --model DIR/config.json alone)
    plan_world_size: int = 8         # ranks the plan simulates
    plan_gpu_gib: float = 80.0       # GiB of each simulated GPU; 80 and 141 (GB) mean what those cards report
    plan_alternatives: bool = True   # a plan that does not fit also walks what could (more ranks, H200s)


@dataclass
class Schedule:
    """What each optimizer step of a run trains on and at what learning rate: `total` steps,
    rows(step) its packed rows and lr(step) its factor of --lr, both pure functions of the step,
    so a resumed run sees what an uninterrupted one would."""
    total: int
    rows: Callable
    lr: Callable


def load_examples(cfg: SFTConfig, tokenizer, records=None):
    """Tokenized (input_ids, loss_mask) pairs of --data, or of records() when given (the demo's);
    sequences over max_len are dropped and counted."""
    records = data.load_sft(cfg.data) if records is None else records()
    examples, dropped = [], 0
    for r in records:
        enc = tokenization.encode_sft(tokenizer, r["context_messages"], r["trace"], cfg.max_len)
        if enc is None:
            dropped += 1
        else:
            examples.append(enc)
    distributed.log(f"{len(examples)} sequences, {dropped} dropped as longer than max_len={cfg.max_len}")
    if not examples:
        raise ValueError("no training sequence fits max_len")
    return examples


def epochs(examples, cfg: SFTConfig) -> Schedule:
    """sft.py's schedule: --epochs passes over the examples, each in a seeded order, --batch_size
    sequences a step packed into rows of at most --max_len tokens; the learning rate warms up
    over --warmup_steps, then stays or follows a cosine to 0 at the last step (--schedule)."""
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = per_epoch * cfg.epochs

    def rows(step):
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(examples))
        return tokenization.pack([examples[i] for i in order[k * cfg.batch_size:(k + 1) * cfg.batch_size]],
                                 cfg.max_len)

    return Schedule(total, rows, lambda step: warmup_then(cfg.schedule, step, total, cfg.warmup_steps))


def warmup_then(schedule, step, total, warmup) -> float:
    """The factor of the learning rate at `step`: linear warmup over `warmup` steps, then constant,
    or a cosine from 1 to 0 over the rest of `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def sft_loss(model, row, n_tokens, device):
    """Summed negative log-likelihood of the row's trace tokens / the step's trace-token count.

    The division by the global count (not per micro-batch or per rank) makes the step's loss one
    token mean, whatever the split (FSDP sums the ranks' gradients: distributed.shard).
    Returns (loss to backpropagate, summed NLL for logging).
    """
    batch = tokenization.collate([row], pad_id=0)
    ids = batch["input_ids"].to(device)
    mask = batch["loss_mask"][:, 1:].to(device).float()  # position t predicts token t + 1
    logprobs, _ = model(ids[:, :-1], position_ids=batch["position_ids"][:, :-1].to(device),
                        doc_lens=document_lengths([row["position_ids"][:-1]]), targets=ids[:, 1:])
    nll = -(logprobs * mask).sum()
    return nll / n_tokens, nll.detach()


def build(cfg: SFTConfig, ctx):
    """The model (--model's weights) and its AdamW, as train() and the memory plan build them."""
    model = distributed.load_model(cfg.model, ctx, bf16=cfg.bf16, activation_checkpointing=cfg.activation_checkpointing,
                                   seed=cfg.seed, adapters=lora.of(cfg))
    return model, distributed.adamw(model, ctx, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))


def sft_step(model, optimizer, rows, n_tokens, cfg: SFTConfig, ctx, phases=None):
    """One optimizer step on this rank's packed rows: each row's forward and backward (gradients
    accumulate; FSDP sums them over ranks), then clip and AdamW. n_tokens is the step's trace-token
    count over all ranks. `phases` (run.Timings in training, plan.Plan in the memory plan) sees
    the step's one device phase. Returns the summed NLL over ranks and the gradient norm."""
    phases = phases or run.Timings()
    per_rank = math.ceil(cfg.batch_size / ctx.world_size)
    with phases.phase("step", f"step: forward + backward ({len(rows)} of {per_rank} rows of {cfg.max_len:,} tokens), "
                      f"clip, AdamW step", "lower --max_len, or " + plan.MORE_RANKS):
        nll_sum = torch.zeros((), device=ctx.device)
        for row in distributed.pad_to_ranks(rows, EMPTY_ROW):
            loss, nll = sft_loss(model, row, n_tokens, ctx.device)
            loss.backward()
            nll_sum += nll
        nll_total = distributed.all_reduce_sum(nll_sum)
        return nll_total, distributed.clip_and_step(model, optimizer, cfg.grad_clip, ctx, loss=nll_total)


# What a rank short of rows runs (distributed.pad_to_ranks): tokenization.pack's row of 2 tokens that carry no loss.
EMPTY_ROW = tokenization.pack([([0, 0], [0, 0])], 2)[0]
PLAN_ROWS = 2  # rows of a step the plan walks (why: plan_walk)


def plan_walk(cfg: SFTConfig, ctx, memory: plan.Plan):
    """sft_step itself on fake tensors (plan.py), with this plan as its `phases`, over PLAN_ROWS
    packed rows of max_len tokens: from the second row on, the sharded fp32 gradients exist when a
    backward starts, and every later row is alike, so the peak is reached by then."""
    with memory.fake:
        model, optimizer = build(cfg, ctx)
    memory.track(model, optimizer, cfg.max_len)
    per_rank = math.ceil(cfg.batch_size / ctx.world_size)
    rows = tokenization.pack([([0] * cfg.max_len, [1] * cfg.max_len)] * min(PLAN_ROWS, per_rank), cfg.max_len)
    memory.notes += [f"a step: {cfg.batch_size} sequences, at most {per_rank} packed rows of <= {cfg.max_len:,} tokens "
                     f"per rank; {len(rows)} walked (from the second on, gradients exist as a backward starts: the peak)"]
    with memory.phase("load", "load: shards, AdamW state", plan.MORE_RANKS + ", or a smaller model"):
        memory.make_optimizer_state(model, optimizer)
    model.train()
    sft_step(model, optimizer, rows, cfg.max_len * len(rows), cfg, ctx, phases=memory)


def check_config(cfg: SFTConfig):
    """Every setting, before any data or model is read; an error names the flag."""
    check_fields(cfg, [
        ("lr", cfg.lr > 0, "must be > 0"),
        ("warmup_steps", cfg.warmup_steps >= 0, "must be >= 0"),
        ("weight_decay", cfg.weight_decay >= 0, "must be >= 0"),
        ("batch_size", cfg.batch_size >= 1, "must be >= 1"),
        ("max_len", cfg.max_len >= 2, "must be >= 2"),
        ("epochs", cfg.epochs >= 1, "must be >= 1"),
        ("grad_clip", cfg.grad_clip > 0, "must be > 0"),
        *lora.rules(cfg), *run.run_rules(cfg), *plan.rules(cfg),
    ])


def train(cfg: SFTConfig, preset="", records=None, schedule=None, recorded=None) -> bool:
    """One run from --model; True when it did all its steps (False: stopped by --max_steps).
    records() stands in for --data; schedule(steps, tokenizer) may change the run's Schedule
    (epochs': steps); `recorded` joins the settings out/config.json keeps (a resume must match
    them). The demo (demo/recipe.py) passes all three."""
    check_config(cfg)
    if not cfg.model:
        raise ValueError("--model names the model to fine-tune (a Hugging Face directory)" +
                         ("; --plan reads only its config.json" if cfg.plan else ""))
    if cfg.plan:
        return plan.run(plan_walk, cfg, f"memory plan of sft.py --model {cfg.model}, per rank")
    ctx = distributed.init(cfg.dist_timeout_min)
    torch.manual_seed(cfg.seed)
    # Settings, data and the run directory are checked before any model is loaded.
    load_config(cfg.model)
    tokenizer = tokenization.load_tokenizer(cfg.model)
    steps = epochs(load_examples(cfg, tokenizer, records), cfg)
    if schedule is not None:
        steps = schedule(steps, tokenizer)
    run.start_run(cfg.out, asdict(cfg) | (recorded or {}), cfg.resume, preset)
    if ctx.gpu and cfg.check_memory:
        plan.check_before_training()

    model, optimizer = build(cfg, ctx)
    export = cfg.export or os.path.join(cfg.out, "hf")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, steps.lr)
    start = run.resume(cfg, model, optimizer)
    scheduler.last_epoch = start  # the schedule goes on from the resumed step
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    distributed.log(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters" +
                    (f" ({trained / 1e6:.2f}M in LoRA adapters)" if cfg.lora_rank else "") +
                    f", {steps.total} steps, {ctx.world_size} rank(s)")
    metrics = run.MetricsLogger(cfg.out, steps.total, asdict(cfg), cfg.wandb_project, start)
    model.train()
    stop = run.last_step(cfg, start, steps.total)
    for step in range(start, stop):
        started = time.time()
        rows = steps.rows(step)
        n_tokens = sum(sum(r["loss_mask"][1:]) for r in rows)
        with run.stop_on_non_finite(step + 1, cfg.out):
            nll_total, grad_norm = sft_step(model, optimizer, rows[ctx.rank::ctx.world_size], n_tokens, cfg, ctx)
        grad_norm = float(grad_norm)
        scheduler.step()
        metrics.log(step + 1, {"loss": float(nll_total) / n_tokens, "lr": scheduler.get_last_lr()[0],
                               "grad_norm": grad_norm, "trace_tokens": n_tokens,
                               "tokens_per_s": sum(len(r["input_ids"]) for r in rows) / (time.time() - started)})
        if run.due(cfg.save_every, step + 1) and step + 1 < stop:
            run.save_state(cfg.out, step + 1, model, optimizer, {}, cfg.keep_last)
        if run.due(cfg.export_every, step + 1) and step + 1 < steps.total:
            distributed.save_hf(model, tokenizer, os.path.join(export, f"step_{step + 1:08d}"), cfg.model)
    metrics.close()
    run.finish(cfg, stop, steps.total, model, optimizer, tokenizer, export)
    return stop == steps.total


def main(argv=None):
    import demo.recipe  # the demo judge's own --demo_* flags (the demo and its tokenizer: only here)
    judge, judge_flags, argv = demo.recipe.judge_flags(argv)
    cfg, given = parse_config(SFTConfig, argv, __doc__)
    check_fields(cfg, [("data", not (cfg.data and not cfg.model), "needs --model, the model to fine-tune; "
                        "without --model and --data sft.py builds the demo judge"),
                       ("lora_rank", not (cfg.lora_rank and not cfg.model), "adapts a trained model: give --model "
                        "(the demo judge is built from scratch)")])
    if cfg.plan:
        sys.exit(0 if train(cfg).fits else 1)
    if cfg.model and judge_flags:
        raise ValueError(f"--demo_{judge_flags[0]} is a setting of the demo judge, which has no --model")
    with distributed.running():
        if cfg.model:
            train(cfg)
        else:  # the CPU demo: its preset and its rounds
            for c, records, schedule, recorded in demo.recipe.sft_rounds(cfg, given, judge):
                if not train(c, preset="demo", records=records, schedule=schedule, recorded=recorded):
                    break  # stopped by --max_steps: --resume goes on from here


if __name__ == "__main__":
    main()
