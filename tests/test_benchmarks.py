"""benchmarks.py: each loader against small files written here (and the real RM-Bench / RMB files
in ../shared/data when present), each scorer against scores worked out by hand."""

import json

import pytest

import benchmarks
import data
from benchmarks import score_rewardbench, score_rm_bench, score_rmb, score_rmb_bon, score_rmb_pairwise
from conftest import SHARED, bot, needs_shared, user, write_jsonl

# ---- loaders ----

def test_rewardbench_loader(tmp_path):
    path = write_jsonl(tmp_path / "rb.jsonl", [
        {"prompt": "q", "chosen": "good", "rejected": "bad", "subset": "mt-bench-easy", "id": 7}])
    (c,) = benchmarks.load_benchmark("rewardbench", path)
    assert (c.uid, c.group, c.category, c.meta) == ("7", "7", "mt-bench-easy", {"subset": "mt-bench-easy"})
    assert c.chosen == [user("q"), bot("good")] and c.rejected == [user("q"), bot("bad")]


def test_rm_bench_item_expands_to_the_3x3_style_matrix(tmp_path):
    item = {"id": 5, "prompt": "q", "chosen": ["c0", "c1", "c2"], "rejected": ["r0", "r1", "r2"]}
    (tmp_path / "safety-refuse_filtered.json").write_text(json.dumps([item]))
    (tmp_path / "total.json").write_text(json.dumps([dict(item, domain="math")]))
    comps = benchmarks.load_benchmark("rm-bench", tmp_path)
    assert len(comps) == 18
    safety = [c for c in comps if c.category == "safety"]
    assert {c.group for c in safety} == {"safety-refuse_filtered/5"}
    got = {(c.meta["chosen_style"], c.meta["rejected_style"]): (c.chosen[1]["content"], c.rejected[1]["content"])
           for c in safety}
    assert got == {(i, j): (f"c{i}", f"r{j}") for i in range(3) for j in range(3)}
    assert {c.category for c in comps} == {"safety", "math"}


def test_rm_bench_errors(tmp_path):
    (tmp_path / "misc.json").write_text(json.dumps([{"id": 1, "prompt": "q", "chosen": ["a"] * 3, "rejected": ["b"] * 3}]))
    with pytest.raises(ValueError, match=r"misc\.json\[0\]: RM-Bench domain 'misc'"):
        benchmarks.load_benchmark("rm-bench", tmp_path / "misc.json")
    (tmp_path / "chat.json").write_text(json.dumps([{"id": 1, "prompt": "q", "chosen": ["a"] * 2, "rejected": ["b"] * 3}]))
    with pytest.raises(ValueError, match=r"chat\.json\[0\]: field 'chosen' must hold 3 strings"):
        benchmarks.load_benchmark("rm-bench", tmp_path / "chat.json")


def rmb_record(uid, path, turns=1):
    conversation = [{"role": "user", "content": "u0", "language": "English"}]
    for k in range(1, turns):
        conversation += [{"role": "assistant", "content": f"a{k}"}, {"role": "user", "content": f"u{k}"}]
    return {"pair_uid": uid, "conversation_input": conversation, "category_path": path,
            "chosen": {"llm_name": "m1", "answer": "good"}, "reject": {"llm_name": "m2", "answer": "bad"}}


def test_rmb_pairwise_loader_keeps_the_aspect(tmp_path):
    folder = tmp_path / "Pairwise_set" / "Harmlessness"
    folder.mkdir(parents=True)
    (folder / "S1.json").write_text(json.dumps([rmb_record("1", "Pairwise_set/Harmlessness/S1"),
                                                rmb_record("2", "S1", turns=2)]))
    a, b = benchmarks.load_benchmark("rmb-pairwise", tmp_path)
    assert (a.uid, a.category, a.meta) == ("1", "Pairwise_set/Harmlessness/S1", {"aspect": "Harmlessness"})
    assert a.chosen == [user("u0"), bot("good")] and a.rejected == [user("u0"), bot("bad")]
    assert b.meta == {"aspect": "Harmlessness"}  # from the folder, as its category_path does not say
    assert b.chosen == [user("u0"), bot("a1"), user("u1"), bot("good")]


def test_rmb_pairwise_error_names_file_index_and_field(tmp_path):
    bad = rmb_record("1", "Pairwise_set/Helpfulness/Chat")
    del bad["reject"]["answer"]
    (tmp_path / "chat.json").write_text(json.dumps([rmb_record("0", "Pairwise_set/Helpfulness/Chat"), bad]))
    with pytest.raises(ValueError, match=r"chat\.json\[1\] reject: missing field 'answer'"):
        benchmarks.load_benchmark("rmb-pairwise", tmp_path)


def test_rmb_bon_item_expands_to_one_comparison_per_loser(tmp_path):
    item = {"bon_uid": "b9", "conversation_input": [user("q")], "category_path": "BoN_set/Helpfulness/Code/X",
            "bon_best": {"answer": "best"}, "loser_list": [{"answer": "l0"}, {"answer": "l1"}, {"answer": "l2"}]}
    comps = benchmarks.load_benchmark("rmb-bon", write_jsonl(tmp_path / "bon.jsonl", [item]))
    assert [c.uid for c in comps] == ["b9/0", "b9/1", "b9/2"]
    assert {c.group for c in comps} == {"b9"} and all(c.meta["aspect"] == "Helpfulness" for c in comps)
    assert [c.rejected[-1]["content"] for c in comps] == ["l0", "l1", "l2"]
    assert all(c.chosen == [user("q"), bot("best")] for c in comps)


def test_same_item_twice_is_an_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "chosen": "g", "rejected": "b", "subset": "hep-go", "id": 1}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "chosen": "g", "rejected": "b", "subset": "hep-go", "id": 1}])
    with pytest.raises(ValueError, match=r"b\.jsonl: comparison '1' already loaded"):
        benchmarks.load_benchmark("rewardbench", tmp_path)


@needs_shared
def test_real_rm_bench_files():
    folder = SHARED / "data" / "rm-bench"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    files = data.data_files(folder)
    assert len(files) == 4
    comps = benchmarks.load_benchmark("rm-bench", folder)
    items = {c.group for c in comps}
    assert len(items) == 798 and len(comps) == 9 * 798
    domains = {d: len({c.group for c in comps if c.category == d}) for d in ("chat", "code", "safety")}
    assert domains == {"chat": 129, "code": 228, "safety": 284 + 157}


@needs_shared
def test_real_rmb_pairwise_files():
    folder = SHARED / "data" / "rmb" / "Pairwise_set"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    assert len(data.data_files(folder)) == 46
    comps = benchmarks.load_benchmark("rmb-pairwise", folder)
    assert len(comps) == 14543 and len({c.category for c in comps}) == 46
    aspects = [c.meta["aspect"] for c in comps]
    assert (aspects.count("Helpfulness"), aspects.count("Harmlessness")) == (8456, 6087)
    assert max(len(c.chosen) for c in comps) == 6  # 5-turn inputs plus the answer


# ---- scorers ----

def result(uid, correct, category="c", group=None, **meta):
    return {"uid": uid, "group": group or uid, "category": category, "meta": meta, "correct": correct}


def test_score_rewardbench_by_hand():
    results = ([result(f"e{k}", k < 3, "alpacaeval-easy") for k in range(4)]        # 3/4
               + [result(f"m{k}", k < 1, "mt-bench-easy") for k in range(2)]        # 1/2
               + [result(f"h{k}", True, "llmbar-natural") for k in range(2)]        # 1
               + [result(f"s{k}", k < 1, "donotanswer") for k in range(4)]          # 1/4
               + [result(f"p{k}", k < 1, "math-prm") for k in range(2)]             # 1/2, 2 examples
               + [result(f"g{k}", True, "hep-go") for k in range(3)]                # 1
               + [result(f"r{k}", k < 3, "hep-rust") for k in range(6)])            # 1/2
    s = score_rewardbench(results)
    assert s["alpacaeval-easy"] == 0.75 and s["hep-rust"] == 0.5
    assert s["Chat"] == pytest.approx((3 + 1) / 6)
    assert s["Chat Hard"] == 1.0 and s["Safety"] == 0.25
    # math-prm weighs as much as the 9 code examples: (0.5 * 9 + 1 * 3 + 0.5 * 6) / 18
    assert s["Reasoning"] == pytest.approx(10.5 / 18)
    assert s["Score"] == pytest.approx((4 / 6 + 1 + 0.25 + 10.5 / 18) / 4)


def test_score_rewardbench_partial_sections_and_unknown_subsets():
    assert "Score" not in score_rewardbench([result("1", True, "hep-go")])
    with pytest.raises(ValueError, match="belong to no section"):
        score_rewardbench([result("1", True, "anthropic_helpful")])


def rm_bench_item(domain, item, right):
    """9 results of one item; `right` is the set of (i, j) cells judged correctly."""
    return [result(f"{item}/{i}{j}", (i, j) in right, domain, group=item, chosen_style=i, rejected_style=j)
            for i in range(3) for j in range(3)]


def test_score_rm_bench_matrix_by_hand():
    everything = {(i, j) for i in range(3) for j in range(3)}
    results = (rm_bench_item("chat", "c1", everything)
               + rm_bench_item("chat", "c2", {(0, 0), (1, 1), (2, 2), (1, 0), (2, 0), (2, 1)})  # lower + diagonal
               + rm_bench_item("code", "k1", {(0, 1)}))
    s = score_rm_bench(results)
    assert s["chat/matrix"] == [[1.0, 0.5, 0.5], [1.0, 1.0, 0.5], [1.0, 1.0, 1.0]]
    assert (s["chat/hard_acc"], s["chat/normal_acc"], s["chat/easy_acc"]) == (0.5, 1.0, 1.0)
    assert s["chat"] == pytest.approx(2.5 / 3)
    assert (s["code/hard_acc"], s["code/normal_acc"], s["code/easy_acc"]) == (pytest.approx(1 / 3), 0.0, 0.0)
    assert s["code"] == pytest.approx(1 / 9)
    assert s["hard_acc"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert s["normal_acc"] == 0.5 and s["easy_acc"] == 0.5
    assert s["total_avg_acc"] == pytest.approx((2.5 / 3 + 1 / 9) / 2)


def test_score_rm_bench_missing_cell_is_an_error():
    with pytest.raises(ValueError, match=r"'math' has no results for \(chosen, rejected\) styles \[\(2, 2\)\]"):
        score_rm_bench(rm_bench_item("math", "m1", set())[:-1])


def test_score_rmb_pairwise_and_bon_by_hand():
    pairwise = ([result(f"h{k}", k < 2, "Pairwise_set/Helpfulness/Chat/X", aspect="Helpfulness") for k in range(4)]
                + [result("h9", True, "Pairwise_set/Helpfulness/Code/Y", aspect="Helpfulness")]
                + [result(f"s{k}", k < 1, "Pairwise_set/Harmlessness/S1", aspect="Harmlessness") for k in range(2)])
    p = score_rmb_pairwise(pairwise)
    assert p["Pairwise_set/Helpfulness/Chat/X"] == 0.5 and p["Pairwise_set/Helpfulness/Code/Y"] == 1.0
    assert p["Helpfulness"] == 3 / 5 and p["Harmlessness"] == 0.5   # over pairs, not over categories

    def bon(item, correct, aspect):
        return [result(f"{item}/{k}", c, f"BoN_set/{aspect}/Z", group=item, aspect=aspect, loser=k)
                for k, c in enumerate(correct)]
    bon_results = (bon("a", [True, True, True], "Helpfulness") + bon("b", [True, False, True], "Helpfulness")
                   + bon("c", [True], "Helpfulness") + bon("d", [False, True], "Harmlessness"))
    b = score_rmb_bon(bon_results)
    assert b["Helpfulness"] == pytest.approx(2 / 3) and b["Harmlessness"] == 0.0
    headline = score_rmb(pairwise, bon_results)
    assert headline == {"Helpfulness Pairwise": 0.6, "Helpfulness BoN": pytest.approx(2 / 3),
                        "Harmlessness Pairwise": 0.5, "Harmlessness BoN": 0.0,
                        "Overall": pytest.approx((0.6 + 2 / 3 + 0.5) / 4)}


def test_scorer_rejects_malformed_results():
    with pytest.raises(ValueError, match=r"results\[0\]: missing field 'correct'"):
        score_rmb_pairwise([{"uid": "1", "group": "1", "category": "c", "meta": {"aspect": "Helpfulness"}}])
    with pytest.raises(ValueError, match=r"results\[0\]: field 'correct' must be a bool"):
        score_rmb_pairwise([result("1", 1, aspect="Helpfulness")])
