"""The RM-R1 verifiable reward and the evaluation verdict (benchmarks.py scores verdicts).

    rlvr_reward("...<answer>[[A]]</answer>", "model_a")   # 1.0
    parse_verdict("... [[B]] ...")                          # "B"
"""

ANSWER_TAGS = {"model_a": "<answer>[[A]]</answer>", "model_b": "<answer>[[B]]</answer>"}


def rlvr_reward(text, label):
    """+1 when the last 80 characters hold the label's answer tag and not the other one, else -1.

    Only the tail is read, as in RM-R1's training, so a trace that names both verdicts early and
    commits at the end still counts, and there is no reward for format or length.
    >>> rlvr_reward("<eval>...</eval>\\n\\n<answer>[[B]]</answer>", "model_b")
    1.0
    """
    if label not in ANSWER_TAGS:
        raise ValueError(f"label must be 'model_a' or 'model_b', got {label!r}")
    other = "model_b" if label == "model_a" else "model_a"
    tail = text[-80:]
    return 1.0 if ANSWER_TAGS[label] in tail and ANSWER_TAGS[other] not in tail else -1.0


def parse_verdict(text):
    """"A" or "B" from [[A]] / [[B]] anywhere in the text; None when both or neither appear."""
    a, b = "[[A]]" in text, "[[B]]" in text
    if a == b:
        return None
    return "A" if a else "B"
