"""The embedded demo: a synthetic judging task whose right verdicts a program computes, the
teacher that writes Chain-of-Rubrics traces for it, and the tokenizer the tiny demo judge uses.

    train = make_demo_pairs(4000, seed=0)                   # split="train"
    test = make_demo_pairs(500, seed=0, split="test")       # no question in common with train
    trace = teacher_trace(train[0], chosen_is_a=True)       # "<type>Reasoning</type>\n\n<solution>..."
    tok = build_tokenizer("out/tok", texts)                 # texts: rendered prompts + traces

Two kinds of pairs, half each:
- reasoning: "What is 7 + 5 - 3?" answered by its working ("7 + 5 = 12, 12 - 3 = 9"); the
  rejected answer has one wrong step (off by 1 or 2, a carry of 10 dropped or added, swapped
  digits), and the steps after it continue from the wrong value. The judge must redo the sum.
- chat: "Tell me about animals. Use exactly 4 words." with a one-rule instruction a program can
  check (upper case, lower case, exactly N words, last word, first letter); the rejected response
  breaks the rule, sometimes only barely (one word in the wrong case, one word too many).

The teacher is a program: it re-solves the question from the strings of the pair, so its traces
are right by construction, and it refuses (ValueError) a pair whose chosen response is not the
one that it finds correct. On HASTY_SHARE of the reasoning pairs it is hasty instead, as a
distillation teacher that does not always do the work is: it files the question as Chat, writes
a rubric, does not solve, and prefers Chatbot A (is_hasty, teacher_trace(hasty=True)). The
distilled judge inherits that habit, and it is what GRPO, rewarded on verdicts alone, can
unlearn on a CPU budget: one early decision (<type>) shared by every arithmetic question, where
the judge's arithmetic itself is hundreds of facts that ~9,000 rollouts cannot reteach.

The split of a question (train or test) is a fixed function of its text, so train and test never
share a question whatever seeds they are drawn with.
"""

import os
import random
import re
import zlib

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import benchmarks
import data
from checkpoint import disk_errors
from reward import LETTERS, label, place

TEST_SHARE = 10  # one question in TEST_SHARE belongs to the test split
# Reasoning pairs the teacher judges without solving (teacher_trace(hasty=True)): over one half,
# so the distilled judge's greedy <type> on arithmetic is the hasty Chat, and under 1, so it
# also samples the solving route that GRPO can learn to prefer.
HASTY_SHARE = 0.6

TOPICS = {
    "animals": "cat dog horse tiger rabbit mouse eagle whale snake camel otter zebra",
    "food": "bread apple cheese rice soup pasta honey salad lemon mango bean olive",
    "weather": "rain snow wind cloud storm sun fog frost heat thunder mist hail",
    "travel": "train ship road map hotel ticket bag plane river bridge city beach",
    "music": "song drum piano guitar voice beat choir violin note rhythm band flute",
    "sports": "ball goal team race swim jump coach match score net bike kick",
    "school": "book pen desk class lesson teacher exam paper chalk ruler grade quiz",
    "nature": "tree leaf flower grass stone hill lake forest moss seed root valley",
}
OPENERS = ["Write a few words about {topic}.", "Say something about {topic}.",
           "Give me some words about {topic}.", "Tell me about {topic}."]
RULES = {
    "upper": "Use only upper case letters.",
    "lower": "Use only lower case letters.",
    "count": "Use exactly {n} words.",
    "end": 'End with the word "{word}".',
    "start": 'Start with the letter "{letter}".',
}
RULE_PATTERNS = {  # the teacher reads the rule back from the question with these
    "upper": re.escape(RULES["upper"]),
    "lower": re.escape(RULES["lower"]),
    "count": r"Use exactly (?P<n>\d+) words\.",
    "end": r'End with the word "(?P<word>[a-z]+)"\.',
    "start": r'Start with the letter "(?P<letter>[a-z])"\.',
}
ARITHMETIC = re.compile(r"What is (\d+(?: [-+] \d+)+)\?")
CHAT = re.compile(r".* about (?P<topic>[a-z]+)\. (?P<rule>.+)")


def split_of(question: str) -> str:
    """'test' for one question in TEST_SHARE, else 'train'; stable across runs and machines."""
    return "test" if zlib.crc32(question.encode()) % TEST_SHARE == 0 else "train"


# Reasoning pairs: arithmetic with working, evaluated left to right.

def apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y


def working(numbers: list[int], ops: list[str], wrong_step: int = -1, rng=None) -> str:
    """'12 + 35 = 47, 47 - 9 = 38': one equation per step; step `wrong_step` gets a plausible
    wrong result and the later steps continue correctly from it, as a person's slip would."""
    steps, x = [], numbers[0]
    for i, (op, y) in enumerate(zip(ops, numbers[1:])):
        result = apply(x, op, y)
        if i == wrong_step:
            result = slip(result, rng)
        steps.append(f"{x} {op} {y} = {result}")
        x = result
    return ", ".join(steps)


def slip(result: int, rng: random.Random) -> int:
    """A wrong result that a careless solver would write: off by 1 or 2, a carry of 10 dropped
    or added, or the two last digits swapped."""
    candidates = {result - 1, result + 1, result - 2, result + 2, result - 10, result + 10}
    if result >= 10:
        digits = str(result)
        candidates.add(int(digits[:-2] + digits[-1] + digits[-2]))
    return rng.choice(sorted(c for c in candidates if c >= 0 and c != result))


def arithmetic_pair(rng: random.Random) -> tuple[str, str, str]:
    """Two steps of + or - on one-digit numbers ("What is 7 + 5 - 3?"). A held-out question is
    then a new combination of steps that the train split teaches, which a ~1M-parameter judge
    can learn; two-digit sums and products are beyond it at the demo's budget."""
    # redraw until every intermediate result is >= 0, so the working has no negative numbers
    while True:
        numbers, ops = [rng.randint(1, 9) for _ in range(3)], [rng.choice("+-"), rng.choice("+-")]
        first = apply(numbers[0], ops[0], numbers[1])
        if first >= 0 and apply(first, ops[1], numbers[2]) >= 0:
            break
    question = "What is " + " ".join(f"{op} {n}" for op, n in zip([""] + ops, numbers)).strip() + "?"
    chosen = working(numbers, ops)
    while True:  # a slip may not make a later step negative either
        rejected = working(numbers, ops, wrong_step=rng.randrange(len(ops)), rng=rng)
        if not re.search(r"= -", rejected):
            break
    return question, chosen, rejected


# Chat pairs: a one-rule instruction that a program can check.

def rule_check(kind: str, args: dict, response: str) -> tuple[bool, str]:
    """Whether `response` follows the rule, and what the judge writes about it, with the
    placeholder {tag} for the quote_/summary_ tag letter (A or B).

    Where the rule names a value (a count, a word, a letter), the judge writes what it observes
    and then the rule's value right after it, so that its verdict compares two neighbouring
    tokens; a ~1M-parameter judge does not learn to compare values far apart."""
    words = response.split()
    if kind in ("upper", "lower"):
        case = str.upper if kind == "upper" else str.lower
        off = [w for w in words if w != case(w)]
        if not off:
            return True, f"writes <summary_{{tag}}>every word in {kind} case</summary_{{tag}}>"
        return False, f"writes <quote_{{tag}}>{off[0]}</quote_{{tag}}>, not in {kind} case"
    if kind == "count":
        return (len(words) == int(args["n"]),
                f"uses <summary_{{tag}}>{len(words)} words</summary_{{tag}}>; the rule asks for {args['n']}")
    if kind == "end":
        return (words[-1] == args["word"],
                f'ends with <quote_{{tag}}>{words[-1]}</quote_{{tag}}>; the rule asks for "{args["word"]}"')
    if kind == "start":
        return (words[0][0].lower() == args["letter"],
                f'starts with <quote_{{tag}}>{words[0]}</quote_{{tag}}>, letter "{words[0][0].lower()}"; '
                f'the rule asks for "{args["letter"]}"')
    raise ValueError(f"unknown rule kind {kind!r}; expected one of {sorted(RULES)}")


def rule_of(question: str) -> tuple[str, str, dict]:
    """(topic, rule kind, rule arguments) read back from a chat question."""
    m = CHAT.fullmatch(question)
    for kind, pattern in RULE_PATTERNS.items():
        r = re.fullmatch(pattern, m.group("rule")) if m else None
        if r:
            return m.group("topic"), kind, r.groupdict()
    raise ValueError(f"question {question!r} is not a demo chat question "
                     f"('<opener> about <topic>. <rule>' with a rule from demo.RULES)")


def chat_pair(rng: random.Random) -> tuple[str, str, str]:
    topic = rng.choice(sorted(TOPICS))
    vocab = TOPICS[topic].split()
    kind = rng.choice(sorted(RULES))
    length = rng.randint(3, 6)
    chosen, rejected = rng.sample(vocab, length), rng.sample(vocab, rng.randint(3, 6))
    # "barely" breaking the rule makes half of the rejected responses hard to spot
    barely = rng.random() < 0.5
    args = {}
    if kind == "upper":
        chosen = [w.upper() for w in chosen]
        rejected = rejected if not barely else [w.upper() for w in rejected[:-1]] + rejected[-1:]
        if barely:
            rng.shuffle(rejected)
    elif kind == "lower":
        i = rng.randrange(len(rejected))
        rejected = ([w.upper() for w in rejected] if not barely else
                    rejected[:i] + [rejected[i].capitalize()] + rejected[i + 1:])
    elif kind == "count":
        args["n"] = length
        delta = rng.choice([-1, 1] if barely else [-2, 2, 3])
        rejected = rng.sample(vocab, length + delta)
    elif kind == "end":
        args["word"] = chosen[-1]
        others = [w for w in vocab if w != chosen[-1]]
        rejected = rng.sample(others, len(rejected))
        if barely:  # the right word, in the wrong place
            rejected[rng.randrange(len(rejected) - 1)] = chosen[-1]
    else:
        args["letter"] = chosen[0][0]
        others = [w for w in vocab if w[0] != chosen[0][0]]
        rejected = rng.sample(others, min(len(rejected), len(others)))
        if barely:  # a word with the right letter, not first
            rejected[rng.randrange(1, len(rejected))] = rng.choice([w for w in vocab if w[0] == chosen[0][0]])
    question = rng.choice(OPENERS).format(topic=topic) + " " + RULES[kind].format(**args)
    return question, " ".join(chosen), " ".join(rejected)


def make_demo_pairs(n: int, seed: int, split: str = "train") -> list[dict]:
    """`n` preference pairs, half reasoning and half chat (alternating), from the split's
    questions only. Deterministic in (n, seed, split); the first k pairs do not depend on n."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"demo-{split}-{seed}")
    pairs = []
    while len(pairs) < n:
        kind = ("reasoning", "chat")[len(pairs) % 2]
        question, chosen, rejected = (arithmetic_pair if kind == "reasoning" else chat_pair)(rng)
        if split_of(question) == split:
            pairs.append({"id": f"demo-{split}-{seed}-{len(pairs)}", "kind": kind,
                          "question": question, "chosen": chosen, "rejected": rejected})
    return pairs


# The teacher: Chain-of-Rubrics traces in the exact RM-R1 format.

def is_hasty(pair: dict) -> bool:
    """Whether the teacher judges `pair` hastily: HASTY_SHARE of the reasoning pairs, by a hash of
    the pair's id, so the same pair always gets the same trace."""
    return pair["kind"] == "reasoning" and zlib.crc32(f"hasty-{pair['id']}".encode()) % 1000 < 1000 * HASTY_SHARE


def teacher_trace(pair: dict, chosen_is_a: bool, hasty: bool = False) -> str:
    """The RM-R1 trace for `pair` with the chosen response shown as Chatbot A (or B), ending
    with the right <answer>. The content comes from re-solving the question, not from the labels.

    hasty=True, on a reasoning pair: the trace of a judge that does not solve. It files the
    question as Chat, writes a rubric, reads off both results without checking them and prefers
    Chatbot A, the first response it read: right on half of the pairs, whatever their answers."""
    a, b = place(pair["chosen"], pair["rejected"], chosen_is_a)
    answer = LETTERS[label(chosen_is_a)]
    if pair["kind"] == "reasoning":
        finals = {t: r.rsplit(" ", 1)[1] for t, r in (("A", a), ("B", b))}
        if hasty:
            lines = [f"Chatbot {t} answers <quote_{t}>{finals[t]}</quote_{t}> and shows its working." for t in "AB"]
            return ("<type>Chat</type>\n\n<rubric>\n1. Gives the right result - 70%\n2. Shows its working - 30%\n"
                    "<justify>The client asks for one result, so it weighs most; the working shows how it was "
                    "reached.</justify>\n</rubric>\n\n<eval>\n" + "\n".join(lines) + "\n</eval>\n\n<answer>[[A]]</answer>")
        m = ARITHMETIC.fullmatch(pair["question"])
        if not m:
            raise ValueError(f"pair {pair['id']}: question {pair['question']!r} is not 'What is <a> <op> <b> ...?'")
        tokens = m.group(1).split()
        solution = working([int(t) for t in tokens[::2]], tokens[1::2])
        result = solution.rsplit(" ", 1)[1]
        right = {t: finals[t] == result for t in "AB"}
        # the result again right after the quote: the verdict compares neighbouring tokens
        lines = [f"Chatbot {t} answers <quote_{t}>{finals[t]}</quote_{t}>; my result is {result}, so it "
                 f"is {'right' if right[t] else 'wrong'}." for t in "AB"]
        head = f"<type>Reasoning</type>\n\n<solution>{solution}</solution>"
    elif pair["kind"] == "chat":
        topic, kind, args = rule_of(pair["question"])
        checks = {t: rule_check(kind, args, r) for t, r in (("A", a), ("B", b))}
        right = {t: checks[t][0] for t in "AB"}
        lines = [f"Chatbot {t} {checks[t][1].format(tag=t)}, so it "
                 f"{'follows' if right[t] else 'breaks'} the rule." for t in "AB"]
        rule = RULES[kind].format(**args).rstrip(".")
        head = (f"<type>Chat</type>\n\n<rubric>\n1. Follows the rule: {rule} - 70%\n"
                f"2. Stays on {topic} - 30%\n<justify>The client sets one clear rule, so it weighs "
                f"most; both responses should also stay on topic.</justify>\n</rubric>")
    else:
        raise ValueError(f"pair {pair.get('id')}: 'kind' must be 'reasoning' or 'chat', got {pair['kind']!r}")
    if not (right[answer] and not right["B" if chosen_is_a else "A"]):
        raise ValueError(f"pair {pair['id']}: the teacher finds A {'right' if right['A'] else 'wrong'} "
                         f"and B {'right' if right['B'] else 'wrong'}, but the chosen response is {answer}")
    return head + "\n\n<eval>\n" + "\n".join(lines) + f"\n</eval>\n\n<answer>[[{answer}]]</answer>"


# Copying, the demo judge's stand-in for pretraining.

def copy_rows(n: int, length: int, vocab_size: int, first_id: int, seed: int, step: int) -> list[dict]:
    """`n` rows of `length` tokens, each a run of random tokens followed by the same run again,
    again and again; the loss covers each repeat after its first token (the first cannot be
    known). A judge must quote from its prompt, and a tiny model trained only on judge traces
    does not learn to copy at the demo's budget; on this data its attention learns to find the
    earlier copy of the current token and read on from there (an "induction head") within a
    few hundred steps, as a real base model's pretraining would have taught it. Token ids are
    drawn from [first_id, vocab_size); the rows are a pure function of (seed, step)."""
    rng = random.Random(f"copy-{seed}-{step}")
    rows = []
    for _ in range(n):
        ids, mask = [], []
        while len(ids) < length:
            run = [rng.randrange(first_id, vocab_size) for _ in range(rng.randint(3, 20))]
            ids += run + run
            mask += [0] * (len(run) + 1) + [1] * (len(run) - 1)
        rows.append({"input_ids": ids[:length], "loss_mask": mask[:length], "position_ids": list(range(length))})
    return rows


# The tokenizer.

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chatml(messages: list[dict]) -> str:
    """What CHAT_TEMPLATE renders, for building a corpus before the tokenizer exists."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def demo_corpus(n: int, seed: int, build_messages) -> list[str]:
    """`n` ChatML conversations (judge prompt + teacher trace) from the train split, with the
    chosen response in a seeded random position. `build_messages(question, answer_a, answer_b)`
    returns the judge prompt's messages (build_demo_tokenizer passes judge_messages)."""
    rng = random.Random(f"corpus-{seed}")
    texts = []
    for pair in make_demo_pairs(n, seed):
        chosen_is_a = rng.random() < 0.5
        a, b = place(pair["chosen"], pair["rejected"], chosen_is_a)
        messages = build_messages(pair["question"], a, b)
        trace = teacher_trace(pair, chosen_is_a, hasty=is_hasty(pair))
        texts.append(chatml(messages + [{"role": "assistant", "content": trace}]))
    return texts


def segments(text: str) -> list[str]:
    """`text` cut into lines (each keeping its newlines, blank lines included), with the special tokens cut out."""
    pieces = re.split("|".join(re.escape(t) for t in (PAD, IM_START, IM_END)), text)
    return [line for piece in pieces for line in re.findall(r"[^\n]*\n+|[^\n]+$", piece)]


def build_tokenizer(out_dir: str, texts, vocab_size: int = 2048, phrase_share: float = 0.05) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (any iterable of strings), save it to `out_dir` (where
    tokenization.load_tokenizer reads it back), and return it. eos is <|im_end|>, pad is <|endoftext|>, ChatML chat template.

    A judge prompt is mostly fixed text: the ~2.5k-character RM-R1 system prompt costs ~700 tokens
    in a word-level BPE, more than everything else in a demo example together. So every line that
    recurs in at least `phrase_share` of the texts becomes one token of its own (a "phrase"), and
    the BPE, with the usual word-splitting and one token per digit, learns only the rest: the
    system prompt costs ~40 tokens, while words and numbers keep the same tokens wherever they
    appear (merges across words would hide word boundaries from a judge that must count words).
    """
    texts = list(texts)
    counts = {}
    for text in texts:
        for line in set(segments(text)):
            counts[line] = counts.get(line, 0) + 1
    # a line of a few characters is no saving, and as a phrase it would also match inside words
    phrases = sorted(line for line, c in counts.items() if c >= phrase_share * len(texts) and len(line) > 8)
    phrase_set = set(phrases)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # a space is a token of its own, so " pen" in a response and "pen" in a quote are the
        # same token: a judge that quotes a word then only has to copy it
        pre_tokenizers.Split(" ", behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((line for text in texts for line in segments(text) if line not in phrase_set), trainer)
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in phrases])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                 chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    with disk_errors(out_dir, 2**20):  # about 1 MiB of tokenizer files
        hf.save_pretrained(out_dir)
    return hf


# Judge records for the trainers and the evaluator, with the real RM-R1 prompts.

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft")  # the shipped judge: python sft.py makes it


def judge_pairs(n: int, seed: int, split: str, style: str = "instruct"):
    """(pair, judge messages, chosen_is_a) for `n` pairs, the chosen answer at A or B by a
    seeded coin so that labels are balanced."""
    rng = random.Random(f"positions-{split}-{seed}")
    out = []
    for pair in make_demo_pairs(n, seed, split):
        chosen_is_a = rng.random() < 0.5
        a, b = place(pair["chosen"], pair["rejected"], chosen_is_a)
        out.append((pair, judge_messages(pair["question"], a, b, style), chosen_is_a))
    return out


def judge_messages(question, answer_a, answer_b, style="instruct"):
    user = {"role": "user", "content": question}
    return data.build_judge_messages([user, {"role": "assistant", "content": answer_a}],
                                     [user, {"role": "assistant", "content": answer_b}], style)


def sft_records(n: int, seed: int, style: str = "instruct") -> list[dict]:
    """RM-R1 distillation records: judge prompt + the teacher's trace (train split), hasty on
    the pairs is_hasty picks."""
    return [{"context_messages": m, "trace": teacher_trace(p, a, hasty=is_hasty(p))}
            for p, m, a in judge_pairs(n, seed, "train", style)]


def rlvr_records(n: int, seed: int, split: str = "train", style: str = "instruct") -> list[dict]:
    """RM-R1 RLVR records: judge prompt + model_a/model_b label."""
    return [{"context_messages": m, "label": label(a)} for _, m, a in judge_pairs(n, seed, split, style)]


def comparisons(n: int, seed: int) -> list:
    """Held-out (test split) pairs as benchmark comparisons, category = reasoning | chat."""
    out = []
    for pair in make_demo_pairs(n, seed, "test"):
        user = {"role": "user", "content": pair["question"]}
        out.append(benchmarks.Comparison(uid=pair["id"], group=pair["id"], category=pair["kind"],
                                   chosen=[user, {"role": "assistant", "content": pair["chosen"]}],
                                   rejected=[user, {"role": "assistant", "content": pair["rejected"]}],
                                   meta={}))
    return out


def build_demo_tokenizer(out_dir: str, n: int = 4000, seed: int = 0) -> PreTrainedTokenizerFast:
    """The demo judge's tokenizer, trained on rendered judge prompts + traces (deterministic)."""
    return build_tokenizer(out_dir, demo_corpus(n, seed, judge_messages))
