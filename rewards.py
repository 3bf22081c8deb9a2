"""Where grpo.py's rewards come from (--reward): RM-R1's verifiable +1/-1, which trains a judge, or
a trained judge's verdicts, which train a policy, in process or over HTTP (serve.py's protocol).

    reward = Verifiable()                                  # --reward verifiable, the default
    reward = InProcessJudge(judge, cfg)                    # --reward judge --judge DIR
    reward = RemoteJudge(url, tokenizer, cfg)              # --reward judge --judge_url URL
    rewards = reward(completions, texts, records)          # one per completion, prompt-major, n a prompt
    reward.metrics(round, n)                               # what a step logs of them (this rank's)

A reward is a callable of a round's completions, their texts and their prompts' records; `phase`
is (what the memory plan calls its device phase, what to change when it does not fit), or None for
a reward computed on the host. grpo.train(score=...) takes any such callable, the demo's program
truth for one (demo/loop.py).
"""

import json
import time
import urllib.error
import urllib.request

import torch

import distributed
import tokenization
from judge import Judge, judge_figures
from reward import judge_metrics, parse_verdict, rlvr_rewards


class Verifiable:
    """RM-R1's reward of a judge's trace: +1 when the verdict in its last 80 characters matches the
    record's label, else -1 (reward.rlvr_rewards); the metrics none of the general frameworks log
    for a judge (reward.judge_metrics)."""
    phase = None

    def __call__(self, completions, texts, records):
        return rlvr_rewards(completions, texts, records)

    def metrics(self, rnd, n) -> dict:
        labels = [rnd.records[c.prompt_index]["label"] for c in rnd.completions]
        verdicts = [parse_verdict(t) for t in rnd.texts]
        return {k: float(v) for k, v in judge_metrics(rnd.completions, labels, rnd.rewards, verdicts, n).items()}


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


class RemoteJudge:
    """A judge served elsewhere (serve.py, or any server of OpenRLHF's remote reward protocol): each
    rank posts its prompts' responses, each a query of the prompt and the response as the policy's
    tokenizer writes them (special tokens kept), whole groups in one request, so the server ranks
    each prompt's n responses together at once. A failed request is retried (--judge_retries, a
    second, then 2, 4, ... apart); when every rank has not got its rewards, every rank raises
    RewardUnavailable with what the server answered."""
    phase = None

    def __init__(self, url, tokenizer, cfg, timeout_s=600.0):
        self.url = url if url.rstrip("/").endswith("/get_reward") else url.rstrip("/") + "/get_reward"
        self.tokenizer, self.method, self.retries, self.timeout_s = tokenizer, cfg.judge_method, cfg.judge_retries, timeout_s
        self.last = {}

    def __call__(self, completions, texts, records):
        start = time.time()
        prompts = [tokenization.chat_text(self.tokenizer, r["context_messages"]) for r in records]
        queries = [prompts[c.prompt_index] + self.tokenizer.decode(c.token_ids, skip_special_tokens=False)
                   for c in completions]
        body = {"query": queries, "prompts": [prompts[c.prompt_index] for c in completions]}
        if self.method == "reference":
            body["labels"] = [records[c.prompt_index]["reference"] for c in completions]
        answer, error = self.post(body)
        if distributed.max_over_ranks(int(error is not None)):
            raise RewardUnavailable(error or "another rank's requests to the reward server failed")
        rewards = answer["rewards"]
        if len(rewards) != len(queries) or not all(isinstance(r, (int, float)) for r in rewards):
            raise RewardUnavailable(f"{self.url} answered {len(rewards)} rewards for {len(queries)} queries")
        logs = answer.get("extra_logs", {})
        self.last = {k: sum(v) / len(v) for k, v in logs.items() if isinstance(v, list) and v
                     and all(isinstance(x, (int, float)) for x in v) and k != "group_size"}
        self.last["time_judge"] = time.time() - start  # no device phase: timed here
        return torch.tensor([float(r) for r in rewards])

    def post(self, body) -> tuple[dict | None, str | None]:
        """(the server's answer, None), or (None, what went wrong on the last try)."""
        data = json.dumps(body).encode()
        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    answer = json.loads(response.read())
                if isinstance(answer, dict) and isinstance(answer.get("rewards"), list):
                    return answer, None
                error = f"{self.url} answered without a list of rewards: {str(answer)[:300]}"
            except urllib.error.HTTPError as e:
                error = f"{self.url} answered {e.code}: {e.read()[:300].decode(errors='replace')}"
            except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
                error = f"{self.url}: {e}"
            distributed.log(f"reward server, try {attempt + 1} of {self.retries + 1}: {error}")
        return None, f"{error} (after {self.retries + 1} tries)"

    def metrics(self, rnd, n) -> dict:
        return policy_metrics(rnd, n) | self.last

