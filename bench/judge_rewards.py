"""The judge as a reward, on the CPU with the shipped demo judge (greedy, judgments of up to 160 tokens):

    python bench/judge_rewards.py

1. Throughput: responses rewarded per second by Judge.rewards for each method, groups of n = 7
   answers to the demo's arithmetic questions (one right, six with a slip), all of a call's judge
   prompts in one sampler call, against the same judgments made one comparison per call (both
   orders of one pair: what a trainer that asks a pairwise judge pair by pair gets). The ratio.
2. Prefix sharing: prompt positions the prefill computed / positions it was handed, with and
   without sharing the pages of common prefixes between prompts in flight, on eval's 1,000 demo
   pairs and on one group's round robin (42 judge prompts); and the sequences in flight at once
   at equal KV memory (a pool of 12 full-length sequences' pages).
"""

import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import demo  # noqa: E402
from demo.task import arithmetic_pair, working  # noqa: E402
from judge import Judge  # noqa: E402
from kvcache import KVCache  # noqa: E402
from reward import place  # noqa: E402
from rollout import SamplingParams, generate  # noqa: E402

N, GROUPS, NEW_TOKENS = 7, 4, 160


def groups(seed=0):
    """GROUPS questions, each with N answers (the right working and N - 1 slips) and the right one
    as the reference."""
    rng, out = random.Random(seed), []
    while len(out) < GROUPS:
        question, right, _ = arithmetic_pair(rng)
        numbers = [int(x) for x in question.removeprefix("What is ").removesuffix("?").split()[::2]]
        ops = question.removeprefix("What is ").removesuffix("?").split()[1::2]
        wrong = {working(numbers, ops, wrong_step=rng.randrange(len(ops)), rng=rng) for _ in range(40)} - {right}
        wrong = sorted(w for w in wrong if "= -" not in w)
        if len(wrong) >= N - 1:
            out.append((question, [right, *rng.sample(wrong, N - 1)], right))
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def throughput(judge: Judge):
    data = groups()
    responses = sum(len(r) for _, r, _ in data)
    print(f"1. throughput: {GROUPS} groups of {N} responses, greedy, up to {NEW_TOKENS} tokens a judgment")
    print(f"{'method':<12} {'judgments':>9} {'batched resp/s':>15} {'one pair a call':>16} {'ratio':>6}")
    for method in ("round_robin", "knockout", "reference"):
        seconds, result = timed(lambda: judge.rewards(data, method))
        pairs = [(data[k][0], g_text(data[k], m.i), g_text(data[k], m.j)) for k, g in enumerate(result)
                 for m in g.matches]
        alone, _ = timed(lambda: [judge.compare([pair], both_orders=True) for pair in pairs])
        judgments = sum(g.judge_calls for g in result)
        print(f"{method:<12} {judgments:>9} {responses / seconds:>15.2f} {responses / alone:>16.2f} "
              f"{alone / seconds:>5.1f}x", flush=True)


def g_text(group, i):
    question, responses, reference = group
    return reference if i == -1 else responses[i]


def sharing(judge: Judge):
    print("\n2. prefix sharing: prompt positions computed / handed to the prefill; sequences in flight")
    tokenizer = judge.tokenizer
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, stop_token_ids=(tokenizer.eos_token_id,))
    pairs = []
    for c in demo.comparisons(1000, seed=0):
        a, b = place(c.chosen, c.rejected, True)
        pairs.append(judge.prompt(a, b, "A"))
    (question, responses, _), = groups()[:1]
    group = [judge.prompt([{"role": "user", "content": question}, {"role": "assistant", "content": x}],
                          [{"role": "user", "content": question}, {"role": "assistant", "content": y}], "A")
             for i, x in enumerate(responses) for j, y in enumerate(responses) if i != j]
    longest = max(len(p) for p in group) + NEW_TOKENS
    budget = 12 * KVCache.bytes_per_slot(judge.model.config, longest, judge.model.embed_tokens.weight.dtype)
    for name, prompts, kv in (("eval's 1,000 demo pairs", pairs, None), ("one group's round robin (42)", group, budget)):
        rows = {}
        for share in (False, True):
            seconds, (_, stats) = timed(lambda: generate(judge.model, prompts, params, max_batch_size=256,
                                                          kv_budget_bytes=kv, return_stats=True, share_prefixes=share))
            rows[share] = stats
            print(f"  {name}, sharing {'on ' if share else 'off'}: {stats.prefill_tokens:,} of {stats.prompt_tokens:,} "
                  f"positions computed ({stats.prefill_tokens / stats.prompt_tokens:.1%}), {stats.prefill_forwards} "
                  f"prefill forwards, at most {stats.peak_sequences} sequences in flight"
                  + (f" (a pool of {stats.pool_pages} pages)" if kv else "") + f", {seconds:.1f} s", flush=True)
        print(f"  -> computed {rows[True].prefill_tokens / rows[False].prefill_tokens:.3f}x, in flight "
              f"{rows[True].peak_sequences / rows[False].peak_sequences:.2f}x")


def main():
    judge = Judge.load(demo.SHIPPED, max_new_tokens=NEW_TOKENS)
    throughput(judge)
    sharing(judge)


if __name__ == "__main__":
    main()
