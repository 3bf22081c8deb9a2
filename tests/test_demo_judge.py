"""The shipped demo judge (demo/sft) still loads and judges with the current code, and still has
the habit that the demo's GRPO run removes."""

import eval as judge_eval
from demo import SHIPPED


def test_shipped_demo_judge_writes_valid_verdicts_above_chance(tmp_path):
    scores = judge_eval.main(["--demo_pairs", "60", "--out", str(tmp_path), "--model", SHIPPED])
    assert scores["comparisons"] == 60
    assert scores["invalid_verdict_rate"] == 0, scores
    # Greedy and deterministic. On 1,000 held-out pairs the committed checkpoint gets 68.8%: 91.4%
    # of the instruction-following (chat) pairs and 46.2% of the arithmetic (reasoning) ones; on
    # these 60, 71.7% (chat 90.0%, reasoning 53.3%).
    assert scores["scores"]["accuracy"] > 0.6, scores
    assert scores["scores"]["chat"] >= 0.8, scores
    # Distilled from a teacher that is hasty on most arithmetic pairs (demo.HASTY_SHARE), the
    # judge files every held-out arithmetic question as Chat and prefers A without solving:
    # what `torchrun --nproc_per_node=2 grpo.py` unlearns (68.8% -> 80.0% on 1,000 pairs).
    records = judge_eval.read_log(tmp_path / "samples.jsonl")
    arithmetic = [r for r in records if r["category"] == "reasoning"]
    hasty = [r for r in arithmetic if r["judgment"].startswith("<type>Chat</type>") and r["verdict"] == "A"]
    assert len(arithmetic) == 30 and len(hasty) >= 25, [r["judgment"] for r in arithmetic[:3]]
