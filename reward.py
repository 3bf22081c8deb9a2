"""The RM-R1 verifiable reward and the evaluation verdict (benchmarks.py scores verdicts).

    rlvr_reward("...<answer>[[A]]</answer>", "model_a")   # 1.0
    parse_verdict("... [[B]] ...")                          # "B"
"""

LETTERS = {"model_a": "A", "model_b": "B"}   # an RLVR label -> the verdict letter it stands for
ANSWER_TAGS = {label: f"<answer>[[{letter}]]</answer>" for label, letter in LETTERS.items()}


def place(chosen, rejected, chosen_is_a: bool):
    """(answer shown as Chatbot A, answer shown as Chatbot B): the chosen one at A or at B."""
    return (chosen, rejected) if chosen_is_a else (rejected, chosen)


def label(chosen_is_a: bool) -> str:
    """The RLVR label of a placement: "model_a" when the chosen answer is shown as A."""
    return "model_a" if chosen_is_a else "model_b"


def rlvr_reward(text, label):
    """+1 when the last 80 characters hold the label's answer tag and not the other one, else -1.

    Only the tail is read, as in RM-R1's training, so a trace that names both verdicts early and
    commits at the end still counts, and there is no reward for format or length.
    >>> rlvr_reward("<eval>...</eval>\\n\\n<answer>[[B]]</answer>", "model_b")
    1.0
    """
    if label not in ANSWER_TAGS:
        raise ValueError(f"label must be 'model_a' or 'model_b', got {label!r}")
    (other,) = set(LETTERS) - {label}
    tail = text[-80:]
    return 1.0 if ANSWER_TAGS[label] in tail and ANSWER_TAGS[other] not in tail else -1.0


def parse_verdict(text):
    """"A" or "B" from [[A]] / [[B]] anywhere in the text; None when both or neither appear."""
    a, b = "[[A]]" in text, "[[B]]" in text
    if a == b:
        return None
    return "A" if a else "B"
