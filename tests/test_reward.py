"""reward.py against the RM-R1 rules."""

import pytest

from reward import parse_verdict, rlvr_reward

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
