"""The memory plan's verdicts for the paper's runs and for one GPU, as the plan prints them.

    python bench/plans.py                 # the tables in docs/scale.md (about 40 minutes on 2 CPU cores)
    python bench/plans.py --only cluster  # or --only policy, --only single, --only lora

Each cell is `grpo.py --plan` or `sft.py --plan` on a config.json of Qwen2.5 of that size (nothing
else is read), on cards as they report themselves (an 80 GB card: 79.1 GiB; an H200: 139.6). A
single-GPU cell that does not fit at the paper's lengths is walked again at shorter ones, with
--micro_batch_tokens at one prompt + response (and GRPO's --offload_states), until one fits; a run
whose first optimizer step alone does not fit fits at no length, and says so. The LoRA table
(--lora_rank 64 on every projection, a frozen bf16 base) walks GRPO and SFT on one 80 GB card the
same way (without --offload_states, which LoRA does not take) and on 8 at the paper's lengths.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.shapes import config_json  # noqa: E402
from plan import read_table  # noqa: E402

# (size, trainer, ranks, flags): the paper's runs (RM-R1's release: 7B on one node, 14B on two, 32B on four)
CLUSTER = [("7B", "grpo", 8, []), ("14B", "grpo", 8, ["--rollout_tp", "2"]),
           ("32B", "grpo", 8, ["--rollout_tp", "8", "--offload_states"]), ("32B", "grpo", 16, ["--rollout_tp", "8"]),
           ("32B", "grpo", 32, ["--rollout_tp", "8"]), ("7B", "sft", 8, []), ("14B", "sft", 8, []),
           ("32B", "sft", 8, []), ("32B", "sft", 16, [])]
# A policy trained with a judge's reward (--reward judge): a 7B judge on the same ranks (its weights
# resident, its judging a phase of the step), and a judge served elsewhere (only the policy here).
JUDGE = "--judge"
POLICY = [("7B", "grpo", 8, ["--reward", "judge", JUDGE, "7B"]),
          ("7B", "grpo", 8, ["--reward", "judge", "--judge_url", "http://judge:5000/get_reward"])]


def model_dir(size, tmp):
    path = Path(tmp) / size
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_json(size)))
    return str(path)


def walk(trainer, model, ranks, gib, flags, tmp=None):
    """One plan: (fits, peak GiB, usable GiB, the phases over). `--judge SIZE` names a Qwen2.5 size."""
    flags = [model_dir(f, tmp) if i and flags[i - 1] == JUDGE else f for i, f in enumerate(flags)]
    res = subprocess.run([sys.executable, f"{trainer}.py", "--plan", "--model", model, "--plan_world_size",
                          str(ranks), "--plan_gpu_gib", str(gib), "--no-plan_alternatives", *flags],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    phases, usable = read_table(res.stdout)
    if res.returncode not in (0, 1) or not phases or usable is None:
        raise RuntimeError(f"{trainer}.py --plan failed:\n{res.stdout[-2000:]}{res.stderr[-3000:]}")
    peak = max(p for _, p, _ in phases if p is not None)
    return res.returncode == 0, peak, usable, [name for name, _, over in phases if over]


# One GPU: the paper's lengths, then settings that save memory, then shorter responses / rows.
TRIES = {"grpo": [[], ["--offload_states"], ["--offload_states", "--micro_batch_tokens", "12288"],
                  *[["--offload_states", "--max_response_len", str(r), "--micro_batch_tokens", str(4096 + r)]
                    for r in (4096, 2048, 1024)]],
         "sft": [[], *[["--max_len", str(n)] for n in (8192, 4096, 2048)]]}
LORA = ["--lora_rank", "64"]
LORA_TRIES = {"grpo": [[], ["--micro_batch_tokens", "12288"],
                       *[["--max_response_len", str(r), "--micro_batch_tokens", str(4096 + r)] for r in (4096, 2048, 1024)]],
              "sft": TRIES["sft"]}


def single(size, trainer, gib, tmp, lora=False):
    """The first of TRIES (with lora: LORA_TRIES, each with LORA) at which one GPU of gib GB fits."""
    model = model_dir(size, tmp)
    for flags in (LORA_TRIES if lora else TRIES)[trainer]:
        fits, peak, usable, over = walk(trainer, model, 1, gib, (LORA if lora else []) + flags)
        said = " ".join(flags) or "paper lengths"
        if fits:
            return f"fits: {said} (peak {peak:.1f} of {usable:.1f} GiB)"
        if any(name.startswith("load") for name in over):  # the weights and AdamW alone: no length helps
            return f"does not fit: its first AdamW step alone peaks at {peak:.1f} of {usable:.1f} GiB"
    return f"does not fit, even at {said} (peak {peak:.1f} of {usable:.1f} GiB)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("cluster", "policy", "single", "lora"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for table in ("cluster", "policy"):
            if args.only not in (None, table):
                continue
            print("\n| run | ranks of 80 GB (79.1 GiB) | verdict | peak GiB | usable GiB |\n|---|---|---|---|---|", flush=True)
            for size, trainer, ranks, flags in CLUSTER if table == "cluster" else POLICY:
                fits, peak, usable, over = walk(trainer, model_dir(size, tmp), ranks, 80, flags, tmp)
                verdict = "fits" if fits else "does not fit: " + "; ".join(over)
                print(f"| {trainer}.py {size} {' '.join(flags)} | {ranks} | {verdict} | {peak:.1f} | {usable:.1f} |",
                      flush=True)
        if args.only in (None, "single"):
            print("\n| one GPU | GRPO, 80 GB | GRPO, H200 | SFT, 80 GB | SFT, H200 |\n|---|---|---|---|---|", flush=True)
            for size in ("0.5B", "1.5B", "3B", "7B"):
                cells = [single(size, trainer, gib, tmp) for trainer in ("grpo", "sft") for gib in (80, 141)]
                print(f"| {size} | " + " | ".join(cells) + " |", flush=True)
        if args.only in (None, "lora"):
            print("\n| LoRA r=64 | GRPO, one 80 GB | SFT, one 80 GB | GRPO, 8 x 80 GB | SFT, 8 x 80 GB |\n|---|---|---|---|---|",
                  flush=True)
            for size in ("0.5B", "7B", "14B", "32B"):
                cells = [single(size, trainer, 80, tmp, lora=True) for trainer in ("grpo", "sft")]
                for trainer in ("grpo", "sft"):
                    tp = ["--rollout_tp", "8"] if trainer == "grpo" and size == "32B" else []  # 61 GiB gathered whole
                    fits, peak, usable, over = walk(trainer, model_dir(size, tmp), 8, 80, LORA + tp)
                    cells.append(f"{' '.join(tp) + ': ' if tp else ''}{'fits' if fits else 'does not fit: ' + '; '.join(over)}"
                                 f" (peak {peak:.1f} of {usable:.1f} GiB)")
                print(f"| {size} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
