"""The loop closed on the CPU: a tiny policy trained by GRPO with the demo's judges as its reward,
and measured by the program that knows every right answer.

    python -m demo.loop                          # every stage; runs/loop/, a stage done is kept
    python -m demo.loop --seed 1                 # the runs again with other prompts and sampling
    python -m demo.loop --steps 20 --out /tmp/l  # shorter runs

1. The policy: a tiny Qwen2 over the demo tokenizer (as the demo judge is built), distilled
   (sft.train) on answers to the demo's questions, half of them careful and half hasty. Careful:
   the working of the sum, a reply that keeps the rule. Hasty: "Sure! It is <a wrong number>.",
   "Sure! <a reply that breaks the rule>". Hasty begins with its own first word, so the habit is
   one early decision (as the judge's was, demo/task.py), which GRPO on a CPU budget can change.
2. Three GRPO runs of the same length from it (grpo.train), each rewarded by:
   (a) the program's truth (+1 right, -1 wrong): the ceiling;
   (b) the shipped SFT judge (demo/sft), round robin in both orders;
   (c) the GRPO-trained judge (runs/grpo-demo/hf; trained here first when absent).
   Each step of (b) and (c) also logs how often the judge's reward orders two responses of a group
   against the truth (truth_disagreement: of the pairs whose truth differs, the share the judge
   ranks the wrong one higher, a tie counting 1/2).
3. Every policy's held-out accuracy (greedy, 500 questions of the test split, the program's
   verdict) with its standard error: the table in the README and docs/demo.md.
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import replace

import torch

import grpo
import sft
from demo.task import ARITHMETIC, SHIPPED, arithmetic_pair, chat_pair, rule_check, rule_of, slip, split_of
from rewards import policy_metrics

HASTY = "Sure!"  # the first word of every hasty answer


# ---- the task: questions, answers, the truth ----

def question_pairs(n, seed, split):
    """n (question, careful answer, hasty answer), half arithmetic and half chat, of the split."""
    rng, out = random.Random(f"loop-{split}-{seed}"), []
    while len(out) < n:
        arithmetic = len(out) % 2 == 0
        question, careful, rejected = (arithmetic_pair if arithmetic else chat_pair)(rng)
        if split_of(question) != split:
            continue
        if arithmetic:
            hasty = f"{HASTY} It is {slip(result_of(question), rng)}."
        else:
            hasty = f"{HASTY} {rejected}"
        if truth(question, careful) and not truth(question, hasty):
            out.append((question, careful, hasty))
    return out


def result_of(question) -> int:
    """The right result of an arithmetic question ("What is 7 + 5 - 3?" -> 9)."""
    tokens = ARITHMETIC.fullmatch(question).group(1).split()
    result = int(tokens[0])
    for op, y in zip(tokens[1::2], tokens[2::2]):
        result = result + int(y) if op == "+" else result - int(y)
    return result


def truth(question, response) -> bool:
    """The program's verdict: an arithmetic answer is right when its last number is the result; a
    chat reply when it keeps the question's rule (demo.task.rule_check)."""
    if ARITHMETIC.fullmatch(question):
        numbers = re.findall(r"-?\d+", response)
        return bool(numbers) and int(numbers[-1]) == result_of(question)
    _, kind, args = rule_of(question)
    return bool(response.split()) and rule_check(kind, args, response)[0]


def user(question):
    return [{"role": "user", "content": question}]


def sft_records(n, seed):
    """The policy's distillation: each question answered carefully or hastily, half each."""
    rng = random.Random(f"loop-habits-{seed}")
    return [{"context_messages": user(q), "trace": careful if rng.random() < 0.5 else hasty}
            for q, careful, hasty in question_pairs(n, seed, "train")]


def prompt_records(n, seed, split="train"):
    return [{"context_messages": user(q)} for q, _, _ in question_pairs(n, seed, split)]


class Truth:
    """The program as grpo.py's reward: +1 right, -1 wrong."""
    phase = None

    def __call__(self, completions, texts, records):
        return torch.tensor([1.0 if truth(records[c.prompt_index]["context_messages"][-1]["content"], t) else -1.0
                             for c, t in zip(completions, texts)])

    def metrics(self, rnd, n):
        return policy_metrics(rnd, n)


class Audited:
    """A reward (the judge's) that also says how often it orders a group's responses against the
    program's truth: truth_disagreement, of the pairs of a group whose truth differs, the share it
    rewards the wrong one more (a tie 1/2); truth_accuracy, the share of the round's responses right."""

    def __init__(self, reward):
        self.reward, self.phase, self.last = reward, reward.phase, {}

    def __call__(self, completions, texts, records):
        rewards = self.reward(completions, texts, records)
        right = Truth()(completions, texts, records) > 0
        n = len(completions) // len(records)
        wrong_order = pairs = 0.0
        for g in range(len(records)):
            for i in range(g * n, (g + 1) * n):
                for j in range(g * n, (g + 1) * n):
                    if right[i] and not right[j]:
                        pairs += 1
                        wrong_order += 1.0 if rewards[j] > rewards[i] else 0.5 if rewards[j] == rewards[i] else 0.0
        # the same keys on every rank (their means are all-reduced): NaN when no pair's truth differs
        self.last = {"truth_accuracy": float(right.float().mean()),
                     "truth_disagreement": wrong_order / pairs if pairs else float("nan")}
        return rewards

    def metrics(self, rnd, n):
        return self.reward.metrics(rnd, n) | self.last


# ---- held-out accuracy ----

def held_out_accuracy(model_dir, n=500, seed=0, max_new_tokens=32) -> dict:
    """The policy's greedy answers to n test-split questions, right by the program: the accuracy
    and its standard error, the accuracy on each kind of question, and the share of hasty answers."""
    from rollout import SamplingParams, generate
    from checkpoint import load_pretrained
    import tokenization
    tokenizer = tokenization.load_tokenizer(model_dir)
    model = load_pretrained(model_dir).eval()
    questions = [q for q, _, _ in question_pairs(n, seed, "test")]
    prompts = [tokenization.encode_prompt(tokenizer, user(q), 4096) for q in questions]
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,))
    answers = [tokenizer.decode(c.token_ids, skip_special_tokens=True)
               for c in generate(model, prompts, params, max_batch_size=256)]
    right = [truth(q, a) for q, a in zip(questions, answers)]
    accuracy = sum(right) / n
    arithmetic = [r for q, r in zip(questions, right) if ARITHMETIC.fullmatch(q)]
    chat = [r for q, r in zip(questions, right) if not ARITHMETIC.fullmatch(q)]
    return {"accuracy": accuracy, "standard_error": math.sqrt(accuracy * (1 - accuracy) / (n - 1)),
            "arithmetic": sum(arithmetic) / len(arithmetic), "chat": sum(chat) / len(chat),
            "hasty": sum(a.startswith(HASTY) for a in answers) / n}


# ---- the stages ----

POLICY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "policy")  # the shipped policy: --rebuild_policy makes it
GRPO_JUDGE = "runs/grpo-demo/hf"                 # the README's GRPO judge (torchrun --nproc_per_node=2 grpo.py)
POLICY_SFT = dict(examples=8000, epochs=4, lr=1e-3)  # from the shipped judge: it already copies and adds
GRPO = dict(lr=1e-4, rollout_batch_size=16, mini_batch_size=16, n_samples=4, micro_batch_tokens=2048,
            max_prompt_len=256, max_response_len=32, kl_coef=1e-3, bf16=False, activation_checkpointing=False,
            rollout_slots=128, judge_max_new_tokens=160, judge_method="round_robin")


EVERY = 10  # steps between the exports whose held-out accuracy draws each run's curve


def rebuild_policy(out, seed=0) -> str:
    """The policy, distilled from the shipped judge's weights (which already quote and add: the
    judge's demo taught it) on POLICY_SFT's answers; exported to demo/policy."""
    import distributed
    cfg = sft.SFTConfig(model=SHIPPED, out=os.path.join(out, "policy-sft"), export=POLICY, lr=POLICY_SFT["lr"],
                        warmup_steps=10, schedule="cosine", batch_size=32, max_len=256, epochs=POLICY_SFT["epochs"],
                        bf16=False, activation_checkpointing=False, weight_decay=0.01, seed=seed)
    with distributed.running():
        sft.train(cfg, preset="demo-loop", records=lambda: sft_records(POLICY_SFT["examples"], seed))
    return POLICY


def grpo_judge(out) -> str:
    """The GRPO-trained demo judge: the README's run, one this command trained before, or trained
    now (the judge's own demo command; one killed goes on from its checkpoint)."""
    path = os.path.join(out, "grpo-judge")
    for done in (GRPO_JUDGE, os.path.join(path, "hf")):
        if os.path.isfile(os.path.join(done, "model.safetensors")):
            return done
    import subprocess
    import sys
    resume = ["--resume"] if os.path.exists(os.path.join(path, "latest")) else []
    if os.path.isdir(path) and not resume:
        shutil.rmtree(path)  # started, no checkpoint yet: start again
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "grpo.py", "--out", path,
                    *resume], check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(path, "hf")


def policy_run(name, judge, out, steps, seed=0) -> dict:
    """One GRPO run of `steps` steps from the shipped policy, rewarded by the program's truth (judge
    None) or by the judge in directory `judge` (round robin, audited against the truth); the
    held-out accuracy of its export and its steps' figures. A run that finished is read back, one
    killed goes on from its checkpoint."""
    import distributed
    path = os.path.join(out, f"{name}-{steps}steps-seed{seed}")
    cfg = grpo.GRPOConfig(model=POLICY, out=path, seed=seed, reward="judge" if judge else "verifiable",
                          judge=judge or "", export_every=EVERY, **GRPO)
    if not os.path.isfile(os.path.join(path, "hf", "model.safetensors")):
        cfg = replace(cfg, resume=os.path.exists(os.path.join(path, "latest")))
        if os.path.isdir(path) and not cfg.resume:
            shutil.rmtree(path)  # started, no checkpoint yet: start again
        score = Audited(grpo.build_reward(cfg, None, None)) if judge else Truth()  # in this process: no ctx
        with distributed.running():
            grpo.train(cfg, preset="demo-loop", score=score,
                       records=lambda: prompt_records(steps * cfg.rollout_batch_size, seed))
    logged = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
    disagreement = [s["truth_disagreement"] for s in logged if not math.isnan(s.get("truth_disagreement", math.nan))]
    # the held-out accuracy along the run: its exports every EVERY steps (hf/step_N), then its end (hf)
    curve = {int(d[len("step_"):]): held_out_accuracy(os.path.join(path, "hf", d))["accuracy"]
             for d in sorted(os.listdir(os.path.join(path, "hf"))) if d.startswith("step_")}
    return held_out_accuracy(os.path.join(path, "hf")) | {
        "steps": len(logged), "curve": curve,
        "truth_disagreement": sum(disagreement) / len(disagreement) if disagreement else None,
        # the share of steps whose rewards ordered more of the pairs against the truth than with it
        "steps_against_truth": sum(d > 0.5 for d in disagreement) / len(disagreement) if disagreement else None}


def said(r) -> str:
    return (f"{100 * r['accuracy']:.1f} +- {100 * r['standard_error']:.1f}% right on 500 held-out questions "
            f"(arithmetic {100 * r['arithmetic']:.1f}%, chat {100 * r['chat']:.1f}%; hasty {100 * r['hasty']:.1f}%)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/loop")
    parser.add_argument("--steps", type=int, default=60, help="GRPO steps of each run (16 prompts x 4 answers)")
    parser.add_argument("--seed", type=int, default=0, help="the GRPO runs' prompts and sampling (the policy's own: 0)")
    parser.add_argument("--rebuild_policy", action="store_true", help="distil demo/policy again first (~3 min)")
    args = parser.parse_args(argv)
    started = time.time()
    if args.rebuild_policy or not os.path.isfile(os.path.join(POLICY, "model.safetensors")):
        rebuild_policy(args.out)
    results = {"start": held_out_accuracy(POLICY)}
    print(f"the policy before GRPO: {said(results['start'])}", flush=True)
    for name, judge in (("truth", None), ("sft-judge", SHIPPED), ("grpo-judge", grpo_judge(args.out))):
        t = time.time()
        results[name] = policy_run(name, judge, args.out, args.steps, args.seed) | {"seconds": time.time() - t}
        r = results[name]
        print(f"{name}: {said(r)}"
              + (f"; the judge against the truth on {100 * r['truth_disagreement']:.1f}% of pairs, "
                 f"{100 * r['steps_against_truth']:.0f}% of steps"
                 if r["truth_disagreement"] is not None else "") + f" ({r['seconds'] / 60:.1f} min)", flush=True)
        along = [(0, results["start"]["accuracy"]), *r["curve"].items(), (r["steps"], r["accuracy"])]
        print("  held out along the run: " + ", ".join(f"step {s} {100 * a:.1f}%" for s, a in along), flush=True)
    results["minutes"] = (time.time() - started) / 60
    path = os.path.join(args.out, f"results-{args.steps}steps-seed{args.seed}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path} ({results['minutes']:.1f} min)")


if __name__ == "__main__":
    main()
