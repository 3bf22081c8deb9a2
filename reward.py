"""The RM-R1 verifiable reward and the evaluation verdict (benchmarks.py scores verdicts).

    rlvr_reward("...<answer>[[A]]</answer>", "model_a")   # 1.0
    parse_verdict("... [[B]] ...")                          # "B"
    rewards = rlvr_rewards(completions, texts, records)     # a rollout's, as a tensor
    consistency_rewards(rewards, per_prompt)                # J1's: +1 only when right in both answer orders
    judge_metrics(completions, labels, rewards, verdicts, n)   # what grpo.py logs of a judge
"""

from collections import Counter

import numpy as np
import torch

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


def rlvr_rewards(completions, texts, records):
    """The paper's reward of each trace (rollout.Completion, its text, the records its prompts
    came from): +1/-1 from the verdict in the last 80 characters vs the record's label."""
    return torch.tensor([rlvr_reward(t, records[c.prompt_index]["label"])
                         for c, t in zip(completions, texts)])


def consistency_rewards(rewards, per_prompt):
    """J1's verdict-consistency reward (Whitehouse et al., 2025, arXiv 2505.10320): a verdict
    earns +1 only when it is right in both answer orders. `rewards` (+1/-1, rlvr_rewards) come in
    groups of two prompts, a pair as shown and then with its answers' places swapped, per_prompt
    traces each; trace s of either order gets +1 when it and trace s of the other order are both
    right, else -1. J1 states the rule for one judgment per order; which of a GRPO group's
    samples of one order meets which of the other's it leaves open: here sample s meets sample s,
    both drawn independently, so the pairing is a random matching.
    >>> consistency_rewards(torch.tensor([1., 1., 1., -1.]), 2).tolist()  # (AB: right, right; BA: right, wrong)
    [1.0, -1.0, 1.0, -1.0]
    """
    both = (rewards > 0).view(-1, 2, per_prompt).all(1, keepdim=True)
    return torch.where(both, 1.0, -1.0).expand(-1, 2, per_prompt).reshape(-1)


def judge_metrics(completions, labels, rewards, verdicts, n):
    """What none of the general frameworks log for a judge: verdict balance vs gold, invalid
    format, k-of-n correct histogram, all-equal groups, lengths of right vs wrong traces."""
    right = rewards > 0
    lengths = torch.tensor([float(len(c.token_ids)) for c in completions])
    groups = right.view(-1, n).sum(-1)
    m = {"reward": rewards.mean(), "accuracy": right.float().mean(),
         "share_A": np.mean([v == "A" for v in verdicts]),
         "gold_share_A": np.mean([l == "model_a" for l in labels]),
         "invalid_format": np.mean([v is None for v in verdicts]),
         "all_equal_groups": ((groups == 0) | (groups == n)).float().mean(),
         "response_len": lengths.mean(), "response_len_max": lengths.max(),
         "truncated": np.mean([c.finish_reason == "length" for c in completions]),
         "len_right": lengths[right].mean() if right.any() else 0.0,
         "len_wrong": lengths[~right].mean() if (~right).any() else 0.0}
    hist = Counter(groups.tolist())
    m.update({f"groups_{k}_of_{n}": hist.get(k, 0) / len(groups) for k in range(n + 1)})
    return m
