"""Tokens: a model directory's tokenizer, judge prompts and SFT traces to ids, packed rows.

    tokenizer = load_tokenizer(path)                          # exactly as its tokenizer.json says
    ids = encode_prompt(tokenizer, messages, max_len)         # a judge prompt, ready to generate from
    input_ids, loss_mask = encode_sft(tokenizer, messages, trace, max_len)
    rows = pack(examples, max_len)                            # documents packed into rows
"""

from pathlib import Path

import torch

from checkpoint import repair_export

# What a Hugging Face model directory holds its tokenizer in (tokenizer.json, or sentencepiece / BPE files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path):
    """The tokenizer saved in `path`, exactly as its tokenizer.json defines it.

    transformers 5's AutoTokenizer swaps in a model family's own pre-tokenizer for some model
    types: a qwen2 config gets Qwen2Tokenizer's split regex whatever tokenizer.json says. A
    tokenizer this project saved (the demo's splits on spaces and digits) would then come back
    encoding text differently from the way the model was trained. Checkpoints without a
    tokenizer.json (sentencepiece only) go through AutoTokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    repair_export(path)  # a kill inside an export's two renames left it at path.old
    if not Path(path).is_dir():  # AutoTokenizer would take it for a hub name and wait for the network
        raise ValueError(f"{path}: no such model directory")
    if Path(path, "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    if not any(Path(path, name).exists() for name in TOKENIZER_FILES):
        raise ValueError(f"{path}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); a model "
                         f"directory needs its tokenizer beside the weights: copy those files from the "
                         f"checkpoint it was trained from (the base model's Hugging Face directory)")
    return AutoTokenizer.from_pretrained(path)


def chat_text(tokenizer, messages, add_generation_prompt=True) -> str:
    """The chat template's text of messages (special tokens written out), the generation prompt
    after them by default: what a policy's prompt is as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; use an "
                         f"Instruct/chat checkpoint's tokenizer or set tokenizer.chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_ids(tokenizer, messages, add_generation_prompt):
    text = chat_text(tokenizer, messages, add_generation_prompt)
    # The template already wrote BOS and friends; letting the tokenizer add them again would double them.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, messages, max_len):
    """Prompt ids ending with the generation prompt, or None when longer than max_len (never truncated)."""
    ids = chat_ids(tokenizer, messages, add_generation_prompt=True)
    return ids if len(ids) <= max_len else None


def encode_sft(tokenizer, messages, trace, max_len):
    """(input_ids, loss_mask) of prompt + trace, or None when longer than max_len.

    loss_mask is 1 on the trace's tokens and on the end-of-turn token that closes it (so the judge
    learns to stop), 0 on the prompt and on whatever the template writes after the turn (Qwen's
    trailing newline). The trainer shifts: targets = input_ids[1:], mask = loss_mask[1:].
    """
    prompt = chat_ids(tokenizer, messages, add_generation_prompt=True)
    ids = chat_ids(tokenizer, messages + [{"role": "assistant", "content": trace}], add_generation_prompt=False)
    if ids[:len(prompt)] != prompt:
        raise ValueError("the chat template renders the prompt differently once the assistant turn is added, "
                         "so the trace cannot be split from the prompt; use a template whose generation prompt "
                         "is a prefix of the rendered assistant turn")
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ends = [k for k in range(len(prompt), len(ids)) if ids[k] in special]
    if not ends:
        raise ValueError("the chat template closes the assistant turn with no special token, so the judge "
                         "would never learn to stop; use a template that ends turns with EOS / <|im_end|>")
    end = ends[-1]
    completion = tokenizer.decode(ids[len(prompt):end + 1], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)
    if trace.strip() not in completion:
        # DeepSeek-R1 templates, for one, cut everything before </think> from past assistant turns.
        raise ValueError("the chat template changed the trace text; SFT needs a template that keeps the "
                         "assistant turn verbatim")
    if len(ids) > max_len:
        return None
    loss_mask = [0] * len(prompt) + [1] * (end + 1 - len(prompt)) + [0] * (len(ids) - end - 1)
    return ids, loss_mask


def next_fit(lengths, max_len) -> list[list[int]]:
    """Greedy next-fit packing, in the given order: the indices of the documents of each row of
    at most max_len tokens (a document longer than that gets a row of its own). The one packer
    of both trainers (pack below, passes.pack_rows)."""
    rows, used = [], max_len
    for k, n in enumerate(lengths):
        if not rows or used + n > max_len:
            rows.append([])
            used = 0
        rows[-1].append(k)
        used += n
    return rows


def pack(examples, max_len):
    """Next-fit packing of (input_ids, loss_mask) examples into rows of at most max_len tokens.

    Keeps the given order (shuffle before packing). position_ids restart at 0 for each document,
    which model.py reads as a document boundary, so packed documents never attend to each other.
    The token that ends one document and "predicts" the next document's first token is never
    trained on, because every document starts with prompt tokens (loss_mask 0).
    An example longer than max_len is an error: encode_sft already returned None for it.
    """
    for k, (ids, mask) in enumerate(examples):
        if len(ids) != len(mask) or not ids:
            raise ValueError(f"example {k}: input_ids and loss_mask must have the same non-zero length, "
                             f"got {len(ids)} and {len(mask)}")
        if len(ids) > max_len:
            raise ValueError(f"example {k}: {len(ids)} tokens > max_len {max_len}; drop it before packing "
                             f"(encode_sft returns None for it)")
    rows = []
    for docs in next_fit([len(ids) for ids, _ in examples], max_len):
        row = {"input_ids": [], "loss_mask": [], "position_ids": []}
        for k in docs:
            ids, mask = examples[k]
            row["input_ids"] += ids
            row["loss_mask"] += mask
            row["position_ids"] += range(len(ids))
        rows.append(row)
    return rows


def collate(rows, pad_id):
    """Right-pad rows into (B, T) LongTensors: input_ids, loss_mask, position_ids, attention_mask.

    Padding positions keep counting up rather than restarting at 0, so they never start a
    document; attention_mask hides them and loss_mask is 0 there.
    """
    T = max(len(r["input_ids"]) for r in rows)
    batch = {k: torch.zeros(len(rows), T, dtype=torch.long)
             for k in ("input_ids", "loss_mask", "position_ids", "attention_mask")}
    batch["input_ids"].fill_(pad_id)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        batch["input_ids"][b, :n] = torch.tensor(r["input_ids"])
        batch["loss_mask"][b, :n] = torch.tensor(r["loss_mask"])
        positions = r.get("position_ids", range(n))
        batch["position_ids"][b, :n] = torch.tensor(list(positions))
        batch["position_ids"][b, n:] = torch.arange(T - n) + (positions[-1] + 1 if n else 0)
        batch["attention_mask"][b, :n] = 1
    return batch


def encode_prompts(tokenizer, records, max_len):
    """Prompt ids of every record's context_messages: (records kept, their ids); prompts over
    max_len are dropped (never cut), as many as the difference in length."""
    kept, prompts = [], []
    for r in records:
        ids = encode_prompt(tokenizer, r["context_messages"], max_len)
        if ids is not None:
            kept.append(r)
            prompts.append(ids)
    return kept, prompts
