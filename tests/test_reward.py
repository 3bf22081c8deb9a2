"""reward.py against the RM-R1 rules and against benchmark scores worked out by hand."""

import pytest

from reward import (parse_verdict, rlvr_reward, score_rewardbench, score_rm_bench, score_rmb, score_rmb_bon,
                    score_rmb_pairwise)

A, B = "<answer>[[A]]</answer>", "<answer>[[B]]</answer>"


@pytest.mark.parametrize("text, label, reward", [
    ("<eval>A is right</eval>\n\n" + A, "model_a", 1.0),
    ("<eval>A is right</eval>\n\n" + A, "model_b", -1.0),
    ("...\n" + B + "\n\n  ", "model_b", 1.0),                  # trailing whitespace is still inside the tail
    (A + " or " + B, "model_a", -1.0),                           # both tags in the tail
    (A + "x" * (81 - len(A)), "model_a", -1.0),                  # tag's first character is the 81st from the end
    (A + "x" * (80 - len(A)), "model_a", 1.0),                   # tag exactly at the start of the last 80
    (A + "x" * 200 + B, "model_b", 1.0),                         # an early wrong tag outside the tail is ignored
    ("", "model_a", -1.0),
    ("[[A]]", "model_a", -1.0),                                  # bare verdict without the answer tag
])
def test_rlvr_reward(text, label, reward):
    assert rlvr_reward(text, label) == reward


@pytest.mark.parametrize("label", ["A", "model_c", "", None])
def test_rlvr_reward_unknown_label_raises(label):
    with pytest.raises(ValueError, match="label must be 'model_a' or 'model_b'"):
        rlvr_reward(A, label)


@pytest.mark.parametrize("text, verdict", [
    ("long reasoning ... " + A, "A"),
    ("[[B]] early, then a long tail without a verdict" + "." * 500, "B"),  # anywhere, not only the tail
    (A + B, None),
    ("[[A]] ... [[B]]", None),
    ("", None),
    ("A is better", None),
    ("[[ A ]]", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


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
