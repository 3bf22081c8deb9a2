"""Preference data -> RM-R1 judge prompts -> token batches.

    messages = build_judge_messages(conversation_a, conversation_b, style="instruct")
    records, identical = pairs_to_rlvr("pairs.jsonl", seed=0)  # [{"context_messages", "label"}], dropped
    tokenizer = load_tokenizer("runs/sft/hf")             # what tokenizer.json says, nothing swapped
    ids = encode_prompt(tokenizer, messages, max_len=4096)   # None when too long: count it
    ids, loss_mask = encode_sft(tokenizer, messages, trace, max_len=12288)
    batch = collate(pack(examples, max_len=12288), pad_id=tokenizer.pad_token_id)

Every loader fails on the first malformed record with a ValueError that names the file, the
line (JSONL, 1-based) or index (JSON list / Parquet row, 0-based) and the field; nothing is
dropped silently. Prompt strings are the released RM-R1 ones, byte for byte, so the released
RM-R1 checkpoints work with this code.
"""

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Literal, get_args

import numpy as np


from reward import label, place

# The RM-R1 release's strings, verbatim: Instruct judges get the system prompt plus a user turn,
# DeepSeek-R1-distilled judges a single user turn (their chat template ignores system prompts).
PROMPTS = {
    'instruct_system_prompt': (
        "Please act as an impartial judge and evaluate the quality of the responses provided by two AI Chatbots to the Client's question displayed below.\n"
        '\n'
        'First, classify the task into one of two categories: <type>Reasoning</type> or <type>Chat</type>.\n'
        '- Use <type>Reasoning</type> for tasks that involve math, coding, or require domain knowledge, multi-step inference, logical deduction, or combining information to reach a conclusion.\n'
        '- Use <type>Chat</type> for tasks that involve open-ended or factual conversation, stylistic rewrites, safety questions, or general helpfulness requests without deep reasoning.\n'
        '\n'
        'If the task is Reasoning:\n'
        "1. Solve the Client's question yourself and present your final answer within <solution>...</solution> tags.\n"
        '2. Evaluate the two Chatbot responses based on correctness, completeness, and reasoning quality, referencing your own solution.\n'
        '3. Include your evaluation inside <eval>...</eval> tags, quoting or summarizing the Chatbots using the following tags:\n'
        '   - <quote_A>...</quote_A> for direct quotes from Chatbot A\n'
        '   - <summary_A>...</summary_A> for paraphrases of Chatbot A\n'
        '   - <quote_B>...</quote_B> for direct quotes from Chatbot B\n'
        '   - <summary_B>...</summary_B> for paraphrases of Chatbot B\n'
        '4. End with your final judgment in the format: <answer>[[A]]</answer> or <answer>[[B]]</answer>\n'
        '\n'
        'If the task is Chat:\n'
        "1. Generate evaluation criteria (rubric) tailored to the Client's question and context, enclosed in <rubric>...</rubric> tags.\n"
        '2. Assign weights to each rubric item based on their relative importance.\n'
        '3. Inside <rubric>, include a <justify>...</justify> section explaining why you chose those rubric criteria and weights.\n'
        '4. Compare both Chatbot responses according to the rubric.\n'
        '5. Provide your evaluation inside <eval>...</eval> tags, using <quote_A>, <summary_A>, <quote_B>, and <summary_B> as described above.\n'
        '6. End with your final judgment in the format: <answer>[[A]]</answer> or <answer>[[B]]</answer>\n'
        '\n'
        'Important Notes:\n'
        '- Be objective and base your evaluation only on the content of the responses.\n'
        '- Do not let response order, length, or Chatbot names affect your judgment.\n'
        '- Follow the response format strictly depending on the task type.\n'
        '\n'
        'Your output must follow one of the two formats below:\n'
        '\n'
        'For Reasoning:\n'
        '<type>Reasoning</type>\n'
        '\n'
        '<solution> your own solution for the problem </solution>\n'
        '\n'
        '<eval>\n'
        '  include direct comparisons supported by <quote_A>...</quote_A> or <summary_A>...</summary_A>, and <quote_B>...</quote_B>, or <summary_B>...</summary_B>\n'
        '</eval>\n'
        '\n'
        '<answer>[[A/B]]</answer>\n'
        '\n'
        'For Chat:\n'
        '<type>Chat</type>\n'
        '\n'
        '<rubric>\n'
        '  detailed rubric items\n'
        '  <justify> justification for the rubric </justify>\n'
        '</rubric>\n'
        '\n'
        '<eval>\n'
        '  include direct comparisons supported by <quote_A>...</quote_A> or <summary_A>...</summary_A>, and <quote_B>...</quote_B>, or <summary_B>...</summary_B> tags\n'
        '</eval>\n'
        '\n'
        '<answer>[[A/B]]</answer>'
    ),
    'instruct_user_single_turn': (
        '[Client Question]\n'
        '{question}\n'
        '\n'
        "[The Start of Chatbot A's Response]\n"
        '{answer_a}\n'
        "[The End of Chatbot A's Response]\n"
        '\n'
        "[The Start of Chatbot B's Response]\n"
        '{answer_b}\n'
        "[The End of Chatbot B's Response]"
    ),
    'instruct_user_multi_turn': (
        '[The Start of the Conversation between Chatbot A and the Client]\n'
        '{conversation_1}\n'
        '[The End of the Conversation between Chatbot A and the Client]\n'
        '\n'
        '[The Start of the Conversation between Chatbot B and the Client]\n'
        '{conversation_2}\n'
        '[The End of the Conversation between Chatbot B and the Client]'
    ),
    'reasoning_user_single_turn': (
        'Please act as an impartial judge and evaluate the quality of the responses provided by two AI Chatbots to the Client question displayed below. \n'
        '\n'
        '[Client Question]\n'
        '{question}\n'
        '\n'
        "[The Start of Chatbot A's Response]\n"
        '{answer_a}\n'
        "[The End of Chatbot A's Response]\n"
        '\n'
        "[The Start of Chatbot B's Response]\n"
        '{answer_b}\n'
        "[The End of Chatbot B's Response]\n"
        '\n'
        "Output your final verdict at last by strictly following this format: '<answer>[[A]]</answer>' if Chatbot A is better, or '<answer>[[B]]</answer>' if Chatbot B is better."
    ),
    'reasoning_user_multi_turn': (
        'Please act as an impartial judge and evaluate the quality of the responses provided by two AI Chatbots to the Client question displayed below. \n'
        '\n'
        '[The Start of the Conversation between Chatbot A and the Client]\n'
        '{conversation_1}\n'
        '[The End of the Conversation between Chatbot A and the Client]\n'
        '\n'
        '[The Start of the Conversation between Chatbot B and the Client]\n'
        '{conversation_2}\n'
        '[The End of the Conversation between Chatbot B and the Client]\n'
        '\n'
        "Output your final verdict at last by strictly following this format: '<answer>[[A]]</answer>' if Chatbot A is better, or '<answer>[[B]]</answer>' if Chatbot B is better."
    ),
}
Style = Literal["instruct", "reasoning"]  # instruct: system + user prompt; reasoning: one user turn (R1-distilled)
STYLES = get_args(Style)
ROLES = ("system", "user", "assistant")
LABELS = ("model_a", "model_b")


# ---- judge prompts ----

def render_turns(conversation, chatbot):
    """One line per turn, `User: ...` / `Chatbot A: ...`, as the RM-R1 multi-turn harness does."""
    return "\n".join(f"{'User' if m['role'] == 'user' else chatbot}: {m['content']}" for m in conversation)


def build_judge_messages(conversation_a, conversation_b, style="instruct"):
    """The judge's chat messages for comparing two conversations that end with the answers.

    One user turn each fills the single-turn template ({question}, {answer_a}, {answer_b});
    longer conversations are rendered whole. "instruct" -> [system, user], "reasoning" -> [user]:
        build_judge_messages([user("2+2?"), assistant("4")], [user("2+2?"), assistant("5")])
        -> [{"role": "system", ...}, {"role": "user", "content": "[Client Question]\\n2+2?\\n\\n..."}]
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    a = check_conversation(conversation_a, "conversation_a", "messages")
    b = check_conversation(conversation_b, "conversation_b", "messages")
    if a[:-1] != b[:-1]:
        raise ValueError("conversation_a and conversation_b must share every turn but the last answer")
    if len(a) == 2:
        user = PROMPTS[f"{style}_user_single_turn"].format(
            question=a[0]["content"], answer_a=a[1]["content"], answer_b=b[1]["content"])
    else:
        user = PROMPTS[f"{style}_user_multi_turn"].format(
            conversation_1=render_turns(a, "Chatbot A"), conversation_2=render_turns(b, "Chatbot B"))
    if style == "reasoning":
        return [{"role": "user", "content": user}]
    return [{"role": "system", "content": PROMPTS["instruct_system_prompt"]}, {"role": "user", "content": user}]


def swap_answers(one, two, where) -> tuple[str, str]:
    """Two conversations as render_turns writes them (the turns they share, then each its answer;
    Chatbot A's turns labelled 'Chatbot A: ', B's 'Chatbot B: ') with their answers swapped; the
    answers' own text is kept as it is. An answer may start at a line k where conversation 1 has
    A's label and conversation 2 B's, everything before is the same but for those labels, and the
    nearest line above that starts with 'User: ' or a label is a 'User: ' one (an answer follows
    a user turn). The answers start at the last such line: every shared assistant turn is one too.
    None is refused (a label-like line in a shared turn, turns labelled otherwise). Answers whose
    first lines are alike up to a 'User: ' line and a label line of their own read as more shared
    turns: their text is a render of that conversation too, and nothing tells the two apart."""
    lines1, lines2 = one.split("\n"), two.split("\n")
    a, b = "Chatbot A: ", "Chatbot B: "
    relabelled = [b + line[len(a):] if line.startswith(a) else line for line in lines1]

    def after_user(k):
        above = [line for line in lines1[:k] if line.startswith(("User: ", a))]
        return bool(above) and above[-1].startswith("User: ")

    starts = [k for k in range(min(len(lines1), len(lines2))) if lines1[k].startswith(a) and lines2[k].startswith(b)
              and relabelled[:k] == lines2[:k] and after_user(k)]
    if not starts:
        raise ValueError(f"{where}: the conversations' turns cannot be read back as render_turns writes them "
                         f"(no line where their answers could start), so their places cannot be swapped")
    k = starts[-1]
    return ("\n".join(lines1[:k] + [a + lines2[k][len(b):]] + lines2[k + 1:]),
            "\n".join(lines2[:k] + [b + lines1[k][len(a):]] + lines1[k + 1:]))


def other_order(messages, where):
    """The judge prompt of `messages` (an RM-R1 judge prompt, as build_judge_messages writes it)
    with its two answers' places swapped: what A showed, B shows. The user turn is read back
    through its template (data.PROMPTS, either style, single- or multi-turn), so this holds for
    pre-rendered RLVR files. A prompt that is not one of the templates, or whose answers hold a
    template's marker, or multi-turn turns swap_answers cannot read back, is refused, naming
    `where`.
        other_order(build_judge_messages(a, b), "x") == build_judge_messages(b, a)
    """
    *before, user = messages
    for name, template in PROMPTS.items():
        if name.endswith("system_prompt"):
            continue
        markers = re.findall(r"\[The (?:Start|End) of [^\]]*\]", template)
        pattern = "".join(f"(?P<{part[1:-1]}>.*)" if part.startswith("{") else re.escape(part)
                          for part in re.split(r"(\{\w+\})", template))
        found = re.fullmatch(pattern, user["content"], re.DOTALL)
        if not found:
            continue
        if any(user["content"].count(m) != 1 for m in markers):
            raise ValueError(f"{where}: the judge prompt's answers hold one of the template's markers "
                             f"({', '.join(markers)}), so its two answers cannot be told apart to swap them")
        parts = found.groupdict()
        if "answer_a" in parts:
            parts["answer_a"], parts["answer_b"] = parts["answer_b"], parts["answer_a"]
        else:
            parts["conversation_1"], parts["conversation_2"] = swap_answers(parts["conversation_1"],
                                                                            parts["conversation_2"], where)
        return before + [{**user, "content": template.format(**parts)}]
    raise ValueError(f"{where}: the judge prompt's last turn is not one of RM-R1's templates (data.PROMPTS), so "
                     f"its two answers cannot be swapped for --consistency_reward")


# ---- reading files ----

SUFFIXES = (".json", ".jsonl", ".parquet")


def content_digest(path) -> str:
    """sha256 of a data file's bytes (a folder: of each file's name and bytes, in name order): what
    ties a training run or an evaluation log to the records it was made from."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if os.path.isdir(path) else [Path(path)]
    for file in files:
        h.update(str(file.relative_to(path) if os.path.isdir(path) else "").encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(2**24), b""):
                h.update(block)
    return h.hexdigest()


def data_files(path):
    """A file, or every .json/.jsonl/.parquet file under a folder in sorted order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise ValueError(f"{path}: folder holds no {'/'.join(SUFFIXES)} files")
        return files
    if not path.is_file():
        raise ValueError(f"{path}: no such file or folder")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown format; expected one of {SUFFIXES}")
    return [path]


def read_file(path):
    """[(where, record)] from one file; `where` is "file.jsonl:12" (line) or "file.json[3]" (index)."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), "
                             f"or convert the file to JSONL") from None
        rows = [(f"{path}[{i}]", r) for i, r in enumerate(pyarrow.parquet.read_table(path).to_pylist())]
    else:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                             f"save the file as UTF-8") from None
        # Many ".json" files (Hugging Face exports among them) are really JSON Lines.
        if path.suffix == ".json" and text.lstrip().startswith(("[", "{")) and not is_jsonl(text):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(records, list):
                raise ValueError(f"{path}: holds one JSON {type(records).__name__}; a .json file must hold a "
                                 f"list of records, or one record per line (JSON Lines)")
            rows = [(f"{path}[{i}]", r) for i, r in enumerate(records)]
        else:
            rows = []
            for n, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append((f"{path}:{n}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    for where, record in rows:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    return rows


def is_jsonl(text):
    """True when the first non-blank line is a whole JSON object (so the text is JSON Lines)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def read_records(path):
    """[(where, record)] from a JSON list, JSONL or Parquet file, or a folder of them; no records
    at all is an error."""
    rows = [row for file in data_files(path) for row in read_file(file)]
    if not rows:
        raise ValueError(f"{path}: holds no records")
    return rows


def get_field(record, where, name, kind):
    if name not in record:
        raise ValueError(f"{where}: missing field {name!r} (the record has {sorted(record)})")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{where}: field {name!r} must be {want}, got {type(value).__name__}")
    return value


def check_messages(messages, where, name):
    """A copy of a message list as [{role, content}], extra keys (e.g. RMB's `language`) dropped."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field {name!r} must be a non-empty list of {{role, content}} messages")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: field {name!r}[{k}] must be {{'role': one of {ROLES}, "
                             f"'content': str}}, got {str(m)[:80]!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_conversation(messages, where, name):
    """A conversation to be judged: user/assistant turns, alternating, ending with the answer."""
    messages = check_messages(messages, where, name)
    for k, m in enumerate(messages):
        want = "user" if k % 2 == 0 else "assistant"
        if m["role"] != want:
            # The judge templates have no slot for a system turn; fold it into the first user turn.
            raise ValueError(f"{where}: field {name!r}[{k}] has role {m['role']!r}; a judged conversation "
                             f"alternates user/assistant starting with user")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: field {name!r} must end with the assistant's answer")
    return messages


def check_judge_prompt(record, where):
    messages = check_messages(get_field(record, where, "context_messages", list), where, "context_messages")
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: field 'context_messages' must end with the user turn holding the pair")
    return messages


def load_sft(path):
    """RM-R1 distillation records: the judge prompt and the teacher's full trace. The files keep
    RM-R1's field name `winner` for the trace; a record in memory calls it `trace`."""
    records = []
    for where, r in read_records(path):
        messages = check_judge_prompt(r, where)
        trace = get_field(r, where, "winner", str)
        if trace in LABELS or not trace.strip():
            raise ValueError(f"{where}: field 'winner' must be the reasoning trace for SFT, got {trace!r} "
                             f"(an RLVR file? use load_rlvr)")
        records.append({"context_messages": messages, "trace": trace})
    return records


def load_rlvr(path, both_orders=False):
    """RM-R1 RLVR records: the judge prompt and its label in {model_a, model_b} (the files' field
    `winner`; `label` in memory). both_orders: each also holds its prompt with the answers'
    places swapped (`other_order`, from other_order)."""
    records = []
    for where, r in read_records(path):
        messages = check_judge_prompt(r, where)
        label = get_field(r, where, "winner", str)
        if label not in LABELS:
            raise ValueError(f"{where}: field 'winner' must be 'model_a' or 'model_b', got {label[:80]!r}")
        records.append({"context_messages": messages, "label": label, **own_settings(r, where),
                        **({"other_order": other_order(messages, where)} if both_orders else {})})
    return records


def own_settings(record, where) -> dict:
    """What a record may set for itself: its own `max_new_tokens` (a response limit below the
    run's --max_response_len, say for a short task among long ones), checked here with the
    record's place."""
    if "max_new_tokens" not in record:
        return {}
    limit = get_field(record, where, "max_new_tokens", int)
    if limit < 1:
        raise ValueError(f"{where}: field 'max_new_tokens' must be >= 1, got {limit}")
    return {"max_new_tokens": limit}


def load_prompts(path, need_reference=False):
    """A policy's prompt records (grpo.py --reward judge): `prompt` (a string, one user turn) or
    `messages` (the conversation before the answer: user / assistant turns from a user's to a
    user's, none empty; the judge templates have no system turn), an optional
    `reference` answer (a string: --judge_method reference needs one on every record), and what a
    record may set for itself (own_settings). In memory: {context_messages, reference?, ...}."""
    records = []
    for where, r in read_records(path):
        if "messages" in r and "prompt" in r:
            raise ValueError(f"{where}: a prompt record has 'prompt' or 'messages', not both")
        if "messages" in r:
            messages = check_messages(get_field(r, where, "messages", list), where, "messages")
            if messages[-1]["role"] != "user":
                raise ValueError(f"{where}: field 'messages' must end with the user's turn the policy answers")
            # as the judge will read it: user / assistant turns from a user's (no system turn), none empty
            check_conversation(messages + [{"role": "assistant", "content": "the answer"}], where, "messages")
            empty = next((k for k, m in enumerate(messages) if not m["content"].strip()), None)
            if empty is not None:
                raise ValueError(f"{where}: field 'messages'[{empty}] has no content")
        elif "prompt" in r:
            prompt = get_field(r, where, "prompt", str)
            if not prompt.strip():
                raise ValueError(f"{where}: field 'prompt' is empty")
            messages = [{"role": "user", "content": prompt}]
        else:
            raise ValueError(f"{where}: a prompt record needs 'prompt' (a string) or 'messages' (a chat); "
                             f"the record has {sorted(r)}")
        record = {"context_messages": messages, **own_settings(r, where)}
        if need_reference and "reference" not in r:
            raise ValueError(f"{where}: --judge_method reference needs a 'reference' answer on every record; "
                             f"the record has {sorted(r)}")
        if "reference" in r:
            record["reference"] = get_field(r, where, "reference", str)
            if not record["reference"].strip():
                raise ValueError(f"{where}: field 'reference' is empty")
        records.append(record)
    return records


def write_records(path, records):
    """SFT or RLVR records (trace / label in memory) to a JSONL file in RM-R1's format, where both
    are called `winner`: what load_sft / load_rlvr read back."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            kept = {k: v for k, v in r.items() if k not in ("trace", "label")}
            f.write(json.dumps(kept | {"winner": r["trace"] if "trace" in r else r["label"]}) + "\n")
    return path


def pair_conversations(record, where, chosen="chosen", rejected="rejected"):
    """(chosen, rejected) full conversations from a raw preference pair.

    Accepts `prompt` (str or messages, optional) with `chosen`/`rejected` as answer strings, as
    answer messages, or as full conversations that already start with the prompt.
    """
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        context = [{"role": "user", "content": prompt}]
    elif prompt is None:
        context = []
    else:
        context = check_messages(prompt, where, "prompt")
    pair = []
    for name in (chosen, rejected):
        value = get_field(record, where, name, (str, list))
        if isinstance(value, str):
            if not context:
                raise ValueError(f"{where}: field {name!r} is a string, so the record needs a 'prompt'")
            conversation = context + [{"role": "assistant", "content": value}]
        else:
            value = check_messages(value, where, name)
            conversation = value if value[:len(context)] == context else context + value
        pair.append(check_conversation(conversation, where, name))
    if pair[0][:-1] != pair[1][:-1]:
        raise ValueError(f"{where}: fields {chosen!r} and {rejected!r} must share every turn but the last answer")
    return pair


def pairs_to_rlvr(pairs, seed, style="instruct", both_orders=False):
    """Raw preference pairs (a path, or a list of records) -> (RLVR records, pairs dropped).

    A pair whose chosen and rejected answers are the same text has no right verdict: it is
    dropped and counted. Of the rest, the chosen answer goes to position A for exactly half (one
    more when odd), which half drawn by a seeded shuffle, so labels are balanced and reproducible.
    both_orders: each record also holds the prompt with the answers' places swapped (`other_order`).
    """
    rows = read_records(pairs) if isinstance(pairs, (str, Path)) else [(f"pairs[{i}]", r) for i, r in enumerate(pairs)]
    conversations = []
    for where, r in rows:
        if not isinstance(r, dict):
            raise ValueError(f"{where}: a record must be a dict, got {type(r).__name__}")
        chosen, rejected = pair_conversations(r, where)
        if chosen[-1]["content"].strip() != rejected[-1]["content"].strip():
            conversations.append((chosen, rejected, own_settings(r, where)))
    chosen_is_a = [k % 2 == 0 for k in range(len(conversations))]
    random.Random(seed).shuffle(chosen_is_a)
    records = []
    for (chosen, rejected, own), a_first in zip(conversations, chosen_is_a):
        a, b = place(chosen, rejected, a_first)
        records.append({"context_messages": build_judge_messages(a, b, style), "label": label(a_first), **own,
                        **({"other_order": build_judge_messages(b, a, style)} if both_orders else {})})
    return records, len(rows) - len(conversations)


def load_rlvr_or_pairs(path, seed, style, both_orders=False):
    """RLVR records ({context_messages, label}) from a file of them, or made from raw preference
    pairs (pairs_to_rlvr); (records, pairs dropped as identical). both_orders: with `other_order`."""
    rows = read_records(path)
    rlvr = ["context_messages" in r for _, r in rows]
    if any(kind != rlvr[0] for kind in rlvr):
        where = rows[rlvr.index(not rlvr[0])][0]
        kinds = ("RLVR records (context_messages, winner)", "raw preference pairs")
        raise ValueError(f"{where}: a {kinds[rlvr[0]]} record in a file that starts with "
                         f"{kinds[not rlvr[0]]}: a data file holds one kind")
    if rlvr[0]:
        return load_rlvr(path, both_orders), 0
    records, identical = pairs_to_rlvr(path, seed=seed, style=style, both_orders=both_orders)
    if not records:
        raise ValueError(f"{path}: no pair is left to train on ({identical} had identical answers)")
    return records, identical


# ---- which records a GRPO step takes ----

def step_prompts(n_records, step, cfg) -> list[int]:
    """The prompts of GRPO's rollout step `step` (cfg: its seed and rollout_batch_size), as indices
    into the records: one seeded permutation per epoch, the epochs end to end, each step the next
    rollout_batch_size of them. An epoch's leftovers open the next epoch's first step instead of
    being dropped, and the order is a pure function of (seed, step), so a resumed run takes the same
    prompts."""
    first, end = step * cfg.rollout_batch_size, (step + 1) * cfg.rollout_batch_size
    orders = {epoch: np.random.default_rng([cfg.seed, epoch]).permutation(n_records)
              for epoch in range(first // n_records, (end - 1) // n_records + 1)}
    return [int(orders[p // n_records][p % n_records]) for p in range(first, end)]


def oversample_prompts(n_records, step, resample, cfg) -> list[int]:
    """The prompts of the resample-th further rollout round of step `step` (--oversample), as
    indices into the records: a whole batch drawn from all of them with the seed (seed, step,
    resample), so that resumed runs and any number of ranks draw the same ones."""
    rng = np.random.default_rng([cfg.seed, step, resample])
    passes = -(-cfg.rollout_batch_size // n_records)
    return [int(i) for i in np.concatenate([rng.permutation(n_records) for _ in range(passes)])]
