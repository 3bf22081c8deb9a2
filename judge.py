"""A trained judge as a research tool: votes over sampled judgments, both answer orders, any pairs.

    from judge import Judge
    judge = Judge.load("runs/grpo-demo/hf", samples=8, temperature=1.0)
    verdicts = judge.compare([("What is 2 + 3?", "5", "6")], both_orders=True)
    verdicts[0].pick, verdicts[0].votes, verdicts[0].consistent   # "a", {"a": 15, "b": 1, "none": 0}, True

RM-R1's release judges a pair once, greedily, in one random order; that stays the default (K = 1,
T = 0), and eval.py judges every benchmark through this module. A reasoning judge can spend more
compute at inference: K sampled judgments and their majority (as DeepSeek-GRM votes over sampled
generative rewards), and both answer orders, which shows a judge's position bias (as MT-Bench's
judges are checked). The rules, which the tests check on judgments worked out by hand:
- a sample votes for the answer its verdict names ([[A]] or [[B]] anywhere in its text, as
  reward.parse_verdict reads it); an unparseable judgment votes for neither;
- an order's outcome is the answer with more of its samples' votes; equal votes (at least one each)
  are a tie, and no vote at all is no outcome;
- scored against a known better answer, an outcome is 1 (right), 0 (wrong), a tie 1/2, and no
  outcome 0 (as one unparseable greedy verdict is wrong); with both orders a comparison scores the
  mean of its two orders, so an inconsistent pair counts as a tie;
- a comparison's pick is the answer more of its orders' outcomes name (None when they are equal);
  with both orders it is consistent when both outcomes name the same answer.
Each (comparison, order)'s noise is keyed by its own key, so its samples are the same whatever
else is judged with it, in whatever batch or on however many ranks.
"""

import json
import zlib
from dataclasses import dataclass

import torch

import data
import tokenization
import rollout
import tp
from checkpoint import load_pretrained
from reward import parse_verdict, place


@dataclass
class Judgments:
    """The K sampled judgments of one judge prompt."""
    prompt_tokens: int
    texts: list[str]
    verdicts: list[str | None]   # "A", "B" or None (unparseable), as written
    finish_reasons: list[str]


def outcome(verdicts, chosen_position) -> str | None:
    """"chosen", "rejected", "tie" or None (no vote) of a list of verdict letters, the chosen
    answer shown at chosen_position ("A" or "B")."""
    chosen = sum(v == chosen_position for v in verdicts)
    rejected = sum(v is not None and v != chosen_position for v in verdicts)
    if chosen == rejected:
        return "tie" if chosen else None
    return "chosen" if chosen > rejected else "rejected"


SCORE = {"chosen": 1.0, "tie": 0.5, "rejected": 0.0, None: 0.0}


def score(verdicts, chosen_position) -> float:
    """1 right, 1/2 a tie, 0 wrong or no vote: the outcome of `verdicts` against the chosen answer."""
    return SCORE[outcome(verdicts, chosen_position)]


def pick(outcomes) -> str | None:
    """"chosen" or "rejected": what more of the orders' outcomes name; None when as many name each."""
    chosen, rejected = outcomes.count("chosen"), outcomes.count("rejected")
    return None if chosen == rejected else "chosen" if chosen > rejected else "rejected"


def tally(orders) -> tuple:
    """(pick, votes, consistent) of one comparison from its orders, [(chosen_position, verdicts)]:
    what the orders' outcomes name more ("chosen" / "rejected" / None), every sample's vote
    ({"chosen": n, "rejected": n, "none": n}), and with two orders whether their outcomes name the
    same answer (None with one order)."""
    outcomes = [outcome(verdicts, position) for position, verdicts in orders]
    votes = {"chosen": 0, "rejected": 0, "none": 0}
    for position, verdicts in orders:
        for v in verdicts:
            votes["none" if v is None else "chosen" if v == position else "rejected"] += 1
    consistent = None if len(orders) == 1 else outcomes[0] == outcomes[1] and outcomes[0] in ("chosen", "rejected")
    return pick(outcomes), votes, consistent


def noise_key(uid: str, chosen_position: str) -> int:
    """The sampling-noise key of one (comparison, order): stable across runs, batches and ranks."""
    return zlib.crc32(f"{uid}/{chosen_position}".encode())


class Judge:
    """A judge model with its tokenizer and how it judges: K samples at temperature T (greedy by
    default), at most max_new_tokens each, prompts up to max_prompt_len tokens."""

    def __init__(self, model, tokenizer, style="instruct", samples=1, temperature=0.0, seed=0,
                 max_new_tokens=8192, max_prompt_len=4096, batch_size=64, ctx=None):
        if samples < 1 or temperature < 0 or (samples > 1 and temperature == 0):
            raise ValueError(f"samples={samples}, temperature={temperature}: samples must be >= 1, and more than "
                             f"one needs a temperature > 0 (greedy samples are all alike)")
        self.model, self.tokenizer, self.style = model, tokenizer, style
        self.samples, self.temperature, self.seed = samples, temperature, seed
        self.max_new_tokens, self.max_prompt_len, self.batch_size, self.ctx = (
            max_new_tokens, max_prompt_len, batch_size, ctx)

    @classmethod
    def load(cls, path, ctx=None, **how):
        """The judge in HF directory `path`: whole on this process's device (bf16 on CUDA), or
        under torchrun with ctx.tp_mesh, this rank's 1/tp of it (tp.load)."""
        device = ctx.device if ctx is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = tp.load(path, ctx.tp_mesh, dtype, device) if ctx is not None and ctx.tp_mesh is not None else \
            load_pretrained(path, dtype=dtype, device=device)
        return cls(model, tokenization.load_tokenizer(path), ctx=ctx, **how)

    def prompt(self, chosen, rejected, chosen_position) -> list[int]:
        """The judge prompt's token ids with the chosen conversation shown at chosen_position."""
        a, b = place(chosen, rejected, chosen_position == "A")
        return tokenization.chat_ids(self.tokenizer, data.build_judge_messages(a, b, self.style), add_generation_prompt=True)

    def judge(self, prompts, keys) -> list[Judgments]:
        """K judgments of each prompt (token ids; keys: their noise keys, from noise_key)."""
        params = rollout.SamplingParams(temperature=self.temperature, max_new_tokens=self.max_new_tokens, n=self.samples,
                                stop_token_ids=(self.tokenizer.eos_token_id,), seed=self.seed % 2**32)
        # a TP group's ranks must schedule alike: one KV budget for all of them
        budget = tp.kv_budget(None, self.ctx) if self.ctx is not None else None
        completions = rollout.generate(self.model, prompts, params, max_batch_size=self.batch_size, prompt_keys=keys,
                               kv_budget_bytes=budget)
        texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        out, K = [], self.samples
        for i, ids in enumerate(prompts):
            mine = slice(i * K, (i + 1) * K)
            out.append(Judgments(len(ids), texts[mine], [parse_verdict(t) for t in texts[mine]],
                                 [c.finish_reason for c in completions[mine]]))
        return out

    def compare(self, items, both_orders=False) -> list["Verdict"]:
        """Judge (prompt, answer a, answer b) triples: prompt a string (one user turn) or the
        messages before the answers, a and b strings. Answer a is shown first, or with both_orders
        in both places (one random order is eval.py's way with labeled data). An item whose judge
        prompt is over max_prompt_len is not judged (never cut: a cut pair is another pair) and
        comes back with `too_long` set; the others are judged all the same."""
        orders = ("A", "B") if both_orders else ("A",)
        units, prompts, too_long = [], [], {}
        for i, (question, a, b) in enumerate(items):
            context = [{"role": "user", "content": question}] if isinstance(question, str) else list(question)
            convs = [context + [{"role": "assistant", "content": answer}] for answer in (a, b)]
            for position in orders:  # "chosen" here is answer a
                ids = self.prompt(*convs, position)
                if len(ids) > self.max_prompt_len:
                    too_long[i] = max(too_long.get(i, 0), len(ids))
                units.append((i, position))
                prompts.append(ids)
        judged_units = [(u, ids) for u, ids in zip(units, prompts) if u[0] not in too_long]
        # keyed by what is judged, so an item's samples are the same whatever else this call holds
        keys = [noise_key(json.dumps(items[i], sort_keys=True), position) for (i, position), _ in judged_units]
        judged = self.judge([ids for _, ids in judged_units], keys) if judged_units else []
        per_item = [[] for _ in items]
        for ((i, position), _), j in zip(judged_units, judged):
            per_item[i].append((position, j))
        return [Verdict.of(orders) if i not in too_long else Verdict.too_long_by(too_long[i], self.max_prompt_len)
                for i, orders in enumerate(per_item)]


@dataclass
class Verdict:
    """compare()'s answer for one (prompt, a, b)."""
    pick: str | None           # "a", "b", or None: as many orders' outcomes name each (a tie, no vote)
    votes: dict                # {"a": n, "b": n, "none": n} over every sample of every order
    consistent: bool | None    # both orders: their outcomes name the same answer; None for one order
    orders: list               # per order: (position of a, Judgments)
    too_long: str | None = None  # why it was not judged: its judge prompt is over max_prompt_len

    @classmethod
    def of(cls, orders):
        choice, votes, consistent = tally([(position, judged.verdicts) for position, judged in orders])
        letters = {"chosen": "a", "rejected": "b", "none": "none", None: None}
        return cls(letters[choice], {letters[k]: n for k, n in votes.items()}, consistent, orders)

    @classmethod
    def too_long_by(cls, tokens, max_prompt_len):
        """An item that was not judged: no pick, no votes."""
        return cls(None, {"a": 0, "b": 0, "none": 0}, None, [],
                   f"its judge prompt has {tokens} tokens, over max_prompt_len={max_prompt_len}")
