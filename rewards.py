"""Where grpo.py's rewards come from (--reward): RM-R1's verifiable +1/-1, which trains a judge, or
a trained judge's verdicts, which train a policy, in process or over HTTP (serve.py's protocol).

    reward = Verifiable()                                  # --reward verifiable, the default
    reward = Verifiable(both_orders=True)                  # with --consistency_reward (J1)
    reward = InProcessJudge(judge, cfg)                    # --reward judge --judge DIR
    reward = RemoteJudge(url, tokenizer, cfg)              # --reward judge --judge_url URL
    rewards = reward(completions, texts, records)          # one per completion, prompt-major, n a prompt
    reward.metrics(round, n)                               # what a step logs of them (this rank's)

A reward is a callable of a round's completions, their texts and their prompts' records; `phase`
is (what the memory plan calls its device phase, what to change when it does not fit), or None for
a reward computed on the host. grpo.train(score=...) takes any such callable, the demo's program
truth for one (demo/loop.py).
"""

import concurrent.futures
import json
import math
import os
import time
import urllib.error
import urllib.request

import torch

import distributed
import tokenization
from judge import Judge, judge_figures
from reward import consistency_rewards, judge_metrics, parse_verdict, rlvr_rewards


class Verifiable:
    """RM-R1's reward of a judge's trace: +1 when the verdict in its last 80 characters matches the
    record's label, else -1 (reward.rlvr_rewards); the metrics none of the general frameworks log
    for a judge (reward.judge_metrics). both_orders (--consistency_reward): the prompts come in
    pairs, a record and its answers swapped, and a verdict earns +1 only when the one of the same
    sample in the other order is right too (reward.consistency_rewards); `accuracy` stays the
    share of right verdicts (and groups_k_of_n counts right verdicts), all_equal_groups counts
    groups whose consistency rewards are all alike (what --filter_equal_groups drops), and the step
    logs `both_orders_right` (traces whose pair is right in both orders) and `position_consistency`
    (pairs whose two verdicts name the same answer, under the other letter in the other order)."""
    phase = None

    def __init__(self, both_orders=False):
        self.both_orders = both_orders

    def __call__(self, completions, texts, records):
        rewards = rlvr_rewards(completions, texts, records)
        return consistency_rewards(rewards, len(completions) // len(records)) if self.both_orders else rewards

    def metrics(self, rnd, n) -> dict:
        labels = [rnd.records[c.prompt_index]["label"] for c in rnd.completions]
        verdicts = [parse_verdict(t) for t in rnd.texts]
        right = rlvr_rewards(rnd.completions, rnd.texts, rnd.records) if self.both_orders else rnd.rewards
        m = judge_metrics(rnd.completions, labels, right, verdicts, n)
        if self.both_orders:  # traces s of a group's two prompts are a pair (consistency_rewards)
            # the same answer is shown under the other letter in the other order: the letters differ
            letters = torch.tensor([{"A": 1, "B": 2}.get(v, 0) for v in verdicts]).view(-1, 2, n // 2)
            same = (letters[:, 0] > 0) & (letters[:, 1] > 0) & (letters[:, 0] != letters[:, 1])
            rewards = rnd.rewards.view(-1, n)
            m.update(reward=rnd.rewards.mean(), both_orders_right=(rnd.rewards > 0).float().mean(),
                     position_consistency=same.float().mean(),
                     all_equal_groups=(rewards == rewards[:, :1]).all(-1).float().mean())
        return {k: float(v) for k, v in m.items()}


def policy_metrics(rnd, n) -> dict:
    """A policy's round, whatever rewards it: the rewards' mean and spread within groups, how many
    groups are all alike (they teach nothing), response lengths, truncation."""
    rewards = rnd.rewards.view(-1, n)
    lengths = torch.tensor([float(len(c.token_ids)) for c in rnd.completions])
    return {"reward": float(rewards.mean()), "reward_group_std": float(rewards.std(-1).mean()),
            "all_equal_groups": float((rewards == rewards[:, :1]).all(-1).float().mean()),
            "response_len": float(lengths.mean()), "response_len_max": float(lengths.max()),
            "truncated": sum(c.finish_reason == "length" for c in rnd.completions) / len(rnd.completions)}


def judgments_per_group(method, n) -> int:
    """Judge prompts Judge.rewards samples for a group of n (judge.py's costs)."""
    return {"round_robin": n * (n - 1), "knockout": 2 * (n - 1), "reference": 2 * n}[method]


class InProcessJudge:
    """A trained judge, loaded once on this run's ranks (frozen; bf16 on CUDA; 1/judge_tp of it per
    rank under --judge_tp), that ranks each prompt's n responses with Judge.rewards (--judge_method)
    between the rollout and the updates; its KV pool takes what the rollout's gave back. Under the
    memory plan (ctx.simulated) it walks its sampler with the most judge prompts of the longest
    length instead: no text to judge."""

    def __init__(self, judge: Judge, cfg):
        self.judge, self.method, self.last = judge, cfg.judge_method, {}
        self.phase = (f"judge: {'TP ' if judge.ctx is not None and judge.ctx.tp_mesh is not None else ''}KV pool, "
                      f"{judgments_per_group(cfg.judge_method, cfg.n_samples)} judge prompts a group",
                      "--judge_url (a judge on other machines), a larger --judge_tp, --judge_method knockout, "
                      "or a lower --judge_max_new_tokens")

    def __call__(self, completions, texts, records):
        n = len(completions) // len(records)
        if self.judge.ctx is not None and self.judge.ctx.simulated:
            count = judgments_per_group(self.method, n) * len(records)
            self.judge.judge([[0] * self.judge.max_prompt_len] * count, list(range(count)))
            return torch.zeros(len(completions))
        groups = [(r["context_messages"], texts[p * n:(p + 1) * n], *([r["reference"]] if self.method == "reference"
                                                                          else [])) for p, r in enumerate(records)]
        result = self.judge.rewards(groups, self.method)
        self.last = judge_figures(result)  # its time is the step's time_judge (the phase's)
        return torch.tensor([r for g in result for r in g.rewards])

    def metrics(self, rnd, n) -> dict:
        return policy_metrics(rnd, n) | self.last


class RewardUnavailable(RuntimeError):
    """The reward server did not answer with rewards after every retry: no step is taken on made-up
    rewards; the run stops with a checkpoint (grpo.train)."""


# What a step logs of serve.py's extra_logs: groups ranked whole, and the judge's figures (judge.judge_figures)
SERVED_LOGS = ("group_complete", "judge_calls_per_response", "invalid_verdicts", "position_consistency", "too_long")


class RemoteJudge:
    """A judge served elsewhere (serve.py, or any server of OpenRLHF's remote reward protocol): each
    rank posts its prompts' responses, each a query of the prompt and the response as the policy's
    tokenizer writes them (special tokens kept), a group never split between requests, in requests
    of at most MAX_QUERIES queries and MAX_BYTES bytes (serve.py's caps are 4096 and 16 MB) sent at
    once, so the server ranks them together. With RM_R1_API_KEY set, each carries it as a bearer
    key (serve.py --api_key). A request that fails is tried again (--judge_retries, after 1, 2, 4,
    ... s; each waits --judge_timeout_min), unless the server refused it (a 4xx other than 408 and
    429: the same request would be refused again). An answer counts only with one finite number
    per query. Unless every rank has its rewards, every rank raises RewardUnavailable, with what
    the server answered."""
    phase = None
    MAX_QUERIES, MAX_BYTES = 1024, 8 * 2**20

    def __init__(self, url, tokenizer, cfg):
        self.url = url if url.rstrip("/").endswith("/get_reward") else url.rstrip("/") + "/get_reward"
        self.tokenizer, self.method, self.retries = tokenizer, cfg.judge_method, cfg.judge_retries
        self.timeout_s, self.last = 60.0 * cfg.judge_timeout_min, {}
        key = os.environ.get("RM_R1_API_KEY", "")
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def __call__(self, completions, texts, records):
        start = time.time()
        n = len(completions) // len(records)
        prompts = [tokenization.chat_text(self.tokenizer, r["context_messages"]) for r in records]
        bodies, size = [], self.MAX_BYTES
        for p, record in enumerate(records):  # whole groups a request, within the caps
            group = completions[p * n:(p + 1) * n]
            query = [prompts[p] + self.tokenizer.decode(c.token_ids, skip_special_tokens=False) for c in group]
            grows = sum(len(q.encode()) + len(prompts[p].encode()) + 16 for q in query)
            if size + grows > self.MAX_BYTES or len(bodies[-1]["query"]) + n > self.MAX_QUERIES:
                bodies.append({"query": [], "prompts": [], **({"labels": []} if self.method == "reference" else {})})
                size = 0
            bodies[-1]["query"] += query
            bodies[-1]["prompts"] += [prompts[p]] * n
            if self.method == "reference":
                bodies[-1]["labels"] += [record["reference"]] * n
            size += grows
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(self.post, bodies))
        error = next((e for _, e in answers if e is not None), None)
        if distributed.max_over_ranks(int(error is not None)):
            raise RewardUnavailable(error or "another rank's requests to the reward server failed")
        rewards = [r for answer, _ in answers for r in answer["rewards"]]
        # the same keys on every rank (their means are all-reduced), whatever a server logs: NaN when absent
        served = [answer.get("extra_logs", {}) for answer, _ in answers]
        logs = {k: [x for log in served if isinstance(log.get(k), list) for x in log[k] if isinstance(x, (int, float))]
                for k in SERVED_LOGS}
        self.last = {k: sum(v) / len(v) if v else math.nan for k, v in logs.items()} | {"time_judge": time.time() - start}
        return torch.tensor([float(r) for r in rewards])

    def post(self, body) -> tuple[dict | None, str | None]:
        """(the server's answer, None), or (None, what went wrong on the last try)."""
        data = json.dumps(body).encode()
        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=self.headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    answer = json.loads(response.read())
                error = self.check(answer, len(body["query"]))
                if error is None:
                    return answer, None
            except urllib.error.HTTPError as e:
                error = f"{self.url} answered {e.code}: {e.read()[:300].decode(errors='replace')}"
                if 400 <= e.code < 500 and e.code not in (408, 429):
                    break  # refused: the same request would be refused again
            except Exception as e:  # unreachable, reset, cut off mid-answer, not JSON: try again
                error = f"{self.url}: {type(e).__name__}: {e}"
            distributed.log(f"reward server, try {attempt + 1} of {self.retries + 1}: {error}")
        return None, f"{error} (after {attempt + 1} tries)"

    def check(self, answer, queries) -> str | None:
        """What is wrong with an answer, or None: a finite number per query, extra_logs a dict."""
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(rewards, list) or len(rewards) != queries:
            return f"{self.url} answered {len(rewards) if isinstance(rewards, list) else 'no list of'} rewards " \
                   f"for {queries} queries: {str(answer)[:300]}"
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in rewards):
            return f"{self.url} answered rewards that are not all finite numbers: {str(rewards)[:300]}"
        if not isinstance(answer.get("extra_logs", {}), dict):
            return f"{self.url} answered extra_logs that are not an object: {str(answer['extra_logs'])[:300]}"
        return None

    def metrics(self, rnd, n) -> dict:
        return policy_metrics(rnd, n) | self.last

