"""The demo's presets and recipe: what a bare `python sft.py`, `grpo.py` or `eval.py` runs.

A trainer given neither --model nor --data hands its parsed config here (one line in its main);
the preset fills every field not given on the command line, the run logs what it took, and
out/config.json records it. The demo judge's own settings are flags of their own, --demo_<field>
of Judge, read only here (so `sft.py --help` shows the real run's fields alone):

    python sft.py --demo_examples 24 --demo_layers 2 --demo_rounds 1 --batch_size 8 --out /tmp/d

SFT builds the judge from scratch (a ~1M-parameter Qwen2 over the demo tokenizer, written to
out/round1/init as the model sft.py fine-tunes) in rounds: round 1 takes copy_steps steps of
copying (task.copy_rows, in place of the pretraining an LLM has had, with a learning-rate phase
of its own: sft.py's schedule after them starts afresh) and then distils `examples` teacher traces;
each later round continues the previous round's export on 4x as many fresh traces (the next
seed), each seen once, at half the learning rate, with a fresh optimizer and its own warmup
and cosine. After round 2 the judge files held-out arithmetic as Chat and says A, the habit of
the teacher's hasty traces (task.HASTY_SHARE) that GRPO removes; the README has the figures.
With more than one round, round r runs in out/round<r> and the last exports to `export`.
"""

import os
import shutil
from dataclasses import asdict, dataclass, replace

import distributed
from checkpoint import publish, save_pretrained
from cli import check_fields, parse_prefixed, with_defaults
from demo.task import SHIPPED, build_demo_tokenizer, copy_rows, rlvr_records, sft_records
from model import ModelConfig, on_meta

SFT = dict(lr=2e-3, warmup_steps=20, schedule="cosine", batch_size=32, max_len=2048, epochs=4, bf16=False,
           activation_checkpointing=False, weight_decay=0.01, out="runs/sft-demo", export=SHIPPED)
GRPO = dict(model=SHIPPED, lr=5e-5, rollout_batch_size=32, mini_batch_size=16, n_samples=7, micro_batch_tokens=1024,
            max_prompt_len=2048, max_response_len=160, kl_coef=1e-3, bf16=False, activation_checkpointing=False,
            rollout_slots=112, eval_every=10, eval_limit=1000, out="runs/grpo-demo", epochs=1)
GRPO_PAIRS = 1280  # training pairs GRPO draws: 40 rollout steps of 32 prompts
EVAL = dict(max_new_tokens=160)


@dataclass
class Judge:
    """The demo judge's settings (flags --demo_<field> of sft.py)."""
    examples: int = 4000   # teacher traces of round 1 (each later round: 4x the previous round's)
    layers: int = 4
    hidden: int = 128
    copy_steps: int = 500  # steps on copy_rows before distillation in round 1
    rounds: int = 2


def apply(cfg, preset: dict, given: set, script: str):
    """cfg with the preset's values where no flag was given, and a line that says so."""
    from distributed import log
    log(f"the CPU demo's settings (demo/recipe.py, for {script}) apply where no flag is given: "
        f"{ {k: v for k, v in preset.items() if k not in given} }")
    return with_defaults(cfg, preset, given)


def model_config(tokenizer, judge: Judge) -> ModelConfig:
    """A tiny Qwen2: the same blocks as Qwen2.5, ~1M parameters."""
    return ModelConfig(vocab_size=len(tokenizer), hidden_size=judge.hidden, intermediate_size=3 * judge.hidden,
                       num_hidden_layers=judge.layers, num_attention_heads=4, num_key_value_heads=2,
                       rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=True,
                       eos_token_id=tokenizer.eos_token_id)


@dataclass
class Round:
    cfg: object            # the round's SFTConfig
    examples: int          # teacher traces it distils
    copy_steps: int        # copying steps before them (round 1 only)


def rounds(cfg, judge: Judge) -> list[Round]:
    """The SFT rounds of the demo judge (see the module docstring)."""
    check_fields(judge, [
        ("examples", judge.examples >= 1, "must be >= 1"),
        ("layers", judge.layers >= 1, "must be >= 1"),
        ("hidden", judge.hidden >= 4 and judge.hidden % 4 == 0, "must be a multiple of its 4 heads"),
        ("copy_steps", judge.copy_steps >= 0, "must be >= 0"),
        ("rounds", judge.rounds >= 1, "must be >= 1")], prefix="demo_")
    if judge.rounds == 1:
        return [Round(cfg, judge.examples, judge.copy_steps)]
    out = []
    for r in range(1, judge.rounds + 1):
        path = os.path.join(cfg.out, f"round{r}")
        this = Round(replace(cfg, out=path, export=os.path.join(path, "hf")), judge.examples, judge.copy_steps)
        if out:
            prev = out[-1]
            this = Round(replace(this.cfg, model=prev.cfg.export, seed=prev.cfg.seed + 1, epochs=1, lr=prev.cfg.lr / 2),
                         4 * prev.examples, 0)
        out.append(this)
    out[-1].cfg.export = cfg.export or os.path.join(cfg.out, "hf")
    return out


def judge_flags(argv):
    """(Judge from the --demo_* flags of argv, the names given, the rest of argv)."""
    return parse_prefixed(Judge, argv, "demo_")


def initial_judge(path, judge: Judge, seed) -> str:
    """The judge before any training, as a model directory for sft.py's --model: the demo
    tokenizer, and a tiny Qwen2 of fresh weights (distributed.init_weights: normal(0, 0.02)).
    Written once, by rank 0, through a temporary directory (a kill leaves none half-made); a
    resumed run finds it there. Its absolute path, which out/config.json records for export.py."""
    path = os.path.abspath(path)
    if distributed.is_main() and not os.path.isdir(path):
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = build_demo_tokenizer(tmp)
        model = on_meta(model_config(tokenizer, judge)).materialize("cpu")
        distributed.init_weights(model, seed)
        save_pretrained(model, tmp)  # beside the tokenizer's files
        publish(tmp, path)
    distributed.barrier()
    return path


def copying_first(copy_steps, batch_size, seed, warmup):
    """A schedule change for sft.train: copy_steps steps of copy_rows first, their learning rate
    warming up over `warmup` steps and then constant, then sft.py's own steps, their schedule
    started afresh (decayed by the copying steps, the rate left for distillation taught the judge
    far less)."""
    def schedule(steps, tokenizer):
        def rows(step):  # ids above the 3 special tokens, below the added phrases; rows as long as an example
            return copy_rows(batch_size, 256, tokenizer.vocab_size, 3, seed, step) if step < copy_steps else \
                steps.rows(step - copy_steps)

        def lr(step):
            if step >= copy_steps:
                return steps.lr(step - copy_steps)
            return (step + 1) / warmup if step < warmup else 1.0
        return replace(steps, total=copy_steps + steps.total, rows=rows, lr=lr)
    return schedule


def sft_rounds(cfg, given, judge: Judge):
    """`python sft.py` without --model and --data: the SFT preset, then, round by round, what
    sft.train takes: (its config, its records, its schedule change, what out/config.json records)."""
    cfg = apply(cfg, SFT, given, "sft.py")
    distributed.init(cfg.dist_timeout_min)  # initial_judge writes on rank 0 alone
    for r in rounds(cfg, judge):
        c, schedule = r.cfg, None
        if not c.model:  # round 1: the judge from scratch, copying first
            c = replace(c, model=initial_judge(os.path.join(c.out, "init"), judge, c.seed))
            schedule = copying_first(r.copy_steps, c.batch_size, c.seed, c.warmup_steps)
        yield c, (lambda r=r: sft_records(r.examples, seed=r.cfg.seed)), schedule, \
            {"demo": asdict(judge) | {"round_examples": r.examples}}


def grpo(cfg, given, train):
    """`grpo.py` without --model and --data: the GRPO preset on the shipped judge and the demo's
    synthetic pairs, scored on held-out ones."""
    cfg = apply(cfg, GRPO, given, "grpo.py")
    return train(cfg, preset="demo", records=lambda: rlvr_records(GRPO_PAIRS, seed=cfg.seed),
                 eval_records=lambda: rlvr_records(cfg.eval_limit, seed=cfg.seed, split="test"))
