"""Run a judge on a benchmark and score it: RewardBench, RM-Bench, RMB (pairwise, best-of-N), the
demo, your own preference pairs (--bench pairs), or label your own unlabeled pairs (--bench label).

    python eval.py                                     # CPU demo: the shipped demo judge, held-out demo pairs
    python eval.py --model RUN/hf                      # the demo judge after GRPO (grpo.py's hf/ export)
    python eval.py --model Qwen2.5-7B-Instruct-RM --bench rm-bench --data ../shared/data/rm-bench
    python eval.py --model DeepSeek-R1-Distill-Qwen-7B-RM --style reasoning --bench rmb-pairwise \\
        --data RMB/Pairwise_set --limit 500           # one GPU; --limit for a quick look
    torchrun --nproc_per_node=8 eval.py --model RM-R1-32B --tp 4 --bench rm-bench --data rm-bench/
                                                       # 2 data-parallel groups of 4 tensor-parallel ranks
    python eval.py --samples 8 --temperature 1 --both_orders      # votes over 8 samples, both answer orders
    python eval.py --model RUN/hf --bench pairs --data my_pairs.jsonl     # prompt / chosen / rejected records
    python eval.py --model RUN/hf --bench label --data unlabeled.jsonl    # prompt / response_a / response_b

Under torchrun the comparisons are dealt out, chunk by chunk, over the data-parallel groups (each
of --tp ranks that hold 1/tp of every matrix, tp.py, or one rank with the whole judge); rank 0
gathers each chunk's records and appends them to one samples.jsonl, so a log holds the same lines
whatever the number of ranks, and resumes the same way.

By default every comparison is judged once, greedily (as the RM-R1 authors did), with the chosen
answer at position A or B by a coin that is a hash of (seed, comparison uid): seeded, recorded in
the log, and the same whatever --limit or --batch_size. --samples K --temperature T judges it K
times (the verdict is their majority), --both_orders with the chosen answer at A and at B; the
rules of votes, ties and orders are judge.py's. Outputs, in `out` (default runs/eval-<bench>):
- samples.jsonl: one line per comparison and order (uid, group, category, meta, chosen_position,
  prompt_tokens, judgment, verdict, correct, finish_reason; with --samples K > 1 also votes,
  judgments and finish_reasons, the K samples' own, and judgment / finish_reason are sample 0's,
  verdict the majority's (null on a tie or no vote) and correct its score), appended chunk by chunk;
- scores.json: benchmarks.py's scores under the benchmark's own metric names, recomputed from the
  whole log, with counts of overlong prompts, unparseable verdicts and truncated judgments; with
  --samples, the voting curve (accuracy of the first k samples' majority, k = 1, 2, 4, ..., K,
  with standard errors); with --both_orders, position consistency;
- labeled.jsonl (--bench label): each pair the judge picked an answer for, as prompt / chosen /
  rejected (what grpo.py --data and DPO trainers read), with its votes and consistency.
Re-running with the same `out` resumes: comparisons already in the log are skipped.

Departures from the RM-R1 harness and choices it leaves open:
- the A/B coin is seeded and logged (the authors' was not, so their runs are not bit-reproducible);
- A prompt longer than max_prompt_len is never truncated (a cut-off pair is not the pair the
  benchmark asks about) and never dropped: it gets a log line with finish_reason "prompt_too_long"
  and counts as wrong, so every score keeps the benchmark's denominator. The count is printed and
  saved; raise --max_prompt_len to judge them.
- Comparisons are taken item by item in a fixed hash order that mixes the files, so --limit N
  samples every domain / category rather than the first file; N is rounded up to whole items
  because RM-Bench (9 comparisons per item) and RMB best-of-N (one per loser) score whole items.
"""

import hashlib
import json
import os
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

import benchmarks
import data
import demo.recipe
import distributed
import tp
from checkpoint import append_whole, load_config, repair_export, write_atomic
from cli import check_fields, parse_config
from data import Style
from judge import SCORE, Judge, Judgments, noise_key, outcome
from reward import LETTERS, label
from scores import labeled, no_result, scores_of, summary


@dataclass
class EvalConfig:
    model: str = demo.SHIPPED        # HF model directory (weights + tokenizer with a chat template)
    bench: str = "demo"              # demo | rewardbench | rm-bench | rmb-pairwise | rmb-bon | pairs | label
    data: str = ""                   # benchmark file or folder (not needed for demo)
    style: Style = "instruct"        # instruct: system + user prompt; reasoning: one user turn (R1-distilled)
    max_new_tokens: int = 8192       # judgment length; one that reaches it is logged as "length" (demo: 160)
    max_prompt_len: int = 4096       # longer prompts are not judged and count as wrong (paper: 4096)
    batch_size: int = 64             # sequences decoded at once by the sampler
    limit: int = 0                   # judge only the first N comparisons (whole items); 0 = all
    seed: int = 0                    # A/B coin of every comparison
    out: str = ""                    # default runs/eval-<bench>
    demo_pairs: int = 1000           # held-out demo pairs to judge (--bench demo): 1 SE ~1.3 points
    tp: int = 1                      # tensor-parallel ranks per judge under torchrun (14B: 2, 32B: 4-8)
    samples: int = 1                 # sampled judgments per comparison and order; the verdict is their majority
    temperature: float = 0.0         # 0: greedy (one sample); --samples K > 1 needs T > 0
    both_orders: bool = False        # judge every comparison with the chosen answer at A and at B


BENCHES = tuple(benchmarks.BENCHMARKS)
# Fields that change what a logged judgment is; resuming a log made with other values would mix two runs.
RUN_IDENTITY = ("model", "bench", "data_sha256", "style", "max_new_tokens", "max_prompt_len", "seed", "samples",
                "temperature", "both_orders")
# Sampler batches per logged chunk: continuous batching keeps slots busy while the longest
# judgments finish, and a killed run loses at most one chunk.
CHUNK_BATCHES = 4


def check_config(cfg: EvalConfig, world_size=1):
    """Every setting, before any data or model is read; an error names the flag and the fix."""
    check_fields(cfg, [
        ("bench", cfg.bench in BENCHES, f"must be one of {BENCHES}"),
        ("data", cfg.bench == "demo" or cfg.data, f"--bench {cfg.bench} needs --data (a file or a folder of "
         f"the benchmark's files)"),
        ("data", cfg.bench != "demo" or not cfg.data, "is not read by --bench demo (it judges the demo's own "
         f"pairs): name the benchmark the file holds with --bench ({', '.join(b for b in BENCHES if b != 'demo')})"),
        *[(name, getattr(cfg, name) >= 1, "must be >= 1") for name in
          ("max_new_tokens", "max_prompt_len", "batch_size", "demo_pairs", "tp", "samples")],
        ("limit", cfg.limit >= 0, "must be >= 0 (0 = all)"),
        ("temperature", cfg.temperature >= 0, "must be >= 0 (0: greedy)"),
        ("samples", cfg.samples == 1 or cfg.temperature > 0, "more than one sample needs --temperature > 0 "
         "(greedy samples are all alike): RM-R1's judges sample at 1.0 in training"),
        ("tp", world_size % cfg.tp == 0, f"must divide the {world_size} ranks this run has: start eval.py "
         f"under torchrun with a multiple of {cfg.tp} ranks (--nproc_per_node), or leave --tp at 1"),
    ])


# ---- which comparisons, in which order, which answer is A ----

def load_comparisons(cfg: EvalConfig) -> list:
    if cfg.bench == "demo":
        # The held-out set is drawn with a fixed seed, so runs that differ in --seed judge the same pairs.
        return demo.comparisons(cfg.demo_pairs, seed=0)
    return benchmarks.load_benchmark(cfg.bench, cfg.data)


def ordered(comparisons, limit=0) -> list:
    """Items (groups) in crc32 order, each item's comparisons together in load order; then the
    first `limit` comparisons, rounded up to the end of the item that the cut falls in."""
    items = {}
    for c in comparisons:
        items.setdefault(c.group, []).append(c)
    out = []
    for group in sorted(items, key=lambda g: (zlib.crc32(g.encode()), g)):
        if limit and len(out) >= limit:
            break
        out += items[group]
    return out


def chosen_is_a(seed: int, uid: str) -> bool:
    """The A/B coin: a stable hash of (seed, uid), so it never depends on which other comparisons
    are run, in what order or batch (Python's hash() is salted per process, hence sha256)."""
    return hashlib.sha256(f"{seed}/{uid}".encode()).digest()[0] % 2 == 0


# ---- judging ----

def units_of(comparisons, cfg: EvalConfig) -> list:
    """(comparison, chosen_position) pairs to judge: the coin's position, or with --both_orders A and B."""
    def positions(c):
        return ("A", "B") if cfg.both_orders else (LETTERS[label(chosen_is_a(cfg.seed, c.uid))],)
    return [(c, position) for c in comparisons for position in positions(c)]


def record_of(c, position, prompt_tokens, judged: Judgments | None, cfg: EvalConfig) -> dict:
    """The log line of one (comparison, order); judged is None for a prompt over max_prompt_len."""
    r = {"uid": c.uid, "group": c.group, "category": c.category, "meta": c.meta, "chosen_position": position,
         "prompt_tokens": prompt_tokens, "judgment": "", "verdict": None, "correct": False,
         "finish_reason": "prompt_too_long"}
    if cfg.samples > 1:
        r["correct"] = 0.0
        r |= {"votes": [], "judgments": [], "finish_reasons": []}
    if judged is None:
        return r
    if cfg.samples == 1:
        r.update(judgment=judged.texts[0], verdict=judged.verdicts[0], correct=judged.verdicts[0] == position,
                 finish_reason=judged.finish_reasons[0])
    else:
        o = outcome(judged.verdicts, position)
        r.update(judgment=judged.texts[0], verdict={"chosen": position, "rejected": "B" if position == "A" else "A"}.get(o),
                 correct=SCORE[o], finish_reason=judged.finish_reasons[0], votes=judged.verdicts,
                 judgments=judged.texts, finish_reasons=judged.finish_reasons)
    return r


def how(cfg: EvalConfig) -> dict:
    """How a judge.Judge judges, from eval.py's settings."""
    return dict(style=cfg.style, samples=cfg.samples, temperature=cfg.temperature, seed=cfg.seed,
                max_new_tokens=cfg.max_new_tokens, max_prompt_len=cfg.max_prompt_len, batch_size=cfg.batch_size)


def judge(judge_: Judge, units, cfg: EvalConfig, log=None) -> list[dict]:
    """Judge every (comparison, chosen_position) unit (units_of); returns one log record per unit,
    in order.

    Under torchrun (the judge's ctx) each chunk is dealt out over the data-parallel groups, which judge their
    parts at once; every rank then gathers the chunk's records back in order and returns them all.
    When `log` (a path, rank 0's) is given, each chunk's records are appended to it as JSON lines
    as soon as the chunk is judged.
    """
    ctx = judge_.ctx
    group, groups = ctx.dp if ctx is not None else (0, 1)
    lead = ctx is None or ctx.tp_mesh is None or ctx.tp_mesh.get_local_rank() == 0
    chunk = cfg.batch_size * CHUNK_BATCHES * groups
    records = []
    with tqdm(total=len(units), desc=f"judging ({cfg.bench})", unit="judgment", disable=not distributed.is_main()) as bar:
        for start in range(0, len(units), chunk):
            mine = units[start:start + chunk][group::groups]
            prompts = [judge_.prompt(c.chosen, c.rejected, position) for c, position in mine]
            fits = [i for i, ids in enumerate(prompts) if len(ids) <= cfg.max_prompt_len]
            judged = dict(zip(fits, judge_.judge([prompts[i] for i in fits],
                                                  [noise_key(mine[i][0].uid, mine[i][1]) for i in fits]) if fits else []))
            part = [record_of(c, position, len(ids), judged.get(i), cfg)
                    for i, ((c, position), ids) in enumerate(zip(mine, prompts))]
            # group g judged the chunk's units g, g + groups, ...: interleave them back
            parts = [p for p in distributed.all_gather_objects((group, part) if lead else None) if p]
            done = [None] * sum(len(p) for _, p in parts)
            for g, part in parts:
                done[g::groups] = part
            if log is not None:
                append_whole(log, "".join(json.dumps(r) + "\n" for r in done))
            records += done
            bar.update(len(done))
    return records


# ---- the log on disk ----

def read_log(path) -> list[dict]:
    """The records of samples.jsonl. A torn last line (a run killed mid-write) is cut off the file,
    since its comparison will be judged again; any other unreadable line is an error."""
    if not os.path.exists(path):
        return []
    text = Path(path).read_text(encoding="utf-8")
    complete, _, torn = text.rpartition("\n")
    if torn:
        print(f"{path}: dropping a torn last line ({len(torn)} characters); it will be judged again")
        with open(path, "r+", encoding="utf-8") as f:
            f.truncate(len(complete.encode("utf-8")) + (1 if complete else 0))
    records = []
    for n, line in enumerate(complete.split("\n") if complete else [], start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); delete the line or start a new --out") from None
        for name in ("uid", "correct", "verdict", "finish_reason"):
            if name not in records[-1]:
                raise ValueError(f"{path}:{n}: missing field {name!r}; is this an eval.py log?")
    return records


def check_resume(cfg: EvalConfig, out):
    """Write out/config.json on the first run; on a rerun, refuse settings that would mix two runs.
    The data is known by its contents (data_sha256), not by how its path is spelled."""
    path = os.path.join(out, "config.json")
    current = asdict(cfg) | {"model": os.path.abspath(cfg.model), "data": cfg.data and os.path.abspath(cfg.data),
                             "data_sha256": cfg.data and data.content_digest(cfg.data)}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        # a log written before a setting existed was made with its default (its data: the uids tell)
        before = asdict(EvalConfig()) | {"data_sha256": current["data_sha256"]}
        changed = [k for k in RUN_IDENTITY if saved.get(k, before[k]) != current[k]]
        if changed:
            diff = ", ".join(f"{k}: {saved.get(k, before[k])!r} -> {current[k]!r}" for k in changed)
            what = f" (--data {saved.get('data')!r} then, {current['data']!r} now)" if "data_sha256" in changed else ""
            raise ValueError(f"{out} holds a run with other settings ({diff}){what}; pass a new --out, "
                             f"or the same settings to resume")
    else:
        write_atomic(path, json.dumps(current, indent=2) + "\n")


def check_log_matches(logged: set, comparisons, log_path, cfg: EvalConfig):
    """A log that shares no comparison with the data is another run's: refused, both named."""
    uids = {c.uid for c in comparisons}
    if logged and not logged & uids:
        raise ValueError(f"{log_path} holds {len(logged)} judged comparisons and none of them is in "
                         f"{cfg.data or 'the demo pairs'} (the log has e.g. {min(logged)!r}, the data "
                         f"{min(uids)!r}); pass a new --out for this data")


# ---- entry point ----

def load_judge(cfg: EvalConfig, ctx) -> Judge:
    """The judge, whole on this rank, or with --tp this rank's 1/tp of it (read from safetensors)."""
    repair_export(cfg.model)  # a kill inside an export's two renames left it at MODEL.old
    if not os.path.isdir(cfg.model):
        hint = " (train the demo judge with `python sft.py`)" if cfg.model == demo.SHIPPED else ""
        raise ValueError(f"--model {cfg.model}: no such model directory{hint}")
    return Judge.load(cfg.model, ctx, **how(cfg))


def on_main(fn):
    """fn() on rank 0 alone (the one that reads and writes `out`), its result shared with every
    rank; a ValueError it raises is raised on every rank, so none waits for a rank that stopped."""
    result = error = None
    if distributed.is_main():
        try:
            result = fn()
        except ValueError as e:
            error = str(e)
    result, error = distributed.all_gather_objects((result, error))[0]
    if error is not None:
        raise ValueError(error)
    return result


def evaluate(cfg: EvalConfig) -> dict:
    """Judge what the log lacks, append it, and return (and write) the scores of the whole log."""
    check_config(cfg, distributed.world_size())
    ctx = distributed.init(tp=cfg.tp)
    if cfg.tp > 1:
        tp.check_divisible(load_config(cfg.model), cfg.tp)
    out = cfg.out or f"runs/eval-{cfg.bench}"
    every = load_comparisons(cfg)
    comparisons = ordered(every, cfg.limit)
    log_path = os.path.join(out, "samples.jsonl")

    def resume():
        os.makedirs(out, exist_ok=True)
        check_resume(cfg, out)
        done = {(r["uid"], r["chosen_position"]) for r in read_log(log_path)}
        check_log_matches({uid for uid, _ in done}, every, log_path, cfg)
        return done
    done = on_main(resume)
    units = units_of(comparisons, cfg)
    # one order: a comparison in the log is done; both orders: each (comparison, order) is its own
    done |= {(uid, None) for uid, _ in done}
    todo = [(c, position) for c, position in units if (c.uid, position if cfg.both_orders else None) not in done]
    what = "comparisons" if len(units) == len(comparisons) else f"comparisons ({len(units)} judgments, both orders)"
    distributed.log(f"{len(comparisons)} {what}, {len(units) - len(todo)} already in {log_path}, "
          f"{len(todo)} to judge" + (f" on {ctx.dp[1]} data-parallel groups" if ctx.world_size > 1 else ""))
    if todo:
        judge(load_judge(cfg, ctx), todo, cfg, log_path if distributed.is_main() else None)
    return on_main(lambda: score_log(cfg, out, log_path))


def score_log(cfg: EvalConfig, out, log_path) -> dict:
    """The scores of the whole log, written to out/scores.json once and printed."""
    records = read_log(log_path)
    scores = scores_of(records, cfg.bench, cfg.samples)
    if cfg.bench == "label":
        pairs = labeled(records)
        scores["labeled"], scores["unlabeled"] = len(pairs), scores["comparisons"] - len(pairs)
        write_atomic(os.path.join(out, "labeled.jsonl"), "".join(json.dumps(p) + "\n" for p in pairs))
        print(f"wrote {os.path.join(out, 'labeled.jsonl')}: {len(pairs)} pairs labeled, {scores['unlabeled']} "
              f"left out (a tie of votes or orders, or no verdict)")
    write_atomic(os.path.join(out, "scores.json"), json.dumps(scores, indent=2) + "\n")
    print(summary(scores))
    if scores["prompt_too_long"]:
        print(f"{scores['prompt_too_long']} prompts longer than --max_prompt_len={cfg.max_prompt_len} "
              f"were not judged and count as wrong")
    print(f"wrote {os.path.join(out, 'scores.json')}")
    return scores


def main(argv=None):
    cfg, given = parse_config(EvalConfig, argv, __doc__)
    if cfg.bench == "demo":
        cfg = demo.recipe.apply(cfg, demo.recipe.EVAL, given, "eval.py --bench demo")
    with distributed.running():
        scores = evaluate(cfg)
    return scores


if __name__ == "__main__":
    sys.exit(no_result(main()))
