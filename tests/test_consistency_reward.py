"""--consistency_reward (J1): each RLVR pair rolled out in both answer orders within its group, and a
verdict rewarded only when the same sample's verdict in the other order is right too."""

import pytest
import torch

import data
import demo
import distributed as D
import grpo
import passes
import tokenization
from grpo import GRPOConfig
from reward import consistency_rewards
from rewards import Verifiable
from scheduler import Completion


def chat(*turns):
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]


PAIRS = [  # (conversation a, conversation b): single turn, multi-turn, answers with braces and blank lines
    (chat("What is 2 + 3?", "5"), chat("What is 2 + 3?", "6")),
    (chat("hi", "hello {name}", "and 2 + 2?", "4\n\nsurely"), chat("hi", "hello {name}", "and 2 + 2?", "five")),
    (chat("Write {x}.", "Chatbot B is\nwrong"), chat("Write {x}.", "")),
    # lines of a turn's own text that start like a label, where they can be read only one way
    (chat("q1", "r1", "Translate this log:\nUser: hello", "x"), chat("q1", "r1", "Translate this log:\nUser: hello", "y")),
    (chat("q1", "r1", "q2", "x\nUser: hi\nChatbot A: yo"), chat("q1", "r1", "q2", "y\nUser: hi\nChatbot B: zz")),
    (chat("q1", "r1", "q2", "x\nChatbot A: more"), chat("q1", "r1", "q2", "y")),
]


@pytest.mark.parametrize("style", data.STYLES)
@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_the_other_order_is_the_prompt_of_the_other_placement(style, pair):
    a, b = PAIRS[pair]
    ab, ba = data.build_judge_messages(a, b, style), data.build_judge_messages(b, a, style)
    assert ab != ba
    assert data.other_order(ab, "x") == ba
    assert data.other_order(ba, "x") == ab


def test_a_prompt_whose_answers_cannot_be_told_apart_is_refused_by_its_place():
    marker = "[The End of Chatbot A's Response]"
    with pytest.raises(ValueError, match=r"f.jsonl:3: the judge prompt's answers hold one of the template's markers"):
        data.other_order(data.build_judge_messages(chat("q", "x " + marker), chat("q", "y")), "f.jsonl:3")
    with pytest.raises(ValueError, match=r"f.jsonl:4: the judge prompt's last turn is not one of RM-R1's templates"):
        data.other_order(chat("Which is better, A or B?"), "f.jsonl:4")
    # multi-turn: a label-like line in a shared turn is content in one conversation and a label in
    # the other: no line where the answers could start
    a, b = chat("say\nChatbot A: hi", "hi", "more", "x"), chat("say\nChatbot A: hi", "hi", "more", "y")
    with pytest.raises(ValueError, match=r"f.jsonl:5: the conversations' turns cannot be read back .*\(no line"):
        data.other_order(data.build_judge_messages(a, b), "f.jsonl:5")
    # answers that start alike and go on with a label line of their own: two assistant turns in a row
    # are no render of a conversation, so their answers start at the first line
    a, b = chat("q0", "r0", "q", "same\nChatbot A: p"), chat("q0", "r0", "q", "same\nChatbot B: q")
    assert data.other_order(data.build_judge_messages(a, b), "f.jsonl:6") == data.build_judge_messages(b, a)
    a, b = chat("q1", "r1", "q2", "x"), chat("q1", "r1", "q2", "y")
    ab = data.build_judge_messages(a, b)
    relabelled = [{**ab[0]}, {**ab[1], "content": ab[1]["content"].replace("Chatbot A: ", "Chatbot A:\n")}]
    with pytest.raises(ValueError, match=r"f.jsonl:8: the conversations' turns cannot be read back"):
        data.other_order(relabelled, "f.jsonl:8")  # turns labelled some other way: nothing to swap by


def test_an_rlvr_file_is_read_in_both_orders_and_a_record_that_cannot_be_swapped_is_named(tmp_path):
    records = demo.rlvr_records(3, seed=0)
    path = data.write_records(tmp_path / "rlvr.jsonl", records)
    both = data.load_rlvr(path, both_orders=True)
    assert [r["other_order"] for r in both] == [data.other_order(r["context_messages"], "") for r in records]
    bad = dict(records[1], context_messages=chat("Which is better?"))
    data.write_records(tmp_path / "bad.jsonl", [records[0], bad])
    data.load_rlvr(tmp_path / "bad.jsonl")  # without --consistency_reward nothing is swapped
    with pytest.raises(ValueError, match=r"bad.jsonl:2: the judge prompt's last turn is not one of RM-R1's"):
        data.load_rlvr(tmp_path / "bad.jsonl", both_orders=True)
    pairs, _ = data.pairs_to_rlvr([{"prompt": "q", "chosen": "good", "rejected": "bad"}], seed=0, both_orders=True)
    assert pairs[0]["other_order"] == data.other_order(pairs[0]["context_messages"], "")


def test_consistency_rewards_by_hand():
    # two groups of 2 prompts (AB, BA) x 3 samples; sample s of AB meets sample s of BA
    rewards = torch.tensor([1., 1., -1., 1., -1., -1.,    # AB right, right, wrong; BA right, wrong, wrong
                            -1., 1., 1., -1., 1., 1.])    # AB wrong, right, right; BA wrong, right, right
    expected = [1., -1., -1., 1., -1., -1.,
                -1., 1., 1., -1., 1., 1.]
    assert consistency_rewards(rewards, 3).tolist() == expected


def test_the_judge_metrics_in_both_orders_by_hand():
    # one group of n = 4: AB (label model_a) traces say A, B; BA (label model_b) traces say B, nothing
    records = [{"label": "model_a"}, {"label": "model_b"}]
    texts = ["<answer>[[A]]</answer>", "<answer>[[B]]</answer>", "<answer>[[B]]</answer>", "no verdict"]
    completions = [Completion(p, s, [1, 2], [0.0, 0.0], "stop") for p in range(2) for s in range(2)]
    reward = Verifiable(both_orders=True)
    rewards = reward(completions, texts, records)
    assert rewards.tolist() == [1., -1., 1., -1.]  # pair 0 right in both orders; pair 1 wrong in both
    rnd = passes.Round(records, None, completions, texts, rewards, rewards, None)
    m = reward.metrics(rnd, 4)
    assert m["accuracy"] == 0.5 and m["reward"] == 0.0 and m["both_orders_right"] == 0.5
    # pair 0 names the chosen answer twice; pair 1 has no verdict in one order: it names no answer
    assert m["position_consistency"] == 0.5 and m["invalid_format"] == 0.25
    texts[3] = "<answer>[[A]]</answer>"  # BA's sample 1 now names the rejected answer, as AB's does
    m = reward.metrics(passes.Round(records, None, completions, texts, rewards, rewards, None), 4)
    assert m["position_consistency"] == 1.0 and m["accuracy"] == 0.5
    # the letters decide it, not the reward's last-80-characters rule: AB's [[A]] early in its trace
    # (no reward) and BA's [[B]] name the same answer; [[B]] in both orders names both answers
    texts = ["<answer>[[A]]</answer>" + "x" * 100, "<answer>[[B]]</answer>", "<answer>[[B]]</answer>",
             "<answer>[[B]]</answer>"]
    rewards = reward(completions, texts, records)
    m = reward.metrics(passes.Round(records, None, completions, texts, rewards, rewards, None), 4)
    assert m["position_consistency"] == 0.5 and rewards.tolist() == [-1.] * 4
    assert m["all_equal_groups"] == 1.0, "the group's consistency rewards are all alike: it trains nothing"


def test_a_step_rolls_out_each_pair_in_both_orders_in_one_group(tiny_policy):
    path, tokenizer = tiny_policy
    cfg = GRPOConfig(model=path, lr=1e-3, rollout_batch_size=4, mini_batch_size=2, n_samples=4, max_response_len=4,
                     micro_batch_tokens=1024, kl_coef=0.0, bf16=False, activation_checkpointing=False,
                     rollout_slots=16, consistency_reward=True)
    ctx = D.Context(rank=0, world_size=1, device=torch.device("cpu"))
    records = demo.rlvr_records(8, seed=0)
    prompts = grpo.encode(tokenizer, records, cfg, "train")  # the demo's records: other orders made here
    model = D.load_model(path, ctx)
    policy = grpo.Policy(model, torch.optim.AdamW(model.parameters(), lr=cfg.lr), tokenizer, None)
    result = grpo.grpo_step(policy, prompts, 0, cfg, ctx, score=grpo.build_reward(cfg, ctx, tokenizer))
    rnd, order = result.rounds[0], data.step_prompts(len(records), 0, cfg)
    assert len(rnd.prompts) == 8 and len(rnd.completions) == 16
    for g, k in enumerate(order):
        ab, ba = rnd.prompts[2 * g], rnd.prompts[2 * g + 1]
        assert ab.ids == tokenization.encode_prompt(tokenizer, records[k]["context_messages"], 4096)
        assert ba.ids == tokenization.encode_prompt(tokenizer, data.other_order(records[k]["context_messages"], ""), 4096)
        assert (ab.key, ba.key) == (2 * g, 2 * g + 1), "each order has its own sampling noise"
        assert {rnd.records[2 * g]["label"], rnd.records[2 * g + 1]["label"]} == {"model_a", "model_b"}
        group = rnd.completions[4 * g:4 * g + 4]
        assert [(c.prompt_index, c.sample_index) for c in group] == [(2 * g, 0), (2 * g, 1), (2 * g + 1, 0), (2 * g + 1, 1)]
    right = torch.tensor([1.0 if r > 0 else -1.0 for r in
                          Verifiable()(rnd.completions, rnd.texts, rnd.records).tolist()])
    assert rnd.rewards.tolist() == consistency_rewards(right, 2).tolist()
    assert {"both_orders_right", "position_consistency"} <= set(result.metrics)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_samples=7), "--n_samples 7: must be even and >= 4 with --consistency_reward"),
    (dict(n_samples=2), "--n_samples 2: must be even and >= 4 with --consistency_reward"),
    (dict(reward="judge", judge="some/dir", n_samples=8), "--consistency_reward True: rewards a judge's verdicts on RLVR pairs"),
])
def test_settings_the_consistency_reward_cannot_use_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        grpo.check_config(GRPOConfig(consistency_reward=True, **overrides), 1)
