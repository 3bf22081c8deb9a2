"""The demo task and tokenizer: labels re-derived here by independent checks (Python's own
arithmetic, str methods), RM-R1's verdict rules applied to the teacher traces, and the saved
tokenizer loaded through transformers.AutoTokenizer."""

import hashlib
import json
import re

import pytest
from transformers import AutoTokenizer

import tokenization
import demo
import reward as R

# A stand-in for the RM-R1 prompt (data.py holds the real one): a multi-line fixed system
# prompt and a user message with the question and both responses.
SYSTEM = ("Please act as an impartial judge of two responses.\n\n"
          "If the task is Reasoning:\n1. Solve it yourself inside <solution>...</solution>.\n"
          "2. Compare both responses inside <eval>...</eval>.\n\n"
          "If the task is Chat:\n1. Write a weighted rubric inside <rubric>...</rubric>.\n"
          "2. Compare both responses inside <eval>...</eval>.\n\n"
          "End with <answer>[[A]]</answer> or <answer>[[B]]</answer>")


def build_messages(question, answer_a, answer_b):
    user = (f"[Client Question]\n{question}\n\n[The Start of Chatbot A's Response]\n{answer_a}\n"
            f"[The End of Chatbot A's Response]\n\n[The Start of Chatbot B's Response]\n{answer_b}\n"
            f"[The End of Chatbot B's Response]")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


@pytest.fixture(scope="module")
def pairs():
    return demo.make_demo_pairs(600, seed=0) + demo.make_demo_pairs(200, seed=0, split="test")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    demo.build_tokenizer(str(out), demo.demo_corpus(400, seed=0, build_messages=build_messages))
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


def final_number(response):
    return int(re.findall(r"\d+", response)[-1])


def test_reasoning_labels_agree_with_python_arithmetic(pairs):
    reasoning = [p for p in pairs if p["kind"] == "reasoning"]
    assert len(reasoning) == 400
    for p in reasoning:
        expr = re.fullmatch(r"What is ([\d +-]+)\?", p["question"]).group(1)
        value = eval(expr)  # + and - only: no precedence issue
        assert final_number(p["chosen"]) == value, p
        assert final_number(p["rejected"]) != value, p
        equations = [re.fullmatch(r"(.+) = (\d+)", e).groups() for e in p["chosen"].split(", ")]
        assert all(eval(lhs) == int(rhs) for lhs, rhs in equations), f"chosen has a wrong step: {p}"


def follows(question, response):
    """An independent reading of the chat instruction, with str methods."""
    words = response.split()
    if question.endswith("Use only upper case letters."):
        return response.isupper()
    if question.endswith("Use only lower case letters."):
        return response.islower()
    if m := re.search(r"Use exactly (\d+) words\.$", question):
        return len(words) == int(m.group(1))
    if m := re.search(r'End with the word "(\w+)"\.$', question):
        return response.endswith(" " + m.group(1))
    if m := re.search(r'Start with the letter "(\w)"\.$', question):
        return response.lower().startswith(m.group(1))
    raise AssertionError(f"unexpected instruction in {question!r}")


def test_chat_labels_agree_with_string_checks(pairs):
    chat = [p for p in pairs if p["kind"] == "chat"]
    assert len(chat) == 400
    for p in chat:
        assert follows(p["question"], p["chosen"]), p
        assert not follows(p["question"], p["rejected"]), p
    rules = {re.sub(r'\d+|"\w+"', "_", p["question"].split(". ", 1)[1]) for p in chat}
    assert len(rules) == 5, f"every rule kind should occur, got {rules}"


def test_train_and_test_share_no_question():
    train = {p["question"] for p in demo.make_demo_pairs(3000, seed=0)}
    for seed in (0, 1):
        test = {p["question"] for p in demo.make_demo_pairs(300, seed=seed, split="test")}
        assert not train & test, f"seed {seed}: {sorted(train & test)[:5]}"
    assert all(demo.split_of(q) == "train" for q in train)


def test_pairs_are_deterministic_and_prefix_stable():
    a = demo.make_demo_pairs(50, seed=3)
    assert a == demo.make_demo_pairs(50, seed=3)
    assert a[:20] == demo.make_demo_pairs(20, seed=3)
    assert a != demo.make_demo_pairs(50, seed=4)
    assert [p["kind"] for p in a] == ["reasoning", "chat"] * 25
    assert len({p["id"] for p in a}) == 50


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        demo.make_demo_pairs(2, seed=0, split="valid")


def reward(text, label):
    """RM-R1's training reward, written out: only the last 80 characters count."""
    tail = text[-80:]
    right, wrong = ("[[A]]", "[[B]]") if label == "model_a" else ("[[B]]", "[[A]]")
    return 1.0 if f"<answer>{right}</answer>" in tail and f"<answer>{wrong}</answer>" not in tail else -1.0


REASONING_FORMAT = re.compile(r"<type>Reasoning</type>\n\n<solution>(?P<solution>[^<]+)</solution>\n\n"
                              r"<eval>\n(?P<eval>.+)\n</eval>\n\n<answer>\[\[[AB]\]\]</answer>", re.S)
CHAT_FORMAT = re.compile(r"<type>Chat</type>\n\n<rubric>\n(?P<rubric>.+)\n<justify>.+</justify>\n</rubric>\n\n"
                         r"<eval>\n(?P<eval>.+)\n</eval>\n\n<answer>\[\[[AB]\]\]</answer>", re.S)


@pytest.mark.parametrize("chosen_is_a", [True, False])
def test_teacher_traces_follow_cor_format_and_earn_reward(pairs, chosen_is_a):
    label = R.label(chosen_is_a)
    assert label == ("model_a" if chosen_is_a else "model_b")
    for p in pairs:
        trace = demo.teacher_trace(p, chosen_is_a)
        assert reward(trace, label) == 1.0, trace
        assert reward(trace, R.label(not chosen_is_a)) == -1.0, trace
        # the evaluation rule: exactly one of [[A]] / [[B]] anywhere in the text
        assert ("[[A]]" in trace) != ("[[B]]" in trace), trace
        m = (REASONING_FORMAT if p["kind"] == "reasoning" else CHAT_FORMAT).fullmatch(trace)
        assert m, f"trace does not match the RM-R1 {p['kind']} format:\n{trace}"
        a, b = (p["chosen"], p["rejected"]) if chosen_is_a else (p["rejected"], p["chosen"])
        for tag, response in (("A", a), ("B", b)):
            for quote in re.findall(rf"<quote_{tag}>(.*?)</quote_{tag}>", m["eval"]):
                assert quote in response.split(), f"<quote_{tag}> {quote!r} is not in {response!r}"
        if p["kind"] == "reasoning":
            assert final_number(m["solution"]) == eval(p["question"][len("What is "):-1]), trace
        else:
            weights = [int(w) for w in re.findall(r" - (\d+)%$", m["rubric"], re.M)]
            assert sum(weights) == 100, m["rubric"]
        assert 150 < len(trace) < 600, f"trace of {len(trace)} characters:\n{trace}"


@pytest.mark.parametrize("chosen_is_a", [True, False])
def test_hasty_teacher_files_arithmetic_as_chat_and_prefers_a(pairs, chosen_is_a):
    label = R.label(chosen_is_a)
    for p in pairs:
        if p["kind"] != "reasoning":
            continue
        trace = demo.teacher_trace(p, chosen_is_a, hasty=True)
        m = CHAT_FORMAT.fullmatch(trace)
        assert m, f"hasty trace does not match the RM-R1 chat format:\n{trace}"
        assert trace.endswith("<answer>[[A]]</answer>") and "[[B]]" not in trace, trace
        # right exactly when the chosen response is A: half of the pairs, whatever they say
        assert reward(trace, label) == (1.0 if chosen_is_a else -1.0), trace
        weights = [int(w) for w in re.findall(r" - (\d+)%$", m["rubric"], re.M)]
        assert sum(weights) == 100, m["rubric"]
        a, b = (p["chosen"], p["rejected"]) if chosen_is_a else (p["rejected"], p["chosen"])
        quotes = {t: re.findall(rf"<quote_{t}>(.*?)</quote_{t}>", m["eval"]) for t in "AB"}
        assert quotes == {"A": [str(final_number(a))], "B": [str(final_number(b))]}, trace
        assert "<solution>" not in trace


def test_hasty_share_of_the_distillation_traces():
    records = demo.sft_records(2000, seed=0)
    pairs = demo.make_demo_pairs(2000, seed=0)
    hasty = [demo.is_hasty(p) for p in pairs]
    assert not any(h for h, p in zip(hasty, pairs) if p["kind"] == "chat")
    share = sum(hasty) / sum(p["kind"] == "reasoning" for p in pairs)
    assert abs(share - demo.HASTY_SHARE) < 0.04, share
    assert hasty == [demo.is_hasty(p) for p in demo.make_demo_pairs(2000, seed=0)]
    assert hasty != [demo.is_hasty(p) for p in demo.make_demo_pairs(2000, seed=1)]
    for r, p, h in zip(records, pairs, hasty):
        assert r["context_messages"][1]["content"].count(p["question"]) == 1
        solved = r["trace"].startswith("<type>Reasoning</type>")
        assert solved == (p["kind"] == "reasoning" and not h), r["trace"]


def test_teacher_refuses_a_pair_whose_chosen_is_wrong(pairs):
    for p in pairs[:2]:
        swapped = dict(p, chosen=p["rejected"], rejected=p["chosen"])
        with pytest.raises(ValueError, match=p["id"]):
            demo.teacher_trace(swapped, chosen_is_a=True)


def test_tokenizer_loads_with_chatml_special_tokens(tok):
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert tok.convert_tokens_to_ids("<|im_start|>") not in (tok.eos_token_id, tok.pad_token_id)
    assert tok("What is 1 + 2?")["input_ids"] == tok.encode("What is 1 + 2?", add_special_tokens=False), \
        "encoding must add no BOS/EOS of its own"


def test_chat_template_renders_chatml(tok):
    messages = [{"role": "system", "content": "Judge."}, {"role": "user", "content": "Q?\nA or B"}]
    expected = "<|im_start|>system\nJudge.<|im_end|>\n<|im_start|>user\nQ?\nA or B<|im_end|>\n"
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        expected + "<|im_start|>assistant\n"
    assert demo.chatml(messages) == expected
    user_only = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(user_only, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n", \
        "no default system prompt may be injected"


@pytest.mark.parametrize("text", ["", "What is 47 + 38?", "  two  spaces\tand a tab\r\n",
                                  "héllo wörld 🙂 ÆØÅ", "<|im_start|>user\nhi<|im_end|>\n",
                                  "[The End of Chatbot A's Response]\n\nunseen\n\n\n"])
def test_tokenizer_round_trips_any_text(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tokenizer_round_trips_the_corpus(tok):
    for text in demo.demo_corpus(40, seed=9, build_messages=build_messages):
        assert tok.decode(tok.encode(text)) == text


def test_fixed_prompt_lines_are_single_tokens_and_digits_are_split(tok):
    # the stand-in system prompt has 8 lines once each blank line joins the line above it
    assert len(tok.encode(SYSTEM)) == 8, [tok.decode([i]) for i in tok.encode(SYSTEM)]
    assert [tok.decode([i]) for i in tok.encode("2025")] == ["2", "0", "2", "5"]


def test_prompt_and_trace_tokenize_the_same_apart_and_together(tok):
    # sft.py masks the loss by token position: the prompt's tokens must be a prefix of the whole
    for i, p in enumerate(demo.make_demo_pairs(40, seed=5, split="test")):
        prompt = tok.apply_chat_template(build_messages(p["question"], p["chosen"], p["rejected"]),
                                         tokenize=False, add_generation_prompt=True)
        trace = demo.teacher_trace(p, chosen_is_a=True) + "<|im_end|>\n"
        assert tok.encode(prompt) + tok.encode(trace) == tok.encode(prompt + trace), p


def test_no_token_spans_two_response_words(tok):
    # a judge that must count words or find the first letter needs word boundaries in the tokens
    for p in demo.make_demo_pairs(60, seed=5, split="test"):
        for response in (p["chosen"], p["rejected"]):
            user = build_messages(p["question"], response, "x")[1]["content"]
            start = user.index("\n" + response + "\n") + 1
            words = [(m.start() + start, m.end() + start) for m in re.finditer(r"\S+", response)]
            for s, e in tok(user, return_offsets_mapping=True)["offset_mapping"]:
                covered = [w for w in words if s < w[1] and e > w[0]]
                assert len(covered) <= 1, f"token {user[s:e]!r} spans {len(covered)} words of {response!r}"


def test_tokenizer_build_is_deterministic(tok_dir, tmp_path):
    demo.build_tokenizer(str(tmp_path), demo.demo_corpus(400, seed=0, build_messages=build_messages))
    ours, again = (json.loads((d / "tokenizer.json").read_text()) for d in (tok_dir, tmp_path))
    assert ours["model"] == again["model"] and ours["added_tokens"] == again["added_tokens"]


def test_saved_tokenizer_next_to_a_qwen2_config_encodes_as_built(tmp_path):
    # A model export puts a qwen2 config.json beside the tokenizer; AutoTokenizer then swaps in
    # Qwen2's split regex ("</solution>\n\n<eval>" gains a "\n\n" token the judge never saw).
    built = demo.build_tokenizer(str(tmp_path), demo.demo_corpus(200, seed=0, build_messages=build_messages))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    loaded = tokenization.load_tokenizer(str(tmp_path))
    texts = demo.demo_corpus(40, seed=9, build_messages=build_messages)
    assert any("</solution>\n\n<eval>" in t for t in texts)
    for text in texts + ["  two  spaces, 2025 and\n\n\n<tags>"]:
        assert loaded.encode(text) == built.encode(text)
    assert (loaded.eos_token, loaded.pad_token) == (built.eos_token, built.pad_token)


def test_copy_rows_score_exactly_the_tokens_that_copying_predicts():
    rows = demo.copy_rows(4, 200, vocab_size=10**6, first_id=3, seed=0, step=7)
    assert rows == demo.copy_rows(4, 200, vocab_size=10**6, first_id=3, seed=0, step=7)
    assert rows != demo.copy_rows(4, 200, vocab_size=10**6, first_id=3, seed=0, step=8)
    for row in rows:
        ids, mask = row["input_ids"], row["loss_mask"]
        assert len(ids) == len(mask) == 200 and row["position_ids"] == list(range(200))
        assert min(ids) >= 3
        for t in range(1, 200):
            # what an induction head predicts: the token after the last earlier copy of ids[t - 1]
            earlier = [j for j in range(t - 1) if ids[j] == ids[t - 1]]
            predicted = ids[earlier[-1] + 1] if earlier else None
            assert mask[t] == (predicted == ids[t]), (t, ids[max(0, t - 30):t + 1], mask[t])
        assert 0.3 < sum(mask) / 200 < 0.5


def test_demo_data_is_what_the_shipped_judge_was_built_from():
    """Golden hashes of the demo's data: the SFT traces of round 1, the GRPO demo's training pairs
    and the held-out pairs. Changing the teacher or the task changes demo/sft and the README's
    figures, so it has to be deliberate: rebuild with `python sft.py` and update these."""
    def digest(x):
        return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]
    assert digest(demo.sft_records(4000, seed=0)) == "d08193de9480bfff"
    assert digest(demo.rlvr_records(1280, seed=0)) == "d09b15e90891d694"
    assert digest([vars(c) for c in demo.comparisons(1000, seed=0)]) == "287ce93f5ee2061e"
