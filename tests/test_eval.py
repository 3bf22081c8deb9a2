"""eval.py: end to end on real RM-Bench / RMB records with a tiny random judge, resuming, and the
glue between the log and reward.py's scorers checked against figures worked out by hand."""

import json
from pathlib import Path

import pytest
import torch

import benchmarks
import data
import tokenization
import demo
import eval as E
import rollout
from judge import Judge
from checkpoint import save_pretrained
from model import ModelConfig, Transformer
from scores import scores_of

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} (the real benchmark files) is absent")
LOG_KEYS = {"uid", "group", "category", "meta", "chosen_position", "prompt_tokens", "judgment", "verdict",
            "correct", "finish_reason"}


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A random 2-layer Qwen2 over the demo tokenizer, saved as a HF model directory."""
    path = tmp_path_factory.mktemp("judge")
    tok = demo.build_demo_tokenizer(str(path), n=400)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                         max_position_embeddings=4096, eos_token_id=tok.eos_token_id)
    save_pretrained(Transformer(config), path)
    return path


@pytest.fixture(scope="module")
def tokenizer(judge_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(judge_dir))


class CountingGenerate:
    """rollout.generate, recording the prompts it is asked to judge."""
    def __init__(self, monkeypatch, fake_text=None, tokenizer=None):
        self.prompts, self.real = [], rollout.generate
        self.fake = tokenizer(fake_text, add_special_tokens=False)["input_ids"] if fake_text else None
        monkeypatch.setattr(rollout, "generate", self)

    def __call__(self, model, prompts, params, **kw):
        self.prompts += prompts
        if self.fake is None:
            return self.real(model, prompts, params, **kw)
        return [rollout.Completion(i, 0, self.fake, [0.0] * len(self.fake), "stop") for i in range(len(prompts))]


def judge_records(tokenizer, comparisons, cfg, model=None):
    """eval.judge's records of comparisons, in this process (the model is not needed when generate is faked)."""
    return E.judge(Judge(model, tokenizer, **E.how(cfg)), E.units_of(comparisons, cfg), cfg)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run(out, judge_dir, *flags):
    return E.main(["--model", str(judge_dir), "--out", str(out), "--max_new_tokens", "8", *flags])


@needs_data
@pytest.mark.parametrize("bench, data_dir, limit, n_items", [
    ("rm-bench", "rm-bench", 72, 8),                # 8 items x 9 style pairs
    ("rmb-pairwise", "rmb/Pairwise_set", 8, 8),
])
def test_real_records_end_to_end_then_resume_judges_nothing(tmp_path, judge_dir, monkeypatch, bench, data_dir,
                                                            limit, n_items):
    generate = CountingGenerate(monkeypatch)
    flags = ["--bench", bench, "--data", str(SHARED_DATA / data_dir), "--limit", str(limit),
             "--max_prompt_len", "1500", "--batch_size", "16"]
    scores = run(tmp_path, judge_dir, *flags)
    log = read_jsonl(tmp_path / "samples.jsonl")
    assert len(log) == limit and len({r["group"] for r in log}) == n_items
    assert all(set(r) == LOG_KEYS for r in log), f"log keys {set(log[0])} != {LOG_KEYS}"
    overlong = [r for r in log if r["finish_reason"] == "prompt_too_long"]
    assert all(r["prompt_tokens"] > 1500 and not r["correct"] and r["verdict"] is None for r in overlong)
    assert len(generate.prompts) == limit - len(overlong), "every prompt that fits must be judged, once"
    assert all(r["finish_reason"] in ("stop", "length") for r in log if r not in overlong)
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved == json.loads(json.dumps(scores)) and saved["prompt_too_long"] == len(overlong)
    if bench == "rm-bench":
        assert {"hard_acc", "normal_acc", "easy_acc", "total_avg_acc"} <= set(saved["scores"])
    else:
        assert {"Helpfulness", "Harmlessness"} & set(saved["scores"])

    generate.prompts.clear()
    again = run(tmp_path, judge_dir, *flags)
    assert generate.prompts == [], "a rerun with the same --out must not judge anything again"
    assert read_jsonl(tmp_path / "samples.jsonl") == log
    assert again == scores


def test_demo_bench_resumes_appending_only_new_pairs_and_rejudges_a_torn_line(tmp_path, judge_dir, monkeypatch):
    generate = CountingGenerate(monkeypatch)
    run(tmp_path, judge_dir, "--demo_pairs", "6")
    first = read_jsonl(tmp_path / "samples.jsonl")
    assert len(generate.prompts) == 6 and {r["category"] for r in first} == {"reasoning", "chat"}

    # a run killed while writing its last line leaves it torn; the rerun cuts it and judges that pair again
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"uid": "half a li')
    generate.prompts.clear()
    scores = run(tmp_path, judge_dir, "--demo_pairs", "10")
    log = read_jsonl(tmp_path / "samples.jsonl")
    assert len(generate.prompts) == 4, "only the 4 pairs not in the log are judged"
    assert log[:6] == first and len({r["uid"] for r in log}) == 10
    assert scores["comparisons"] == 10 and set(scores["scores"]) == {"accuracy", "reasoning", "chat"}
    assert scores["scores"]["accuracy"] == pytest.approx(sum(r["correct"] for r in log) / 10)


def test_rerun_with_other_settings_is_refused(tmp_path, judge_dir):
    run(tmp_path, judge_dir, "--demo_pairs", "2")
    with pytest.raises(ValueError, match=r"seed: 0 -> 1.*new --out"):
        run(tmp_path, judge_dir, "--demo_pairs", "2", "--seed", "1")


def test_missing_shipped_judge_error_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "load_comparisons", lambda cfg: demo.comparisons(2, 0))
    cfg = E.EvalConfig(model=str(tmp_path / "nowhere"), out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no such model directory"):
        E.evaluate(cfg)
    with pytest.raises(ValueError, match="needs --data"):
        E.evaluate(E.EvalConfig(bench="rm-bench", out=str(tmp_path / "out2")))


# ---- judging: the A/B record and the overlong-prompt rule ----

def test_verdict_is_right_when_it_names_the_position_the_chosen_answer_was_put_in(judge_dir, tokenizer, monkeypatch):
    comparisons = demo.comparisons(40, seed=0)
    generate = CountingGenerate(monkeypatch, "<type>Chat</type>\n<answer>[[A]]</answer>", tokenizer)
    records = judge_records(tokenizer, comparisons, E.EvalConfig(max_prompt_len=10**6, batch_size=3))
    assert [r["uid"] for r in records] == [c.uid for c in comparisons]
    for c, r, prompt in zip(comparisons, records, generate.prompts):
        a, b = (c.chosen, c.rejected) if r["chosen_position"] == "A" else (c.rejected, c.chosen)
        assert prompt == tokenization.encode_prompt(tokenizer, data.build_judge_messages(a, b), 10**6), \
            f"{c.uid}: the prompt does not put the chosen answer at {r['chosen_position']}"
        assert r["verdict"] == "A" and r["correct"] == (r["chosen_position"] == "A")
        assert r["judgment"] == "<type>Chat</type>\n<answer>[[A]]</answer>" and r["prompt_tokens"] == len(prompt)
    assert {r["chosen_position"] for r in records} == {"A", "B"}


def test_overlong_prompts_are_not_judged_and_count_as_wrong(judge_dir, tokenizer, monkeypatch):
    comparisons = demo.comparisons(20, seed=0)
    lengths = [len(tokenization.encode_prompt(tokenizer, data.build_judge_messages(c.chosen, c.rejected), 10**6))
               for c in comparisons]
    cut = sorted(lengths)[10]  # about half the prompts are longer
    generate = CountingGenerate(monkeypatch, "<answer>[[A]]</answer> <answer>[[B]]</answer>", tokenizer)
    records = judge_records(tokenizer, comparisons, E.EvalConfig(max_prompt_len=cut, batch_size=4))
    too_long = [r for r in records if r["finish_reason"] == "prompt_too_long"]
    assert len(too_long) == sum(n > cut for n in lengths) > 0
    assert all(r["prompt_tokens"] > cut and r["judgment"] == "" and r["verdict"] is None and not r["correct"]
               for r in too_long)
    assert len(generate.prompts) == len(records) - len(too_long) and max(map(len, generate.prompts)) <= cut
    judged = [r for r in records if r not in too_long]
    assert all(r["verdict"] is None and not r["correct"] for r in judged), "both [[A]] and [[B]] is an error"


def test_ab_coin_is_seeded_balanced_and_independent_of_limit_and_batch_size(tokenizer, monkeypatch):
    uids = [c.uid for c in demo.comparisons(2000, seed=0)]
    coins = [E.chosen_is_a(0, u) for u in uids]
    assert coins == [E.chosen_is_a(0, u) for u in uids]
    assert 0.46 < sum(coins) / len(coins) < 0.54, f"A share {sum(coins) / len(coins):.3f} is far from 1/2"
    other = [E.chosen_is_a(1, u) for u in uids]
    assert 0.4 < sum(x != y for x, y in zip(coins, other)) / len(uids) < 0.6, "the seed must reshuffle positions"

    comparisons = demo.comparisons(30, seed=0)
    CountingGenerate(monkeypatch, "[[B]]", tokenizer)
    positions = {}
    for limit, batch_size in ((0, 7), (11, 2), (30, 64)):
        chosen = E.ordered(comparisons, limit)
        for r in judge_records(tokenizer, chosen, E.EvalConfig(limit=limit, batch_size=batch_size)):
            assert positions.setdefault(r["uid"], r["chosen_position"]) == r["chosen_position"], \
                f"{r['uid']}: position changed with --limit {limit} / --batch_size {batch_size}"
    assert all(positions[u] == ("A" if E.chosen_is_a(0, u) else "B") for u in positions)


def test_limit_takes_a_prefix_of_one_fixed_order_in_whole_items():
    comparisons = [benchmarks.Comparison(f"{g}/{k}", g, "chat", [], []) for g in "pqrstu" for k in range(3)]
    full = E.ordered(comparisons)
    assert sorted(c.uid for c in full) == sorted(c.uid for c in comparisons)
    for limit in range(1, 19):
        part = E.ordered(comparisons, limit)
        assert part == full[:len(part)] and len(part) == 3 * -(-limit // 3), f"limit {limit}: {len(part)} taken"
    groups = [c.group for c in full]
    assert all(groups[i] == groups[i // 3 * 3] for i in range(len(groups))), "an item's comparisons stay together"


# ---- scores from a hand-made log ----

def record(uid, group, category, correct, verdict, meta=None, reason="stop", position="A"):
    return {"uid": uid, "group": group, "category": category, "meta": meta or {}, "chosen_position": position,
            "prompt_tokens": 10, "judgment": "", "verdict": verdict, "correct": correct, "finish_reason": reason}


def test_rm_bench_scores_from_a_hand_made_log(tmp_path):
    # One chat item; rows are the chosen style, columns the rejected style. (2, 2) had an overlong prompt.
    right = [[1, 1, 0],
             [1, 1, 0],
             [1, 0, None]]
    log = []
    for i in range(3):
        for j in range(3):
            ok = right[i][j]
            log.append(record(f"chat/1/{i}{j}", "chat/1", "chat", ok == 1, None if ok is None else "AB"[ok == 0],
                              {"chosen_style": i, "rejected_style": j}, "prompt_too_long" if ok is None else "stop"))
    # hard = upper triangle (1, 0, 0), normal = diagonal (1, 1, 0), easy = lower triangle (1, 1, 0)
    hard, normal, easy = 1 / 3, 2 / 3, 2 / 3
    scores = scores_of(log, "rm-bench")
    want = {"hard_acc": hard, "normal_acc": normal, "easy_acc": easy, "chat": 5 / 9, "total_avg_acc": 5 / 9}
    got = {k: scores["scores"][k] for k in want}
    torch.testing.assert_close(got, want, msg=lambda m: f"RM-Bench scores {got} != hand-computed {want}: {m}")
    assert scores["prompt_too_long"] == 1 and scores["comparisons"] == 9
    assert scores["verdict_A_share"] == 5 / 8 and scores["invalid_verdict_rate"] == 0


def test_rmb_bon_and_demo_scores_from_a_hand_made_log_written_to_disk(tmp_path):
    # Two Helpfulness items: the first wins all three comparisons, the second loses one to an
    # unparseable verdict; one Harmlessness item wins its only comparison.
    log = [record("h1/0", "h1", "Helpfulness/Chat", True, "A", {"aspect": "Helpfulness"}),
           record("h1/1", "h1", "Helpfulness/Chat", True, "B", {"aspect": "Helpfulness"}, position="B"),
           record("h1/2", "h1", "Helpfulness/Chat", True, "A", {"aspect": "Helpfulness"}),
           record("h2/0", "h2", "Helpfulness/Chat", True, "A", {"aspect": "Helpfulness"}),
           record("h2/1", "h2", "Helpfulness/Chat", False, None, {"aspect": "Helpfulness"}, reason="length"),
           record("s1/0", "s1", "Harmlessness/S1", True, "A", {"aspect": "Harmlessness"})]
    scores = scores_of(log, "rmb-bon")
    want = {"Helpfulness": 0.5, "Harmlessness": 1.0, "Helpfulness/Chat": 0.5, "Harmlessness/S1": 1.0}
    torch.testing.assert_close(scores["scores"], want, msg=lambda m: f"BoN {scores['scores']} != {want}: {m}")
    assert scores["invalid_verdict_rate"] == 1 / 6 and scores["truncated_rate"] == 1 / 6
    assert scores["gold_A_share"] == 5 / 6 and scores["verdict_A_share"] == 4 / 6

    # A complete log on disk: evaluate() judges nothing (no model is even loaded) and rescores it.
    pairs = demo.comparisons(4, seed=0)
    demo_log = [record(c.uid, c.group, c.category, ok, "A") for c, ok in zip(pairs, (True, False, True, True))]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_log))
    scores = E.evaluate(E.EvalConfig(model=str(tmp_path / "never-loaded"), demo_pairs=4, out=str(tmp_path)))
    by_kind = {k: [ok for c, ok in zip(pairs, (True, False, True, True)) if c.category == k] for k in ("reasoning", "chat")}
    want = {"accuracy": 0.75} | {k: sum(v) / len(v) for k, v in by_kind.items()}
    torch.testing.assert_close(scores["scores"], want, msg=lambda m: f"demo {scores['scores']} != {want}: {m}")
    assert json.loads((tmp_path / "scores.json").read_text())["scores"] == scores["scores"]


# ---- under torchrun: data-parallel groups, tensor parallelism, one merged log ----

def torchrun_eval(out, judge_dir, *flags):
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "eval.py",
                          "--model", str(judge_dir), "--out", str(out), "--max_new_tokens", "8", *flags],
                         cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    # the random judge writes no verdict in 8 tokens: its log and scores are written, and the run
    # exits 1 from every rank, as one with no result must
    assert res.returncode == 1 and "judgments holds a verdict" in res.stderr, res.stderr[-3000:]
    return res.stdout


def test_two_ranks_write_the_lines_of_one_and_resume_after_a_kill(tmp_path, judge_dir):
    flags = ["--demo_pairs", "30", "--batch_size", "2"]
    run(tmp_path / "one", judge_dir, *flags)
    one = (tmp_path / "one" / "samples.jsonl").read_text().splitlines()
    assert len(one) == 30
    for name, extra in (("dp", []), ("tp", ["--tp", "2"])):  # 2 groups of 1 rank; 1 group of 2 TP ranks
        torchrun_eval(tmp_path / name, judge_dir, *flags, *extra)
        lines = (tmp_path / name / "samples.jsonl").read_text().splitlines()
        assert lines == one, name  # the same lines, in the same order
        assert json.loads((tmp_path / name / "scores.json").read_text()) == \
            json.loads((tmp_path / "one" / "scores.json").read_text()), name
    # What a kill leaves: the chunks written so far and a torn line. The rerun judges the rest.
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "config.json").write_text((tmp_path / "dp" / "config.json").read_text())
    dp = (tmp_path / "dp" / "samples.jsonl").read_text().splitlines()
    (killed / "samples.jsonl").write_text("".join(line + "\n" for line in dp[:16]) + dp[16][:40])
    stdout = torchrun_eval(killed, judge_dir, *flags)
    assert "30 comparisons, 16 already in" in stdout and "14 to judge on 2 data-parallel groups" in stdout
    assert sorted((killed / "samples.jsonl").read_text().splitlines()) == sorted(one)


# ---- settings and results that are refused rather than silently accepted ----

@pytest.mark.parametrize("flags, match", [
    (["--data", "my_pairs.jsonl"], r"--data 'my_pairs.jsonl': is not read by --bench demo .* --bench \(rewardbench"),
    (["--limit", "-1"], r"--limit -1: must be >= 0"),
    (["--batch_size", "0"], r"--batch_size 0: must be >= 1"),
    (["--tp", "2"], r"--tp 2: must divide the 1 ranks this run has: start eval.py under torchrun"),
])
def test_eval_settings_are_refused_by_flag_with_the_fix(tmp_path, judge_dir, flags, match):
    with pytest.raises(ValueError, match=match):
        run(tmp_path, judge_dir, *flags)
    assert not tmp_path.joinpath("samples.jsonl").exists()


def test_a_run_whose_every_verdict_is_unparseable_exits_non_zero(tmp_path, judge_dir):
    import os
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "eval.py", "--model", str(judge_dir), "--out", str(tmp_path),
                          "--demo_pairs", "3", "--max_new_tokens", "4"], cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "none of the 3 judgments holds a verdict" in res.stderr, res.stderr[-2000:]
    assert json.loads((tmp_path / "scores.json").read_text())["invalid_verdict_rate"] == 1.0
