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

import hashlib
import json
import math
import zlib
from dataclasses import dataclass

import torch

import data
import tokenization
import rollout
import tp
from checkpoint import load_config, load_pretrained
from model import on_meta
from plan import PlaceholderTokenizer
from scheduler import as_prompts
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
                 max_new_tokens=8192, max_prompt_len=4096, batch_size=64, ctx=None, gather=False):
        if samples < 1 or temperature < 0 or (samples > 1 and temperature == 0):
            raise ValueError(f"samples={samples}, temperature={temperature}: samples must be >= 1, and more than "
                             f"one needs a temperature > 0 (greedy samples are all alike)")
        self.model, self.tokenizer, self.style = model, tokenizer, style
        self.samples, self.temperature, self.seed = samples, temperature, seed
        self.max_new_tokens, self.max_prompt_len, self.batch_size, self.ctx = (
            max_new_tokens, max_prompt_len, batch_size, ctx)
        # gather: each rank brings prompts of its own (grpo.py's judge reward), which a TP group
        # decodes together (tp.generate_in_group); else a TP group's ranks judge the same prompts (eval.py)
        self.gather = gather and ctx is not None

    @classmethod
    def load(cls, path, ctx=None, **how):
        """The judge in HF directory `path`: whole on this process's device (bf16 on CUDA), or
        under torchrun with ctx.tp_mesh, this rank's 1/tp of it (tp.load). Under the memory plan
        (ctx.simulated, a GPU run's dtype) its weights are built but not read, and only its
        config.json is: the tokenizer is a placeholder."""
        device = ctx.device if ctx is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" or (ctx is not None and ctx.gpu) else torch.float32
        mesh = ctx.tp_mesh if ctx is not None else None
        if ctx is not None and ctx.simulated:
            config = load_config(path)
            model = tp.build(config, mesh, dtype, device) if mesh is not None else on_meta(config, dtype).materialize(device)
            return cls(model.eval().requires_grad_(False), PlaceholderTokenizer(config.vocab_size - 1), ctx=ctx, **how)
        model = tp.load(path, mesh, dtype, device) if mesh is not None else load_pretrained(path, dtype=dtype, device=device)
        return cls(model, tokenization.load_tokenizer(path), ctx=ctx, **how)

    def prompt(self, chosen, rejected, chosen_position) -> list[int]:
        """The judge prompt's token ids with the chosen conversation shown at chosen_position."""
        a, b = place(chosen, rejected, chosen_position == "A")
        return tokenization.chat_ids(self.tokenizer, data.build_judge_messages(a, b, self.style), add_generation_prompt=True)

    def judge(self, prompts, keys) -> list[Judgments]:
        """K judgments of each prompt (token ids; keys: their noise keys, from noise_key)."""
        params = rollout.SamplingParams(temperature=self.temperature, max_new_tokens=self.max_new_tokens, n=self.samples,
                                stop_token_ids=(self.tokenizer.eos_token_id,), seed=self.seed % 2**32)
        if self.gather:
            completions, _ = tp.generate_in_group(self.model, as_prompts(prompts, keys), params, self.ctx,
                                                  max_batch_size=self.batch_size)
        else:
            # a TP group's ranks must schedule alike: one KV budget for all of them
            budget = tp.kv_budget(None, self.ctx) if self.ctx is not None else None
            completions = rollout.generate(self.model, prompts, params, max_batch_size=self.batch_size,
                                           prompt_keys=keys, kv_budget_bytes=budget)
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
        comes back with `too_long` set; the others are judged all the same, in one sampler call.
        A judgment's noise is keyed by what it shows (the prompt, the answer at A, the answer at
        B), so (p, x, y) shown with y first and (p, y, x) shown as given are the same judgment,
        with the same samples, whatever else the call holds or its order."""
        orders = ("A", "B") if both_orders else ("A",)
        units, prompts, keys, too_long = [], [], [], {}
        for i, (question, a, b) in enumerate(items):
            context = [{"role": "user", "content": question}] if isinstance(question, str) else list(question)
            convs = [context + [{"role": "assistant", "content": answer}] for answer in (a, b)]
            for position in orders:  # "chosen" here is answer a
                ids = self.prompt(*convs, position)
                if len(ids) > self.max_prompt_len:
                    too_long[i] = max(too_long.get(i, 0), len(ids))
                shown = (a, b) if position == "A" else (b, a)
                units.append((i, position))
                prompts.append(ids)
                keys.append(noise_key(json.dumps([context, *shown], sort_keys=True), ""))
        fits = [k for k, (i, _) in enumerate(units) if i not in too_long]
        # gathering over a TP group, a rank with nothing to judge still joins its group's sampler
        judged = self.judge([prompts[k] for k in fits], [keys[k] for k in fits]) \
            if fits or self.gather else []
        per_item = [[] for _ in items]
        for k, j in zip(fits, judged):
            i, position = units[k]
            per_item[i].append((position, j))
        return [Verdict.of(orders) if i not in too_long else Verdict.too_long_by(too_long[i], self.max_prompt_len)
                for i, orders in enumerate(per_item)]

    def rewards(self, groups, method="round_robin", bradley_terry=False) -> list["GroupRewards"]:
        """One reward per response of each group, from pairwise verdicts in both answer orders.
        A group is (prompt, responses) or (prompt, responses, reference): prompt a string or the
        messages before the answer, responses and reference strings. Methods, with their cost in
        judge prompts per group of n (each sampled K times):
        - round_robin, n(n - 1): every pair in both orders; a response's reward is its share of
          points against the others (a win 1, a tie or no verdict 1/2, a loss 0, per judgment),
          mapped to [-1, 1]; with bradley_terry, Bradley-Terry scores fitted to the same
          outcomes instead (mean 0; GroupRewards.bradley_terry holds them either way);
        - knockout, 2(n - 1): RRM's bracket (arXiv 2505.14674), seeded by the responses' texts,
          each match in both orders (more points wins; a drawn match goes by a seeded coin,
          recorded in Match.coin; an odd one out advances without a match); a response's reward
          is the round it reached, -1 (out in round 1) to 1 (the winner);
        - reference, 2n: each response against the group's reference answer; +1 for a win in both
          orders, -1 for a loss in both, 0 otherwise.
        Every group's judgments go to the sampler in one call (knockout: one call per round). A
        response's reward depends on the texts alone, not on the batch, the order of its group
        (round robin, reference; a knockout bracket is drawn from the texts) or the ranks."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        groups = [Group.of(g, k, method) for k, g in enumerate(groups)]
        if method == "knockout":
            return knockout(self, groups)
        pairs = [[(i, j) for i in range(len(g.responses)) for j in range(i + 1, len(g.responses))]
                 if method == "round_robin" else [(i, -1) for i in range(len(g.responses))] for g in groups]
        verdicts = iter(self.compare([(g.context, g.text(i), g.text(j)) for g, ps in zip(groups, pairs)
                                      for i, j in ps], both_orders=True))
        out = []
        for g, ps in zip(groups, pairs):
            matches = [Match(i, j, points(v), v) for (i, j), v in zip(ps, verdicts)]
            n = len(g.responses)
            if method == "reference":
                rewards = [{2.0: 1.0, 0.0: -1.0}.get(m.points, 0.0) for m in matches]
                out.append(GroupRewards.of(rewards, matches))
                continue
            won = [0.0] * n
            for m in matches:
                won[m.i] += m.points
                won[m.j] += 2 - m.points
            fitted = fit_bradley_terry(n, [(m.i, m.j, m.points / 2) for m in matches])
            rewards = fitted if bradley_terry else [2 * w / (2 * (n - 1)) - 1 if n > 1 else 0.0 for w in won]
            out.append(GroupRewards.of(rewards, matches, fitted))
        return out


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


# ---- per-response rewards for a group of responses, from pairwise verdicts ----

METHODS = ("round_robin", "knockout", "reference")
# An order's points for the answer shown as a: a win, a tie of votes, no verdict, a loss.
POINTS = {"chosen": 1.0, "tie": 0.5, None: 0.5, "rejected": 0.0}


@dataclass
class Group:
    """A group to reward: the conversation before the answer, the responses, the reference answer."""
    context: list
    responses: list[str]
    reference: str | None

    @classmethod
    def of(cls, group, k, method) -> "Group":
        if not isinstance(group, (tuple, list)) or len(group) not in (2, 3):
            raise ValueError(f"groups[{k}] must be (prompt, responses) or (prompt, responses, reference)")
        prompt, responses, reference = (*group, None) if len(group) == 2 else group
        if isinstance(responses, str) or not responses or not all(isinstance(r, str) for r in responses):
            raise ValueError(f"groups[{k}]: responses must be a non-empty list of strings")
        if method == "reference" and not isinstance(reference, str):
            raise ValueError(f"groups[{k}]: method 'reference' needs a reference answer (a string) with the group")
        return cls(judged_context(prompt), list(responses), reference)

    def text(self, i) -> str:
        """Response i, or the reference for i = -1."""
        return self.reference if i == -1 else self.responses[i]


@dataclass
class Match:
    """One pair judged in both orders: response i (shown as a) against response j (-1: the
    reference), i's points over the two orders (POINTS each) and the Verdict; a drawn knockout
    match also says which of i and j the seeded coin sent on."""
    i: int
    j: int
    points: float
    verdict: Verdict
    coin: int | None = None


@dataclass
class GroupRewards:
    """Judge.rewards' answer for one group: a reward per response and what it is made of."""
    rewards: list[float]
    matches: list[Match]
    judge_calls: int             # judge prompts sampled (each K times); prompts too long are not
    invalid_verdicts: float      # share of the sampled judgments that name no answer
    consistency: float | None    # share of the matches judged in both orders whose outcomes agree
    too_long: int                # matches not judged: a judge prompt over max_prompt_len
    bradley_terry: list[float] | None = None  # round robin: scores fitted to its outcomes (mean 0)

    @classmethod
    def of(cls, rewards, matches, fitted=None) -> "GroupRewards":
        judged = [m for m in matches if m.verdict.too_long is None]
        votes = [v for m in judged for _, j in m.verdict.orders for v in j.verdicts]
        return cls(rewards, matches, sum(len(m.verdict.orders) for m in judged),
                   sum(v is None for v in votes) / max(1, len(votes)),
                   sum(bool(m.verdict.consistent) for m in judged) / len(judged) if judged else None,
                   len(matches) - len(judged), fitted)


def judged_context(prompt) -> list[dict]:
    """The conversation before the answer as the judge's templates take it: a string is one user
    turn; a leading system turn (a policy's chat template often adds one) is folded into the first
    user turn, since RM-R1's templates have no place for it and what it asks may matter."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if len(messages) > 1 and messages[0].get("role") == "system":
        system, first = messages[0], messages[1]
        messages = [{"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}, *messages[2:]]
    return messages


def points(verdict: Verdict) -> float:
    """Answer a's points over the orders a comparison was judged in (no order judged: 1/2 each)."""
    if verdict.too_long is not None:
        return 1.0
    return sum(POINTS[outcome(judged.verdicts, position)] for position, judged in verdict.orders)


def fit_bradley_terry(n, outcomes, prior=0.01, steps=50) -> list[float]:
    """Bradley-Terry scores s (mean 0) of n players from (i, j, w) outcomes, w the share of the
    judgment player i won (1, 1/2, 0): the maximum of sum w log sigma(s_i - s_j) + (1 - w) log
    sigma(s_j - s_i) - prior / 2 |s|^2 (the prior keeps a player who won everything finite), by
    Newton's method on the concave objective."""
    s = torch.zeros(n, dtype=torch.float64)
    if n < 2 or not outcomes:
        return s.tolist()
    i, j, w = (torch.tensor(x, dtype=torch.float64) for x in zip(*outcomes))
    i, j = i.long(), j.long()
    for _ in range(steps):
        p = torch.sigmoid(s[i] - s[j])
        g = torch.zeros(n, dtype=torch.float64).index_add(0, i, w - p).index_add(0, j, p - w) - prior * s
        c = p * (1 - p)
        h = -prior * torch.eye(n, dtype=torch.float64)
        h.index_put_((i, i), -c, accumulate=True)
        h.index_put_((j, j), -c, accumulate=True)
        h.index_put_((i, j), c, accumulate=True)
        h.index_put_((j, i), c, accumulate=True)
        step = torch.linalg.solve(h, g)
        s = s - step
        if step.abs().max() < 1e-12:
            break
    return (s - s.mean()).tolist()


def coin(*texts) -> int:
    """0 or 1, a stable hash of the texts (a drawn knockout match's, the bracket's order)."""
    return hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).digest()[0] % 2


def knockout(judge: Judge, groups: list[Group]) -> list[GroupRewards]:
    """Judge.rewards' knockout: each group's bracket round by round, every group's matches of a
    round judged in one call."""
    brackets = [sorted(range(len(g.responses)), key=lambda i, g=g: (hashlib.sha256(
        json.dumps([judge.seed, g.context, g.responses[i]]).encode()).hexdigest(), i)) for g in groups]
    reached = [[1] * len(g.responses) for g in groups]
    played = [[] for _ in groups]
    while any(len(b) > 1 for b in brackets):
        pairs = [(k, b[m], b[m + 1]) for k, b in enumerate(brackets) for m in range(0, len(b) - 1, 2)]
        verdicts = judge.compare([(groups[k].context, groups[k].text(i), groups[k].text(j)) for k, i, j in pairs],
                                 both_orders=True)
        winners = [[] for _ in groups]
        for (k, i, j), v in zip(pairs, verdicts):
            match = Match(i, j, points(v), v)
            if match.points == 1.0:  # drawn: a seeded coin decides, recorded
                match.coin = (i, j)[coin(judge.seed, groups[k].context, *sorted((groups[k].text(i), groups[k].text(j))))]
            played[k].append(match)
            winners[k].append(match.coin if match.coin is not None else i if match.points > 1 else j)
        for k, b in enumerate(brackets):
            if len(b) > 1:
                brackets[k] = winners[k] + ([b[-1]] if len(b) % 2 else [])  # the odd one out advances
                for i in brackets[k]:
                    reached[k][i] += 1
    out = []
    for g, r, matches in zip(groups, reached, played):
        rounds = math.ceil(math.log2(len(g.responses))) if len(g.responses) > 1 else 0
        out.append(GroupRewards.of([-1 + 2 * (x - 1) / rounds if rounds else 0.0 for x in r], matches))
    return out


# ---- the judge as a reward for the trainers people use ----

def reward_function(judge, method="round_robin", group_size=None, reference_column="reference", bradley_terry=False):
    """A reward function for TRL's GRPOTrainer, a few lines over Judge.rewards:

        from judge import reward_function
        trainer = GRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", train_dataset=dataset,
                              reward_funcs=[reward_function("runs/grpo-demo/hf", group_size=8)],
                              args=GRPOConfig(num_generations=8, per_device_train_batch_size=8, ...))

    `judge` is a Judge or a judge's directory (Judge.load). TRL calls it with prompts, completions
    (strings, or message lists for a conversational dataset), completion_ids and every dataset
    column as lists; a prompt's num_generations completions come one after another, and each
    group_size of them (default: each run of the same prompt) are ranked together, so a process
    must be handed whole groups (per_device_train_batch_size a multiple of num_generations).
    With method "reference" the reference answers are the dataset's `reference_column`. Returns
    one float per completion; the judge's own figures go to TRL's log_metric when it passes one."""
    judge = Judge.load(judge) if isinstance(judge, str) else judge

    def rm_r1_judge(prompts, completions, **columns):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        references = columns.get(reference_column) if method == "reference" else None
        if method == "reference" and references is None:
            raise ValueError(f"method 'reference' needs the dataset column {reference_column!r} (reference_column)")
        spans = consecutive(prompts, group_size)
        groups = [(prompts[a], texts[a:b], *([references[a]] if references is not None else [])) for a, b in spans]
        result = judge.rewards(groups, method, bradley_terry)
        log = columns.get("log_metric")
        if log is not None:
            for name, value in judge_figures(result).items():
                log(f"rm_r1/{name}", value)
        return [r for g in result for r in g.rewards]
    return rm_r1_judge


def verl_compute_score(judge, method="round_robin", prompt_key="question", bradley_terry=False):
    """compute_score for verl's batch reward manager (reward_model.reward_manager=batch), a few
    lines over Judge.rewards:

        # my_reward.py, named by custom_reward_function.path=my_reward.py custom_reward_function.name=compute_score
        from judge import verl_compute_score
        compute_score = verl_compute_score("runs/grpo-demo/hf", prompt_key="question")

    verl calls it with data_sources, solution_strs (the responses), ground_truths and extra_infos,
    one per response; the prompt is extra_info[prompt_key] (verl passes no prompt text, so the
    data preprocessing must put it there), each run of consecutive responses to one prompt (verl
    repeats a prompt's rollout.n responses one after another) is ranked together, and with method
    "reference" the ground truth is the reference answer. Returns, per response, a dict whose
    "score" is the reward and whose other entries verl logs."""
    judge = Judge.load(judge) if isinstance(judge, str) else judge

    def compute_score(data_sources, solution_strs, ground_truths, extra_infos, **kwargs):
        missing = [k for k, info in enumerate(extra_infos) if not isinstance(info, dict) or prompt_key not in info]
        if missing:
            raise ValueError(f"extra_infos[{missing[0]}] has no {prompt_key!r}: put each prompt's text (or messages) "
                             f"there in the data preprocessing, or name its key with prompt_key")
        prompts = [info[prompt_key] for info in extra_infos]
        spans = consecutive(prompts, None)
        groups = [(prompts[a], list(solution_strs[a:b]), *([ground_truths[a]] if method == "reference" else []))
                  for a, b in spans]
        result = judge.rewards(groups, method, bradley_terry)
        return [{"score": r, "judge_calls": g.judge_calls / len(g.rewards), "judge_invalid": g.invalid_verdicts,
                 "judge_consistency": g.consistency if g.consistency is not None else float("nan")}
                for g in result for r in g.rewards]
    return compute_score


def consecutive(prompts, group_size) -> list[tuple[int, int]]:
    """(start, end) of each group: every group_size items, or each run of equal prompts. A
    group_size that does not divide the items, or a group with other prompts in it, is an error."""
    if group_size is None:
        starts = [k for k in range(len(prompts)) if k == 0 or prompts[k] != prompts[k - 1]]
        return list(zip(starts, starts[1:] + [len(prompts)]))
    if len(prompts) % group_size:
        raise ValueError(f"{len(prompts)} completions are not whole groups of group_size={group_size}: hand each "
                         f"process whole groups (a per-device batch that num_generations divides)")
    spans = [(a, a + group_size) for a in range(0, len(prompts), group_size)]
    for a, b in spans:
        if any(p != prompts[a] for p in prompts[a:b]):
            raise ValueError(f"completions {a}..{b - 1} are a group of group_size={group_size} but answer "
                             f"different prompts: is group_size the trainer's num_generations?")
    return spans


def judge_figures(result: list[GroupRewards]) -> dict:
    """What a batch of groups' rewards cost and how sure the judge was: judge prompts per
    response, the share of sampled judgments with no verdict, position consistency, prompts too long."""
    responses = sum(len(g.rewards) for g in result)
    consistent = [g.consistency for g in result if g.consistency is not None]
    return {"judge_calls_per_response": sum(g.judge_calls for g in result) / max(1, responses),
            "invalid_verdicts": sum(g.invalid_verdicts for g in result) / max(1, len(result)),
            "position_consistency": sum(consistent) / len(consistent) if consistent else float("nan"),
            "too_long": float(sum(g.too_long for g in result))}
