"""The judge as a research tool (judge.py, eval.py): votes, the voting curve, both orders, the
user's own pairs; against values worked out by hand on fixed judgments."""

import json
from pathlib import Path

import pytest

import benchmarks
import demo
import eval as E
import judge as J
import rollout
from scores import no_result, scores_of, summary
from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


# ---- the rules, on verdicts fixed by hand ----

@pytest.mark.parametrize("verdicts, position, outcome, score", [
    (["A"], "A", "chosen", 1.0),
    (["B"], "A", "rejected", 0.0),
    ([None], "A", None, 0.0),                     # one unparseable greedy verdict: wrong, as today
    (["A", "B"], "A", "tie", 0.5),                # equal votes: half right
    (["A", None], "A", "chosen", 1.0),            # an unparseable sample votes for neither
    ([None, None, "B"], "B", "chosen", 1.0),      # the chosen answer shown at B
    (["A", "A", "B", "B", "B"], "A", "rejected", 0.0),
    ([None, None], "B", None, 0.0),
])
def test_votes_by_hand(verdicts, position, outcome, score):
    assert J.outcome(verdicts, position) == outcome
    assert J.score(verdicts, position) == score


def line(uid, position, votes, group=None):
    """A log line of eval.py --samples K, its score worked out from the votes by judge.score."""
    return {"uid": uid, "group": group or uid, "category": "chat", "meta": {}, "chosen_position": position,
            "prompt_tokens": 10, "judgment": "", "verdict": None, "correct": J.score(votes, position),
            "finish_reason": "stop", "votes": votes, "judgments": [""] * len(votes), "finish_reasons": ["stop"] * len(votes)}


def test_the_voting_curve_from_the_same_samples_by_hand():
    # 4 comparisons x 4 samples; the chosen answer at A for p, q, at B for r, s
    log = [line("p", "A", ["A", "B", "B", "B"]),   # k=1: 1    k=2: 1/2  k=4: 0
           line("q", "A", ["B", "A", "A", None]),  # k=1: 0    k=2: 1/2  k=4: 1
           line("r", "B", [None, "B", "A", "B"]),  # k=1: 0    k=2: 1    k=4: 1
           line("s", "B", ["B", "B", "A", "A"])]   # k=1: 1    k=2: 1    k=4: 1/2
    curve = scores_of(log, "demo", samples=4)["voting"]["curve"]
    assert [p["k"] for p in curve] == [1, 2, 4]
    want = {1: [1, 0, 0, 1], 2: [0.5, 0.5, 1, 1], 4: [0, 1, 1, 0.5]}
    for point in curve:
        xs = want[point["k"]]
        mean = sum(xs) / 4
        se = (sum((x - mean) ** 2 for x in xs) / 3 / 4) ** 0.5
        assert point["accuracy"] == pytest.approx(mean) and point["standard_error"] == pytest.approx(se), point
        assert point["scores"]["accuracy"] == pytest.approx(mean)
    # the run's own score is the whole vote's, k = 4
    assert scores_of(log, "demo", samples=4)["scores"]["accuracy"] == pytest.approx(2.5 / 4)
    assert [p["k"] for p in scores_of(log, "demo", samples=6)["voting"]["curve"]] == [1, 2, 4, 6]


def test_both_orders_by_hand():
    # x: right in both orders; y: A both times (position bias): inconsistent, a tie;
    # z: wrong in both; w: right at A, a tie of votes at B
    log = [line("x", "A", ["A", "A"]), line("x", "B", ["B", "B"]),
           line("y", "A", ["A", "A"]), line("y", "B", ["A", "A"]),
           line("z", "A", ["B", "B"]), line("z", "B", ["A", None]),
           line("w", "A", ["A", "A"]), line("w", "B", ["B", "A"])]
    scores = scores_of(log, "demo", samples=2)
    orders = scores["both_orders"]
    assert orders["comparisons"] == 4 and scores["comparisons"] == 4 and scores["judgments"] == 8
    # consistent: x (chosen twice) and z (rejected twice); y and w are not
    assert orders["position_consistency"] == 0.5
    # per comparison, the mean of its orders: x 1, y 1/2, z 0, w (1 + 1/2) / 2
    assert orders["accuracy"] == pytest.approx(2.25 / 4) and scores["scores"]["accuracy"] == pytest.approx(2.25 / 4)
    # votes for A: x 2 of 4, y 4 of 4, z 1 of 3, w 3 of 4
    assert orders["votes_A_share"] == pytest.approx(10 / 15)
    picks = {uid: J.tally([(r["chosen_position"], r["votes"]) for r in log if r["uid"] == uid]) for uid in "xyzw"}
    assert {uid: p[0] for uid, p in picks.items()} == {"x": "chosen", "y": None, "z": "rejected", "w": "chosen"}
    assert picks["z"][1] == {"chosen": 0, "rejected": 3, "none": 1}


def test_a_tie_of_votes_is_no_invalid_verdict():
    log = [line("t", "A", ["A", "B"]), line("u", "B", ["B", None])]  # a tie; a right vote and an unparseable one
    scores = scores_of(log, "demo", samples=2)
    assert scores["invalid_verdict_rate"] == pytest.approx(0.25)  # one sample of four holds no verdict
    assert scores["scores"]["accuracy"] == pytest.approx(0.75) and no_result(scores) is None


def test_a_tie_in_one_best_of_n_judgment_makes_the_item_half_right():
    results = [{"uid": f"i/{k}", "group": "i", "category": "Helpfulness/x", "meta": {"aspect": "Helpfulness"},
                "correct": c} for k, c in enumerate((1.0, 0.5, 1.0))]
    assert benchmarks.score_rmb_bon(results)["Helpfulness"] == 0.5
    results[1]["correct"] = True
    assert benchmarks.score_rmb_bon(results)["Helpfulness"] == 1.0


# ---- end to end on the shipped demo judge ----

class FixedVerdicts:
    """rollout.generate whose k-th sample of every prompt says verdicts[k % len]."""
    def __init__(self, monkeypatch, tokenizer, verdicts):
        self.texts = [tokenizer(f"<answer>[[{v}]]</answer>" if v else "no verdict", add_special_tokens=False)["input_ids"]
                      for v in verdicts]
        self.calls = []
        monkeypatch.setattr(rollout, "generate", self)

    def __call__(self, model, prompts, params, **kw):
        self.calls.append((len(prompts), params.n, kw.get("prompt_keys")))
        return [rollout.Completion(i, s, self.texts[s % len(self.texts)], [0.0], "stop")
                for i in range(len(prompts)) for s in range(params.n)]


def test_samples_and_both_orders_end_to_end_and_resumed(tmp_path, monkeypatch):
    from tokenization import load_tokenizer
    tokenizer = load_tokenizer(demo.SHIPPED)
    fake = FixedVerdicts(monkeypatch, tokenizer, ["A", "A", "B"])  # every prompt: 2 votes for A, 1 for B
    flags = ["--demo_pairs", "6", "--samples", "3", "--temperature", "1", "--both_orders", "--out", str(tmp_path)]
    scores = E.main(flags)
    log = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(log) == 12 and {r["chosen_position"] for r in log} == {"A", "B"}
    assert all(r["votes"] == ["A", "A", "B"] and len(r["judgments"]) == 3 for r in log)
    # majority A: right where the chosen answer is at A, wrong at B; each comparison half right
    assert all(r["verdict"] == "A" and r["correct"] == (1.0 if r["chosen_position"] == "A" else 0.0) for r in log)
    assert scores["scores"]["accuracy"] == 0.5 and scores["both_orders"]["position_consistency"] == 0.0
    assert scores["both_orders"]["votes_A_share"] == pytest.approx(2 / 3)
    # k = 1: A alone, the same half; k = 2: A, A; k = 3: A, A, B
    assert [(p["k"], p["accuracy"]) for p in scores["voting"]["curve"]] == [(1, 0.5), (2, 0.5), (3, 0.5)]
    assert all(n_samples == 3 for _, n_samples, _ in fake.calls)
    keys = [k for _, _, ks in fake.calls for k in ks]
    assert len(set(keys)) == 12, "each (comparison, order) draws its own noise"
    # a kill after the first 5 judgments: the rerun judges the other 7 and scores the same
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log[:5]))
    fake.calls.clear()
    assert E.main(flags) == scores
    assert sum(n for n, _, _ in fake.calls) == 7


def test_greedy_eval_is_one_sample_at_temperature_0_and_its_lines_keep_their_fields(tmp_path, monkeypatch):
    from tokenization import load_tokenizer
    fake = FixedVerdicts(monkeypatch, load_tokenizer(demo.SHIPPED), ["B"])
    scores = E.main(["--demo_pairs", "4", "--out", str(tmp_path)])
    params = [(n, k) for n, k, _ in fake.calls]
    assert params == [(4, 1)]
    log = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all(set(r) == {"uid", "group", "category", "meta", "chosen_position", "prompt_tokens", "judgment",
                          "verdict", "correct", "finish_reason"} and isinstance(r["correct"], bool) for r in log)
    assert "voting" not in scores and "both_orders" not in scores


def test_several_samples_need_a_temperature(tmp_path):
    with pytest.raises(ValueError, match=r"--samples 4: more than one sample needs --temperature > 0"):
        E.main(["--samples", "4", "--out", str(tmp_path)])


# ---- the user's own data ----

def test_own_pairs_are_scored_and_unlabeled_pairs_are_labeled_for_the_trainers(tmp_path, monkeypatch):
    from data import pairs_to_rlvr, read_records
    from tokenization import load_tokenizer
    tokenizer = load_tokenizer(demo.SHIPPED)
    FixedVerdicts(monkeypatch, tokenizer, ["A"])  # the judge always says A
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6", "category": "math"},
        {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": [{"role": "assistant", "content": "Hi!"}],
         "rejected": [{"role": "assistant", "content": "No."}]}])
    scores = E.main(["--model", demo.SHIPPED, "--bench", "pairs", "--data", str(pairs), "--out", str(tmp_path / "p"),
                     "--both_orders", "--max_new_tokens", "8"])
    # always A: right once and wrong once per pair, inconsistent every time
    assert scores["scores"] == {"accuracy": 0.5, "math": 0.5, "pairs": 0.5}
    assert scores["both_orders"]["position_consistency"] == 0.0

    unlabeled = write_jsonl(tmp_path / "unlabeled.jsonl", [
        {"id": "u1", "prompt": "What is 2 + 3?", "response_a": "5", "response_b": "6"},
        {"id": "u2", "prompt": "Say hi.", "response_a": "Hi!", "response_b": "No."}])
    out = tmp_path / "l"
    scores = E.main(["--model", demo.SHIPPED, "--bench", "label", "--data", str(unlabeled), "--out", str(out),
                     "--max_new_tokens", "8"])
    labeled = [json.loads(x) for x in (out / "labeled.jsonl").read_text().splitlines()]
    log = {r["uid"]: r for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}
    for r in labeled:  # "A" names whichever response the coin showed first
        first = "response_a" if log[r["id"]]["chosen_position"] == "A" else "response_b"
        assert r["picked"] == first and r["votes"][first] == 1 and r["consistent"] is None
        assert r["chosen"] == log[r["id"]]["meta"][first]
    assert scores["labeled"] == 2 and scores["unlabeled"] == 0
    # what the trainers read: raw preference pairs
    records, identical = pairs_to_rlvr(str(out / "labeled.jsonl"), seed=0)
    assert len(records) == 2 and identical == 0 and len(read_records(str(out / "labeled.jsonl"))) == 2


def test_a_malformed_own_record_names_file_line_and_field(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response_a": "x"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*'response_b'"):
        benchmarks.load_benchmark("label", str(bad))


# ---- the Python API ----

def test_compare_returns_votes_traces_and_consistency(monkeypatch):
    from tokenization import load_tokenizer
    tokenizer = load_tokenizer(demo.SHIPPED)
    FixedVerdicts(monkeypatch, tokenizer, ["A", "B", "A", None])
    judge = J.Judge(None, tokenizer, samples=4, temperature=1.0)
    (one,), (two,) = judge.compare([("What is 2 + 3?", "5", "6")]), \
        judge.compare([("What is 2 + 3?", "5", "6")], both_orders=True)
    assert one.pick == "a" and one.votes == {"a": 2, "b": 1, "none": 1} and one.consistent is None
    # both orders: A twice at each place is a for the first order and b for the second
    assert two.pick is None and two.consistent is False and two.votes == {"a": 3, "b": 3, "none": 2}
    assert [p for p, _ in two.orders] == ["A", "B"] and len(two.orders[0][1].texts) == 4
    # an item's noise is keyed by the item, not by its place in the call
    fake = FixedVerdicts(monkeypatch, tokenizer, ["A"])
    judge.compare([("What is 2 + 3?", "5", "6")])
    judge.compare([("Say hi.", "Hi!", "No."), ("What is 2 + 3?", "5", "6")])
    (alone,), (_, second) = [keys for _, _, keys in fake.calls]
    assert alone == second


def test_compare_marks_an_overlong_item_and_judges_the_rest(monkeypatch):
    from tokenization import load_tokenizer
    tokenizer = load_tokenizer(demo.SHIPPED)
    fake = FixedVerdicts(monkeypatch, tokenizer, ["A"])
    judge = J.Judge(None, tokenizer, max_prompt_len=700)
    short = [("What is 2 + 3?", "5", "6"), ("Say hi.", "Hi!", "No."), ("What is 1 + 1?", "2", "3")]
    long = ("What is 2 + 3? " * 200, "5", "6")
    verdicts = judge.compare(short[:2] + [long] + short[2:], both_orders=True)
    assert [v.pick for v in verdicts] == [None, None, None, None]  # always A: inconsistent, no pick
    assert [v.too_long is not None for v in verdicts] == [False, False, True, False]
    assert "over max_prompt_len=700" in verdicts[2].too_long and verdicts[2].orders == []
    assert [v.votes for v in verdicts[:2]] == [{"a": 1, "b": 1, "none": 0}] * 2
    assert [n for n, _, _ in fake.calls] == [6], "the three short items' two orders, in one call"


def test_health_rates_count_samples_and_consistency_counts_pairs_judged_in_both_orders():
    # 4 comparisons x 4 samples: sample 0 of each ends, the other 12 samples hit max_new_tokens
    line = {"group": "g", "category": "c", "meta": {}, "prompt_tokens": 9, "judgment": "", "correct": 1.0,
            "chosen_position": "A", "verdict": "A", "finish_reason": "stop",
            "votes": ["A", None, None, None], "finish_reasons": ["stop", "length", "length", "length"]}
    records = [dict(line, uid=f"u{i}") for i in range(4)]
    scores = scores_of(records, "demo", samples=4)
    assert scores["truncated_rate"] == 0.75 and scores["invalid_verdict_rate"] == 0.75
    assert scores["counted_over"]["truncated_rate"] == "samples"
    assert "truncated_rate" in summary(scores)
    assert "75% of the sampled judgments were cut" in no_result(dict(scores, invalid_verdict_rate=1.0))
    # both orders: u0 judged in both and consistent; u1's prompts too long in both orders
    greedy = {k: v for k, v in line.items() if k not in ("votes", "finish_reasons")}
    both = [dict(greedy, uid="u0"), dict(greedy, uid="u0", chosen_position="B", verdict="B"),
            *[dict(greedy, uid="u1", chosen_position=p, verdict=None, correct=0.0, finish_reason="prompt_too_long")
              for p in "AB"]]
    orders = scores_of(both, "demo")["both_orders"]
    assert orders["position_consistency"] == 1.0 and orders["judged_in_both_orders"] == 1
    assert orders["accuracy"] == 0.5, "the unjudged pair still counts as wrong in the accuracy"


def test_greedy_one_order_scores_say_nothing_new():
    line = {"uid": "u0", "group": "g", "category": "c", "meta": {}, "prompt_tokens": 9, "judgment": "",
            "correct": True, "chosen_position": "A", "verdict": "A", "finish_reason": "stop"}
    assert set(scores_of([line], "demo")) == {"bench", "comparisons", "prompt_too_long", "invalid_verdict_rate",
                                                 "truncated_rate", "verdict_A_share", "gold_A_share", "scores"}


def test_a_resume_with_the_data_path_spelled_otherwise_judges_nothing_again(tmp_path, monkeypatch):
    from tokenization import load_tokenizer
    fake = FixedVerdicts(monkeypatch, load_tokenizer(demo.SHIPPED), ["A"])
    pairs = [{"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(4)]
    write_jsonl(tmp_path / "x.jsonl", pairs)
    monkeypatch.chdir(tmp_path)
    flags = ["--model", demo.SHIPPED, "--bench", "pairs", "--out", str(tmp_path / "e"), "--max_new_tokens", "8"]
    first = E.main(flags + ["--data", "x.jsonl"])
    log = (tmp_path / "e" / "samples.jsonl").read_text()
    monkeypatch.chdir(ROOT)
    fake.calls.clear()
    assert E.main(flags + ["--data", str(tmp_path / "x.jsonl")]) == first
    assert fake.calls == [] and (tmp_path / "e" / "samples.jsonl").read_text() == log
    assert first["comparisons"] == 4
    # a record's uid is its place in its file and its content, not the path as typed
    uids = [json.loads(line)["uid"] for line in log.splitlines()]
    assert all(u.startswith("x.jsonl:") and "/" not in u.split("#")[0] for u in uids)
    # other records at the same path: the digest differs, refused with both paths named
    write_jsonl(tmp_path / "x.jsonl", pairs[:3])
    with pytest.raises(ValueError, match=r"data_sha256.*x\.jsonl"):
        E.main(flags + ["--data", str(tmp_path / "x.jsonl")])


def test_a_log_that_shares_no_comparison_with_the_data_is_refused(tmp_path, monkeypatch):
    from tokenization import load_tokenizer
    FixedVerdicts(monkeypatch, load_tokenizer(demo.SHIPPED), ["A"])
    data = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}])
    out = tmp_path / "e"
    out.mkdir()
    # a log made before data digests were recorded, its uids the path as typed then
    (out / "samples.jsonl").write_text(json.dumps({"uid": "somewhere/x.jsonl:1", "chosen_position": "A",
                                                   "correct": True, "verdict": "A", "finish_reason": "stop"}) + "\n")
    with pytest.raises(ValueError, match=r"none of them is in .*x\.jsonl.*'somewhere/x\.jsonl:1'.*x\.jsonl:1#"):
        E.main(["--model", demo.SHIPPED, "--bench", "pairs", "--data", str(data), "--out", str(out),
                "--max_new_tokens", "8"])


def test_a_model_directory_left_at_its_old_name_by_a_killed_export_is_put_back(tmp_path, monkeypatch):
    # an export killed between publish's two renames: X missing, X.old holding the previous version
    import shutil
    from tokenization import load_tokenizer
    FixedVerdicts(monkeypatch, load_tokenizer(demo.SHIPPED), ["A"])
    shutil.copytree(demo.SHIPPED, tmp_path / "judge.old")
    scores = E.main(["--model", str(tmp_path / "judge"), "--demo_pairs", "2", "--out", str(tmp_path / "e")])
    assert scores["comparisons"] == 2 and (tmp_path / "judge" / "config.json").exists()
    assert not (tmp_path / "judge.old").exists()
    shutil.move(tmp_path / "judge", tmp_path / "judge.old")
    assert load_tokenizer(str(tmp_path / "judge")) is not None and not (tmp_path / "judge.old").exists()
