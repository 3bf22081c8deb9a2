"""The shipped demo judge (demo/sft) still loads and judges with the current code."""

import eval as judge_eval
from demo import SHIPPED


def test_shipped_demo_judge_writes_valid_verdicts_above_chance(tmp_path):
    scores = judge_eval.main(["--demo_pairs", "60", "--out", str(tmp_path), "--model", SHIPPED])
    assert scores["comparisons"] == 60
    assert scores["invalid_verdict_rate"] == 0, scores
    # Greedy and deterministic. On 400 held-out pairs the committed checkpoint gets 68.5%: 74%
    # of the arithmetic (reasoning) pairs and 63% of the instruction-following (chat) pairs.
    assert scores["scores"]["accuracy"] > 0.55, scores
    assert scores["scores"]["reasoning"] >= 0.6, scores
