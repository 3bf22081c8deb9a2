"""data.py against hand-written expected strings, hand-counted fixtures and the real benchmark files."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import PreTrainedTokenizerFast

import data
import tokenization
from conftest import SHARED, bot, needs_shared, user, write_jsonl
from model import ModelConfig, Transformer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Please judge the two answers. <answer>[[A]]</answer> <type>Chat</type>", "2 + 2 = 4, not 5."] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    t.chat_template = CHATML
    return t


# ---- prompts ----

@needs_shared
def test_prompts_equal_released_json():
    released = json.loads((SHARED / "rm-r1" / "prompts.json").read_text(encoding="utf-8"))
    assert data.PROMPTS == released


def test_single_turn_instruct_prompt_is_the_rm_r1_layout():
    messages = data.build_judge_messages([user("Q?"), bot("ans A")], [user("Q?"), bot("ans B")])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith("Please act as an impartial judge")
    assert messages[0]["content"].endswith("<answer>[[A/B]]</answer>")
    assert messages[1]["content"] == (
        "[Client Question]\nQ?\n\n"
        "[The Start of Chatbot A's Response]\nans A\n[The End of Chatbot A's Response]\n\n"
        "[The Start of Chatbot B's Response]\nans B\n[The End of Chatbot B's Response]")


def test_multi_turn_reasoning_prompt_renders_one_line_per_turn():
    a = [user("hi"), bot("hello"), user("2+2?"), bot("4")]
    b = [user("hi"), bot("hello"), user("2+2?"), bot("5")]
    messages = data.build_judge_messages(a, b, style="reasoning")
    assert len(messages) == 1 and messages[0]["role"] == "user"
    text = messages[0]["content"]
    assert text.startswith("Please act as an impartial judge and evaluate the quality of the responses "
                           "provided by two AI Chatbots to the Client question displayed below. \n\n")
    assert ("[The Start of the Conversation between Chatbot A and the Client]\n"
            "User: hi\nChatbot A: hello\nUser: 2+2?\nChatbot A: 4\n"
            "[The End of the Conversation between Chatbot A and the Client]\n\n"
            "[The Start of the Conversation between Chatbot B and the Client]\n"
            "User: hi\nChatbot B: hello\nUser: 2+2?\nChatbot B: 5\n"
            "[The End of the Conversation between Chatbot B and the Client]\n\n") in text
    assert text.endswith("'<answer>[[A]]</answer>' if Chatbot A is better, or '<answer>[[B]]</answer>' "
                         "if Chatbot B is better.")


@pytest.mark.parametrize("a, b, match", [
    ([user("Q")], [user("Q"), bot("x")], "end with the assistant"),
    ([user("Q"), bot("x")], [user("other Q"), bot("y")], "share every turn"),
    ([{"role": "system", "content": "s"}, user("Q"), bot("x")], [user("Q"), bot("y")], "role 'system'"),
])
def test_judge_prompt_rejects_malformed_conversations(a, b, match):
    with pytest.raises(ValueError, match=match):
        data.build_judge_messages(a, b)


# ---- reading records ----

def test_read_records_names_file_and_line_for_jsonl_and_index_for_json(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"x": 1}, {"x": 2}])
    (tmp_path / "a.json").write_text(json.dumps([{"x": 0}]))
    (tmp_path / "notes.txt").write_text("not data")
    rows = data.read_records(tmp_path)
    assert [r["x"] for _, r in rows] == [0, 1, 2]
    assert [w for w, _ in rows] == [f"{tmp_path / 'a.json'}[0]", f"{tmp_path / 'b.jsonl'}:1", f"{tmp_path / 'b.jsonl'}:2"]


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    write_jsonl(tmp_path / "hf_export.json", [{"x": 1}, {"x": 2}])
    assert [w.rsplit(":", 1)[1] for w, _ in data.read_records(tmp_path / "hf_export.json")] == ["1", "2"]


def test_non_json_line_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"x": 1}\n\n{"x": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        data.read_records(path)


def test_parquet_reads_rows_or_names_the_missing_dependency(tmp_path):
    path = tmp_path / "rows.parquet"
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(ValueError, match="pip install pyarrow"):
            data.read_records(path)
        return
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"x": 1}, {"x": 2}]), path)
    assert data.read_records(path) == [(f"{path}[0]", {"x": 1}), (f"{path}[1]", {"x": 2})]


def test_load_sft_and_rlvr(tmp_path):
    prompt = [{"role": "system", "content": "judge"}, user("pair")]
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"context_messages": prompt, "winner": "<type>Chat</type> ...",
                                                "extra": 1}])
    rlvr = write_jsonl(tmp_path / "rlvr.jsonl", [{"context_messages": prompt, "winner": "model_b"}])
    assert data.load_sft(sft) == [{"context_messages": prompt, "trace": "<type>Chat</type> ..."}]
    assert data.load_rlvr(rlvr) == [{"context_messages": prompt, "label": "model_b"}]
    # in memory a trace and a label, on disk RM-R1's `winner` for both: write_records round-trips
    for load, name in ((data.load_sft, "sft"), (data.load_rlvr, "rlvr")):
        records = load(tmp_path / f"{name}.jsonl")
        assert load(data.write_records(tmp_path / f"{name}-again.jsonl", records)) == records
    with pytest.raises(ValueError, match=r"rlvr\.jsonl:1: field 'winner' must be the reasoning trace"):
        data.load_sft(rlvr)


@pytest.mark.parametrize("record, match", [
    ({"winner": "model_a"}, r"bad\.jsonl:2: missing field 'context_messages'"),
    ({"context_messages": [user("p")], "winner": "A"}, r"bad\.jsonl:2: field 'winner' must be 'model_a' or 'model_b'"),
    ({"context_messages": [{"role": "judge", "content": "p"}], "winner": "model_a"},
     r"bad\.jsonl:2: field 'context_messages'\[0\]"),
    ({"context_messages": [user("p")], "winner": 1}, r"bad\.jsonl:2: field 'winner' must be str"),
])
def test_malformed_rlvr_record_error_names_file_line_and_field(tmp_path, record, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"context_messages": [user("p")], "winner": "model_a"}, record])
    with pytest.raises(ValueError, match=match):
        data.load_rlvr(path)


# ---- raw pairs -> RLVR ----

def test_pairs_to_rlvr_balances_labels_and_puts_chosen_where_the_label_says():
    pairs = [{"prompt": f"q{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(11)]
    records, _ = data.pairs_to_rlvr(pairs, seed=3)
    winners = [r["label"] for r in records]
    assert winners.count("model_a") == 6 and winners.count("model_b") == 5
    for i, r in enumerate(records):
        text = r["context_messages"][1]["content"]
        slot = "A" if r["label"] == "model_a" else "B"
        assert f"[The Start of Chatbot {slot}'s Response]\ngood{i}\n" in text
    assert data.pairs_to_rlvr(pairs, seed=3)[0] == records
    assert [r["label"] for r in data.pairs_to_rlvr(pairs, seed=4)[0]] != winners


def test_pairs_in_message_list_forms_give_the_same_judge_prompt():
    strings = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    skywork = {"chosen": [user("q"), bot("good")], "rejected": [user("q"), bot("bad")]}
    split = {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]}
    full = {"prompt": "q", "chosen": [user("q"), bot("good")], "rejected": [user("q"), bot("bad")]}
    outs = [data.pairs_to_rlvr([p], seed=0, style="reasoning")[0] for p in (strings, skywork, split, full)]
    assert all(o == outs[0] for o in outs)


def test_pair_without_prompt_for_string_answers_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "good", "rejected": "bad"}])
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: field 'chosen' is a string, so the record needs a 'prompt'"):
        data.pairs_to_rlvr(path, seed=0)


# ---- tokens ----

def test_encode_prompt_is_the_chatml_text_tokenized(tokenizer):
    messages = [{"role": "system", "content": "Please judge"}, user("2 + 2 = 4")]
    expected = "<|im_start|>system\nPlease judge<|im_end|>\n<|im_start|>user\n2 + 2 = 4<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenization.encode_prompt(tokenizer, messages, max_len=1000)
    assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == expected
    assert tokenization.encode_prompt(tokenizer, messages, max_len=len(ids) - 1) is None


def test_encode_sft_masks_the_trace_and_its_end_of_turn_token_only(tokenizer):
    messages = [{"role": "system", "content": "Please judge"}, user("two answers")]
    trace = "<type>Chat</type> ... <answer>[[A]]</answer>"
    ids, mask = tokenization.encode_sft(tokenizer, messages, trace, max_len=1000)
    full = ("<|im_start|>system\nPlease judge<|im_end|>\n<|im_start|>user\ntwo answers<|im_end|>\n"
            "<|im_start|>assistant\n" + trace + "<|im_end|>\n")
    assert ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    on = [t for t, m in zip(ids, mask) if m]
    first, last = mask.index(1), len(mask) - mask[::-1].index(1)
    assert mask[first:last] == [1] * (last - first), "the trace must be one contiguous span"
    assert tokenizer.decode(on) == trace + "<|im_end|>"
    assert tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(ids[last:]) == "\n"
    assert tokenization.encode_sft(tokenizer, messages, trace, max_len=len(ids) - 1) is None


def test_tokenizer_without_chat_template_is_an_error(tokenizer):
    plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="has no chat template"):
        tokenization.encode_prompt(plain, [user("q")], max_len=100)


@pytest.mark.parametrize("template, match", [
    # A template that marks the last turn differently breaks the prompt/trace split.
    (CHATML.replace("{% if add_generation_prompt %}", "{% if add_generation_prompt %}<|endoftext|>"),
     "renders the prompt differently"),
    # DeepSeek-R1-style templates drop the reasoning before </think> from assistant turns.
    (CHATML.replace("{{ m['content'] }}", "{{ m['content'].split('</think>')[-1] }}"), "changed the trace"),
    (CHATML.replace("{{ m['content'] }}<|im_end|>", "{{ m['content'] }}"), "no special token"),
])
def test_encode_sft_refuses_templates_that_would_train_the_wrong_tokens(tokenizer, template, match):
    t = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    t.chat_template = template
    with pytest.raises(ValueError, match=match):
        tokenization.encode_sft(t, [user("q")], "think</think> <answer>[[A]]</answer>", max_len=1000)


def test_pack_and_collate_by_hand():
    examples = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6, 7, 8, 9], [0, 0, 1, 1])]
    rows = tokenization.pack(examples, max_len=5)
    assert rows == [{"input_ids": [1, 2, 3, 4, 5], "loss_mask": [0, 1, 1, 0, 1], "position_ids": [0, 1, 2, 0, 1]},
                    {"input_ids": [6, 7, 8, 9], "loss_mask": [0, 0, 1, 1], "position_ids": [0, 1, 2, 3]}]
    batch = tokenization.collate(rows, pad_id=0)
    expected = {"input_ids": [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]], "loss_mask": [[0, 1, 1, 0, 1], [0, 0, 1, 1, 0]],
                "position_ids": [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]], "attention_mask": [[1] * 5, [1, 1, 1, 1, 0]]}
    for k, v in expected.items():
        assert batch[k].dtype == torch.long
        torch.testing.assert_close(batch[k], torch.tensor(v), msg=f"collate {k}")
    with pytest.raises(ValueError, match="example 0: 6 tokens > max_len 5"):
        tokenization.pack([([1] * 6, [1] * 6)], max_len=5)


def test_packed_documents_give_the_same_logits_as_separate_forwards():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = Transformer(config).eval()
    docs = [torch.randint(0, 97, (n,)).tolist() for n in (5, 3, 7)]
    rows = tokenization.pack([(d, [1] * len(d)) for d in docs], max_len=16)
    assert len(rows) == 1
    batch = tokenization.collate(rows, pad_id=0)
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])
        separate = torch.cat([model(torch.tensor([d])) for d in docs], dim=1)
    diff = (packed[:, :15] - separate).abs()
    torch.testing.assert_close(packed[:, :15], separate, atol=1e-5, rtol=1e-5,
                               msg=f"packed vs separate logits: max {diff.max():.2e}, mean {diff.mean():.2e}")
