"""The judge as a reward (judge.Judge.rewards): round robin, knockout and reference rewards, on verdict
tables worked out by hand; what makes a reward independent of the batch and of the group's order."""

import math
import random
import re

import pytest

import demo
import judge as J
import rollout
from tokenization import load_tokenizer

ANSWER = {side: re.compile(rf"\[The Start of Chatbot {side}'s Response\]\n(.*?)\n\[The End of Chatbot {side}'s Response\]",
                           re.S) for side in "AB"}


class TableJudge:
    """rollout.generate whose judgment of a prompt is verdict(answer shown at A, answer at B): "A",
    "B" or None (no verdict), the same for every sample; records each call's prompts and keys."""

    def __init__(self, monkeypatch, verdict):
        self.tokenizer = load_tokenizer(demo.SHIPPED)
        self.verdict, self.calls, self.shown, self.texts = verdict, [], [], []
        monkeypatch.setattr(rollout, "generate", self)

    def __call__(self, model, prompts, params, **kw):
        self.calls.append((len(prompts), kw.get("prompt_keys")))
        out = []
        for i, ids in enumerate(prompts):
            text = self.tokenizer.decode(ids)
            self.texts.append(text)
            a, b = (ANSWER[side].search(text).group(1) for side in "AB")
            self.shown.append((a, b))
            v = self.verdict(a, b)
            ids = self.tokenizer(f"<answer>[[{v}]]</answer>" if v else "no verdict", add_special_tokens=False)["input_ids"]
            out += [rollout.Completion(i, s, ids, [0.0] * len(ids), "stop") for s in range(params.n)]
        return out

    def judge(self, **how):
        return J.Judge(None, self.tokenizer, **how)


def by_rank(order):
    """A judge that always prefers the answer earlier in `order`."""
    return lambda a, b: "A" if order.index(a) < order.index(b) else "B"


# ---- round robin ----

def test_round_robin_by_hand(monkeypatch):
    # r2 beats both in both orders; r0 vs r1: whichever is shown first wins (position bias): a tie
    def verdict(a, b):
        return "A" if a == "r2" else "B" if b == "r2" else "A"
    fake = TableJudge(monkeypatch, verdict)
    (g,) = fake.judge().rewards([("q", ["r0", "r1", "r2"])])
    # points of 4 judgments each: r0 1 (beat r1 once), r1 1, r2 4 -> shares 1/4, 1/4, 1 -> 2 share - 1
    assert g.rewards == [-0.5, -0.5, 1.0]
    assert g.judge_calls == 6 and len(g.matches) == 3 and fake.calls[0][0] == 6, "n(n - 1) in one call"
    assert g.consistency == pytest.approx(2 / 3) and g.invalid_verdicts == 0 and g.too_long == 0


def test_round_robin_counts_no_verdict_as_half(monkeypatch):
    # r0 at A against r1: no verdict; r1 at A against r0: r1 wins
    fake = TableJudge(monkeypatch, lambda a, b: None if a == "r0" else "A")
    (g,) = fake.judge().rewards([("q", ["r0", "r1"])])
    assert g.rewards == [2 * 0.5 / 2 - 1, 2 * 1.5 / 2 - 1]  # r0: 1/2 + 0 of 2; r1: 1/2 + 1
    assert g.invalid_verdicts == 0.5


def test_round_robin_seven_responses_cost_42_judgments_and_rank_them(monkeypatch):
    order = [f"r{k}" for k in (3, 6, 0, 1, 5, 2, 4)]  # best first
    fake = TableJudge(monkeypatch, by_rank(order))
    (g,) = fake.judge().rewards([("q", [f"r{k}" for k in range(7)])])
    assert g.judge_calls == 42
    # a strict order: the k-th best wins 2 (6 - k) of its 12 judgments
    assert [g.rewards[int(r[1])] for r in order] == pytest.approx([2 * (6 - k) / 6 - 1 for k in range(7)])
    fitted = g.bradley_terry
    assert sorted(range(7), key=lambda i: -fitted[i]) == [int(r[1]) for r in order]
    assert abs(sum(fitted)) < 1e-9


def test_bradley_terry_by_hand():
    # 3 wins of 4 judgments: s0 - s1 = log 3 (with a vanishing prior)
    s = J.fit_bradley_terry(2, [(0, 1, 1.0)] * 3 + [(0, 1, 0.0)], prior=1e-9)
    assert s[0] - s[1] == pytest.approx(math.log(3), abs=1e-6) and s[0] + s[1] == pytest.approx(0)
    # a player who won everything stays finite under the default prior
    assert all(math.isfinite(x) for x in J.fit_bradley_terry(2, [(0, 1, 1.0)] * 4))


def test_bradley_terry_rewards_on_request(monkeypatch):
    fake = TableJudge(monkeypatch, by_rank(["r1", "r0", "r2"]))
    (g,) = fake.judge().rewards([("q", ["r0", "r1", "r2"])], bradley_terry=True)
    assert g.rewards == g.bradley_terry and g.rewards[1] > g.rewards[0] > g.rewards[2]


# ---- knockout ----

def test_knockout_by_hand(monkeypatch):
    order = ["r3", "r2", "r1", "r0"]  # r3 best
    fake = TableJudge(monkeypatch, by_rank(order))
    (g,) = fake.judge().rewards([("q", ["r0", "r1", "r2", "r3"])], method="knockout")
    assert g.judge_calls == 2 * 3 and [n for n, _ in fake.calls] == [4, 2], "a call per round: 2 matches, 1"
    first = g.matches[:2]
    finalist = next(max(m.i, m.j, key=lambda r: -order.index(f"r{r}")) for m in first if 3 not in (m.i, m.j))
    # the winner reached round 3 of 2 (+1), the finalist round 2 (0), the first round's losers -1
    assert g.rewards == [1.0 if r == 3 else 0.0 if r == finalist else -1.0 for r in range(4)]
    assert all(m.coin is None for m in g.matches)


def test_knockout_draws_go_by_a_recorded_seeded_coin_and_an_odd_one_out_advances(monkeypatch):
    fake = TableJudge(monkeypatch, lambda a, b: "A")  # position bias: every match drawn
    (g,) = fake.judge().rewards([("q", ["r0", "r1", "r2"])], method="knockout")
    assert len(g.matches) == 2 and all(m.coin in (m.i, m.j) for m in g.matches)
    first, final = g.matches
    bye = ({0, 1, 2} - {first.i, first.j}).pop()
    assert {final.i, final.j} == {first.coin, bye}
    # 2 rounds: out in round 1 -1, out in round 2 0, the winner 1
    assert g.rewards[final.coin] == 1.0 and g.rewards[({final.i, final.j} - {final.coin}).pop()] == 0.0
    assert g.rewards[({first.i, first.j} - {first.coin}).pop()] == -1.0
    again = fake.judge().rewards([("q", ["r0", "r1", "r2"])], method="knockout")[0]
    assert again.rewards == g.rewards, "seeded: the same coins"


# ---- against a reference ----

def test_reference_by_hand(monkeypatch):
    # r0 beats the reference in both orders, r1 loses in both, r2 wins only when shown first
    def verdict(a, b):
        if "ref" in (a, b):
            other = b if a == "ref" else a
            wins = other == "r0" or (other == "r2" and a == "r2")
            return ("A" if a == other else "B") if wins else ("A" if a == "ref" else "B")
    fake = TableJudge(monkeypatch, verdict)
    (g,) = fake.judge().rewards([("q", ["r0", "r1", "r2"], "ref")], method="reference")
    assert g.rewards == [1.0, -1.0, 0.0] and g.judge_calls == 6
    with pytest.raises(ValueError, match=r"groups\[0\]: method 'reference' needs a reference"):
        fake.judge().rewards([("q", ["r0"])], method="reference")


# ---- what a reward does not depend on ----

def test_a_reward_depends_on_the_texts_not_the_batch_or_the_groups_order(monkeypatch):
    order = ["b", "d", "a", "c", "e", "x", "y"]
    fake = TableJudge(monkeypatch, by_rank(order))
    judge = fake.judge(samples=2, temperature=1.0)
    responses = ["a", "b", "c", "d", "e"]
    for method in ("round_robin", "knockout"):
        fake.calls.clear()
        (alone,) = judge.rewards([("q", responses)], method=method)
        keys_alone = {k for _, keys in fake.calls for k in keys}
        shuffled = responses[:]
        random.Random(1).shuffle(shuffled)
        fake.calls.clear()
        other, mixed = judge.rewards([("other question", ["x", "y"]), ("q", shuffled)], method=method)
        keys_mixed = {k for _, keys in fake.calls for k in keys}
        assert [mixed.rewards[shuffled.index(r)] for r in responses] == alone.rewards, method
        assert keys_alone <= keys_mixed, f"{method}: the same judgments draw the same noise"


def test_a_judge_prompt_too_long_counts_as_no_verdict(monkeypatch):
    long = "What is 2 + 3? " * 200
    fake = TableJudge(monkeypatch, by_rank(["r0", long]))
    (g,) = fake.judge(max_prompt_len=700).rewards([("q", ["r0", long])])
    assert g.too_long == 1 and g.judge_calls == 0 and g.rewards == [0.0, 0.0]


# ---- the callables for TRL and verl ----

def test_trl_reward_function_ranks_each_group_of_consecutive_completions(monkeypatch):
    fake = TableJudge(monkeypatch, by_rank(["b", "a", "c", "y", "x", "z"]))
    reward = J.reward_function(fake.judge(), group_size=3)
    logged = {}
    # how TRL calls it: prompts repeated num_generations times, dataset columns as lists, log_metric
    rewards = reward(prompts=["q1"] * 3 + ["q2"] * 3, completions=["a", "b", "c", "x", "y", "z"],
                     completion_ids=[[0]] * 6, reference=[None] * 6, log_metric=lambda k, v: logged.setdefault(k, v))
    assert rewards == [0.0, 1.0, -1.0, 0.0, 1.0, -1.0]
    assert logged["rm_r1/judge_calls_per_response"] == 2.0 and logged["rm_r1/position_consistency"] == 1.0
    # conversational data: prompts and completions as message lists, a system turn folded into the user's
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"}]
    conversational = reward(prompts=[chat] * 3, completions=[[{"role": "assistant", "content": t}] for t in "abc"])
    assert conversational == [0.0, 1.0, -1.0]
    assert "[Client Question]\nBe brief.\n\nq1\n" in fake.texts[-1]
    with pytest.raises(ValueError, match="5 completions are not whole groups of group_size=3"):
        reward(prompts=["q1"] * 5, completions=["a"] * 5)
    with pytest.raises(ValueError, match="answer different prompts"):
        reward(prompts=["q1", "q1", "q2"], completions=["a", "b", "c"])


def test_verl_compute_score_groups_runs_of_a_prompt_and_reads_the_reference(monkeypatch):
    fake = TableJudge(monkeypatch, by_rank(["good", "ref", "meh", "bad"]))
    score = J.verl_compute_score(fake.judge(), method="reference", prompt_key="question")
    out = score(data_sources=["d"] * 3, solution_strs=["good", "bad", "meh"], ground_truths=["ref"] * 3,
                extra_infos=[{"question": "q"}] * 3)
    assert [o["score"] for o in out] == [1.0, -1.0, -1.0] and out[0]["judge_calls"] == 2.0
    with pytest.raises(ValueError, match=r"extra_infos\[1\] has no 'question'"):
        score(data_sources=["d"] * 2, solution_strs=["a", "b"], ground_truths=["r"] * 2,
              extra_infos=[{"question": "q"}, {}])
