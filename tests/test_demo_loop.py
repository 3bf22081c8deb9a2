"""The closed-loop demo's measuring pieces (demo/loop.py): the program's truth on answers worked out
by hand, the questions it draws, and the audit of a judge's rewards against the truth on a group
whose disagreement is counted by hand."""

from types import SimpleNamespace

import pytest
import torch

from demo.loop import Audited, Truth, question_pairs, result_of, truth
from demo.task import split_of


def test_the_truth_of_hand_written_answers():
    assert result_of("What is 7 + 5 - 3?") == 9 and result_of("What is 2 - 1 + 8?") == 9
    assert truth("What is 7 + 5 - 3?", "7 + 5 = 12, 12 - 3 = 9. It is 9.")
    assert not truth("What is 7 + 5 - 3?", "Sure! It is 8.")
    assert not truth("What is 7 + 5 - 3?", "9 is not it: 10")   # the last number is the answer
    assert not truth("What is 7 + 5 - 3?", "")
    question = next(q for q, _, _ in question_pairs(40, 0, "train") if not q.startswith("What is"))
    assert not truth(question, "")                              # an empty reply keeps no rule


def test_questions_are_of_their_split_half_of_each_kind_careful_right_hasty_wrong():
    pairs = question_pairs(40, 0, "test")
    assert len(pairs) == 40 and all(split_of(q) == "test" for q, _, _ in pairs)
    assert sum(q.startswith("What is") for q, _, _ in pairs) == 20
    assert all(truth(q, careful) and not truth(q, hasty) and hasty.startswith("Sure!") for q, careful, hasty in pairs)
    assert question_pairs(40, 0, "test") == pairs and question_pairs(40, 1, "test") != pairs


class Fixed:
    """A reward that returns the rewards it is given."""
    phase = None

    def __init__(self, rewards):
        self.rewards = torch.tensor(rewards)

    def __call__(self, completions, texts, records):
        return self.rewards


@pytest.mark.parametrize("rewards, disagreement", [
    ([1.0, 0.6, -1.0, 0.5], 0.0),     # both right answers above both wrong ones
    ([-1.0, 0.0, 1.0, 0.5], 1.0),     # both wrong ones above both right ones
    ([0.0, 0.0, 0.0, 0.0], 0.5),      # all ties: 1/2 each
    ([1.0, -1.0, -1.0, 0.5], 0.375),  # 0 above 2 and 3; 1 ties 2 (1/2) and is below 3 (1): 1.5 of 4
])
def test_the_audit_counts_the_pairs_a_judge_orders_against_the_truth(rewards, disagreement):
    # one group of 4: answers 0 and 1 right, 2 and 3 wrong; 4 pairs whose truth differs
    q = "What is 1 + 1 + 1?"
    records = [{"context_messages": [{"role": "user", "content": q}]}]
    completions = [SimpleNamespace(prompt_index=0) for _ in range(4)]
    texts = ["It is 3.", "1 + 1 = 2, 2 + 1 = 3", "It is 4.", "Sure! It is 2."]
    audit = Audited(Fixed(rewards))
    assert torch.equal(audit(completions, texts, records), torch.tensor(rewards))
    assert Truth()(completions, texts, records).tolist() == [1.0, 1.0, -1.0, -1.0]
    assert audit.last["truth_accuracy"] == 0.5
    assert audit.last["truth_disagreement"] == pytest.approx(disagreement)
