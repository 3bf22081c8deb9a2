"""Stage 1 of RM-R1: distillation. Fine-tune a judge on reasoning traces, loss on the trace only.

    python sft.py                                  # CPU demo: rebuilds demo/sft (the README has its time)
    torchrun --nproc_per_node=8 sft.py --model Qwen2.5-7B-Instruct --data rm_r1_sft.jsonl --out runs/sft7b

Data: RM-R1 distillation records ({"context_messages": [system, user], "winner": trace}), any
JSON/JSONL/Parquet. Each step takes `batch_size` sequences in a seeded order, packs them into
rows of at most `max_len` tokens (documents never attend to each other), spreads the rows over
the ranks, and takes one optimizer step on the token-mean loss over every trace token of the
step, whatever the number of ranks. Output: `out/hf` or `--export` (a Hugging Face model
directory with the tokenizer; the demo exports to demo/sft) and resumable checkpoints in `out/`
(`--resume`, `--max_steps`).

Departures from the paper: none in the objective; the demo (no --model) trains a ~1M-parameter
Qwen2-architecture judge from scratch instead of fine-tuning an LLM: 500 steps of copying
(demo.copy_rows, in place of the pretraining an LLM has had), then distillation on synthetic
traces with its learning-rate schedule started afresh, then a second round of distillation on
fresh traces (demo_round_configs).
"""

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

import data
import demo
import distributed as D
import plan
from cli import check_fields, parse_config, with_defaults
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
    max_steps: int = 0               # stop (with a checkpoint) after this many steps of this run (demo: of this round); 0: no limit
    seed: int = 0
    wandb_project: str = ""          # log to wandb too (pip install wandb)
    dist_timeout_min: float = 60.0   # how long a rank waits at a collective
    check_memory: bool = True        # CUDA: walk the memory plan before step 1, refuse a run that cannot fit
    plan: bool = False               # only print the memory plan (needs --model DIR/config.json alone)
    plan_world_size: int = 8         # ranks the plan simulates
    plan_gpu_gib: float = 80.0       # memory of each simulated GPU
    # The demo only:
    demo_examples: int = 4000        # synthetic teacher traces to train on
    demo_layers: int = 4
    demo_hidden: int = 128
    demo_copy_steps: int = 0         # steps on demo.copy_rows before distillation (demo default 500)
    demo_rounds: int = 1             # distillation rounds; see demo_round_configs (demo default 2)


DEMO = dict(demo_copy_steps=500, demo_rounds=2, lr=2e-3, warmup_steps=20, schedule="cosine", batch_size=32,
            max_len=2048, epochs=4, bf16=False, activation_checkpointing=False, weight_decay=0.01,
            out="runs/sft-demo", export=demo.SHIPPED)


def demo_model_config(tokenizer, cfg: SFTConfig) -> ModelConfig:
    """A tiny Qwen2: same blocks as Qwen2.5, ~1M parameters."""
    return ModelConfig(vocab_size=len(tokenizer), hidden_size=cfg.demo_hidden,
                       intermediate_size=3 * cfg.demo_hidden, num_hidden_layers=cfg.demo_layers,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                       max_position_embeddings=4096, tie_word_embeddings=True,
                       eos_token_id=tokenizer.eos_token_id)


def demo_round_configs(cfg: SFTConfig) -> list[SFTConfig]:
    """The demo judge's rounds. Round 1 copies, then distills; each later round continues the
    previous round's export on 4x as many fresh traces (the next seed), each seen once, at half
    the learning rate, with a fresh optimizer and its own warmup and cosine. After round 2 the
    judge files held-out arithmetic as Chat and says A, the habit of the teacher's hasty traces
    (demo.HASTY_SHARE) that grpo.py removes; the README has the figures. With more than one
    round, round r runs in out/round<r> and the last exports to `export`."""
    check_config(cfg)
    if cfg.demo_rounds == 1:
        return [cfg]
    rounds = []
    for r in range(1, cfg.demo_rounds + 1):
        out = os.path.join(cfg.out, f"round{r}")
        this = replace(cfg, out=out, export=os.path.join(out, "hf"))
        if rounds:
            prev = rounds[-1]
            this = replace(this, model=prev.export, demo_copy_steps=0, seed=prev.seed + 1,
                           demo_examples=4 * prev.demo_examples, epochs=1, lr=prev.lr / 2)
        rounds.append(this)
    rounds[-1].export = cfg.export or os.path.join(cfg.out, "hf")
    return rounds


def load_examples(cfg: SFTConfig, tokenizer):
    """Tokenized (input_ids, loss_mask) pairs; sequences over max_len are dropped and counted."""
    if cfg.data:
        records = data.load_sft(cfg.data)
    else:
        records = demo.sft_records(cfg.demo_examples, seed=cfg.seed)
    examples, dropped = [], 0
    for r in records:
        enc = data.encode_sft(tokenizer, r["context_messages"], r["winner"], cfg.max_len)
        if enc is None:
            dropped += 1
        else:
            examples.append(enc)
    D.log(f"{len(examples)} sequences, {dropped} dropped as longer than max_len={cfg.max_len}")
    if not examples:
        raise ValueError("no training sequence fits max_len")
    return examples


def step_rows(examples, step, cfg: SFTConfig, steps_per_epoch, vocab_size):
    """The packed rows of optimizer step `step`: a pure function of (seed, step), so a resumed
    run sees exactly the data an uninterrupted one would. The demo's first `demo_copy_steps`
    steps train on copying (demo.copy_rows); the distillation steps follow."""
    if step < cfg.demo_copy_steps:
        # rows as long as a demo judge example; ids above the 3 special tokens, below the added phrases
        return demo.copy_rows(cfg.batch_size, 256, vocab_size, 3, cfg.seed, step)
    epoch, k = divmod(step - cfg.demo_copy_steps, steps_per_epoch)
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


def lr_lambda(cfg: SFTConfig, total_steps):
    """Warmup, then constant or cosine to 0 at total_steps. The demo's copying steps are a phase
    of their own (warmup, then constant), and distillation starts its schedule afresh: decayed
    by the copying steps, the rate left for distillation teaches a judge far less."""
    def phase(step, length, schedule):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, length - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    def f(step):
        if step < cfg.demo_copy_steps:
            return phase(step, cfg.demo_copy_steps, "constant")
        return phase(step - cfg.demo_copy_steps, total_steps - cfg.demo_copy_steps, cfg.schedule)
    return f


def build(cfg: SFTConfig, ctx, tokenizer=None, fill=True):
    """The model and its AdamW, as train() and the memory plan build them (the demo judge from
    scratch without --model: it needs the tokenizer for its vocabulary)."""
    if cfg.model:
        model = D.load_model(cfg.model, ctx, bf16=cfg.bf16,
                             activation_checkpointing=cfg.activation_checkpointing, fill=fill)
    else:
        model = D.load_model(None, ctx, config=demo_model_config(tokenizer, cfg), seed=cfg.seed,
                             activation_checkpointing=cfg.activation_checkpointing, fill=fill)
    return model, D.adamw(model, ctx, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))


def plan_walk(cfg: SFTConfig, ctx, plan):
    """One SFT step in train()'s order on fake tensors (plan.py): one packed row of max_len
    tokens, forward and backward, then the optimizer step."""
    model, optimizer = build(cfg, ctx, fill=False)
    plan.track(model, optimizer)
    W = ctx.world_size
    row = data.pack([([0] * cfg.max_len, [1] * cfg.max_len)], cfg.max_len)[0]
    plan.notes += [f"a step: {cfg.batch_size} sequences, at most {math.ceil(cfg.batch_size / W)} packed "
                   f"rows of <= {cfg.max_len:,} tokens per rank (one measured: each is alike)"]
    with plan.phase("load: shards, AdamW state", MORE_RANKS + ", or a smaller model"):
        plan.make_optimizer_state(model, optimizer)
    model.train()
    with plan.phase(f"forward + backward (one row of {cfg.max_len:,} tokens)", "lower --max_len"):
        loss, _ = sft_loss(model, row, cfg.max_len, ctx.device)
        loss.backward()
    with plan.phase("clip + AdamW step", MORE_RANKS):
        D.clip_and_step(model, optimizer, cfg.grad_clip)


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
        ("save_every", cfg.save_every >= 0, "must be >= 0 (0: at the end only)"),
        ("max_steps", cfg.max_steps >= 0, "must be >= 0 (0: no limit)"),
        ("dist_timeout_min", cfg.dist_timeout_min > 0, "must be > 0"),
        ("plan_world_size", cfg.plan_world_size >= 1, "must be >= 1"),
        ("plan_gpu_gib", cfg.plan_gpu_gib > plan.CONTEXT_GIB, f"must be > {plan.CONTEXT_GIB} GiB"),
        ("demo_examples", cfg.demo_examples >= 1, "must be >= 1"),
        ("demo_layers", cfg.demo_layers >= 1, "must be >= 1"),
        ("demo_hidden", cfg.demo_hidden >= 4 and cfg.demo_hidden % 4 == 0, "must be a multiple of its 4 heads"),
        ("demo_copy_steps", cfg.demo_copy_steps >= 0, "must be >= 0"),
        ("demo_copy_steps", not (cfg.model and cfg.demo_copy_steps),
         "pretrains the demo judge from scratch; it cannot be combined with --model"),
        ("demo_rounds", cfg.demo_rounds >= 1, "must be >= 1"),
    ])


def train(cfg: SFTConfig, preset="") -> bool:
    """One run; True when it did all its steps (False: stopped by --max_steps)."""
    check_config(cfg)
    if cfg.plan:
        if not cfg.model:
            raise ValueError("--plan needs --model DIR (its config.json is all it reads)")
        return plan.run(plan_walk, cfg, cfg.plan_world_size, cfg.plan_gpu_gib,
                        f"memory plan of sft.py --model {cfg.model}, per rank")
    ctx = D.init(cfg.dist_timeout_min)
    torch.manual_seed(cfg.seed)
    # Settings, data and the run directory are checked before any model is loaded.
    if cfg.model:
        load_config(cfg.model)
        tokenizer = data.load_tokenizer(cfg.model)
    else:
        tokenizer = demo.build_demo_tokenizer(os.path.join(cfg.out, "tokenizer"))
    examples = load_examples(cfg, tokenizer)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = cfg.demo_copy_steps + steps_per_epoch * cfg.epochs
    D.start_run(cfg.out, asdict(cfg), cfg.resume, preset)
    if ctx.gpu and cfg.check_memory and cfg.model:
        plan.check_before_training()
    model, optimizer = build(cfg, ctx, tokenizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    n_params = sum(p.numel() for p in model.parameters())
    D.log(f"{n_params / 1e6:.2f}M parameters, {total_steps} steps, {ctx.world_size} rank(s)")
    model.train()
    pad = tokenizer.pad_token_id or 0
    empty = {"input_ids": [pad, pad], "loss_mask": [0, 0], "position_ids": [0, 1]}  # a short rank's row

    def step_fn(step):
        t0 = time.time()
        rows = step_rows(examples, step, cfg, steps_per_epoch, tokenizer.vocab_size)
        n_tokens = sum(sum(r["loss_mask"][1:]) for r in rows)
        nll_sum = torch.zeros((), device=ctx.device)
        for row in D.pad_to_ranks(rows[ctx.rank::ctx.world_size], empty):
            loss, nll = sft_loss(model, row, n_tokens, ctx.device)
            loss.backward()
            nll_sum += nll
        nll_total = D.all_reduce_sum(nll_sum)
        grad_norm = float(D.clip_and_step(model, optimizer, cfg.grad_clip, loss=nll_total))
        scheduler.step()
        return {"loss": float(nll_total) / n_tokens, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "trace_tokens": n_tokens, "tokens_per_s": sum(len(r["input_ids"]) for r in rows) / (time.time() - t0)}

    def on_start(start, metrics):
        scheduler.last_epoch = start  # the schedule goes on from the resumed step

    stop = D.run_steps(cfg, model, optimizer, tokenizer, total_steps, step_fn, cfg.export or os.path.join(cfg.out, "hf"),
                       on_start=on_start)
    return stop == total_steps


def main(argv=None):
    cfg, given = parse_config(SFTConfig, argv, __doc__)
    # The demo's preset and its judge from scratch are for a bare `sft.py`.
    check_fields(cfg, [("data", not (cfg.data and not cfg.model), "needs --model, the model to fine-tune; "
                        "without --model and --data sft.py builds the demo judge")])
    if cfg.plan:
        sys.exit(0 if train(cfg).fits else 1)
    if cfg.model:
        train(cfg)
    else:
        D.log(f"no --model: the CPU demo's settings (sft.DEMO) apply where no flag is given: "
              f"{ {k: v for k, v in DEMO.items() if k not in given} }")
        for round_cfg in demo_round_configs(with_defaults(cfg, DEMO, given)):
            if not train(round_cfg, preset="demo"):
                break  # stopped by --max_steps: --resume goes on from here
    D.shutdown()


if __name__ == "__main__":
    main()
