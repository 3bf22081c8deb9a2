"""eval.py's log (samples.jsonl) -> scores.json: the benchmark's official scores (benchmarks.py),
the judge's health rates, the voting curve over K samples, both answer orders' consistency, and
--bench label's preference pairs. Pure functions of the log's records; the rules of votes, ties
and orders are judge.py's.

    scores = scores_of(records, "rm-bench", samples=8)   # what eval.py writes to scores.json
    print(summary(scores))
"""

import benchmarks
from judge import score, tally


def by_comparison(records) -> list[list[dict]]:
    """The log's lines grouped by comparison (one line, or one per order), in log order."""
    lines = {}
    for r in records:
        lines.setdefault(r["uid"], []).append(r)
    return list(lines.values())


def per_comparison(records) -> list[dict]:
    """One result per comparison, in log order: with two orders, the first's line scored with the
    mean of both (an inconsistent pair is a tie, judge.py)."""
    return [rs[0] if len(rs) == 1 else dict(rs[0], correct=sum(float(r["correct"]) for r in rs) / len(rs))
            for rs in by_comparison(records)]


def mean_and_error(xs) -> tuple[float, float]:
    """The mean of xs and its standard error (sample standard deviation / sqrt(n))."""
    n = len(xs)
    mean = sum(xs) / n
    return mean, (sum((x - mean) ** 2 for x in xs) / (n - 1) / n) ** 0.5 if n > 1 else 0.0


def voting_curve(records, samples, bench) -> list[dict]:
    """Accuracy of the majority of the first k samples, k = 1, 2, 4, ..., samples (and samples):
    the same samples for every k, so the points differ by voting alone (a graded benchmark's)."""
    curve = []
    for k in sorted({1 << i for i in range(samples.bit_length())} | {samples}):
        results = per_comparison([dict(r, correct=score(r["votes"][:k], r["chosen_position"])) for r in records])
        accuracy, error = mean_and_error([r["correct"] for r in results])
        curve.append({"k": k, "accuracy": accuracy, "standard_error": error,
                      "scores": benchmarks.score(bench, results)})
    return curve


def samples_of(r, field) -> list:
    """A line's per-sample values of `field` ("votes": the verdicts, "finish_reasons"): with
    --samples K the K samples' own, else the line's one greedy value."""
    return r[field] if field in r else [r["verdict" if field == "votes" else "finish_reason"]]


def votes_of(r) -> list:
    """A line's sample verdicts (one greedy verdict: itself)."""
    return samples_of(r, "votes")


def orders_of(records) -> dict:
    """With both orders: position consistency (the share of the comparisons judged in both orders
    whose two outcomes name the same answer; a comparison with an order not judged, its prompt
    too long, is no evidence either way), accuracy over every comparison (an unjudged order is
    wrong, as in the scores) with an inconsistent pair a tie, and the share of votes for A."""
    pairs = [rs for rs in by_comparison(records) if len(rs) == 2]
    judged = [rs for rs in pairs if all(r["finish_reason"] != "prompt_too_long" for r in rs)]
    votes = [v for r in records for v in votes_of(r) if v is not None]
    accuracy, error = mean_and_error([sum(float(r["correct"]) for r in rs) / 2 for rs in pairs])
    return {"comparisons": len(pairs), "judged_in_both_orders": len(judged),
            "position_consistency": sum(tally([(r["chosen_position"], votes_of(r)) for r in rs])[2]
                                        for rs in judged) / max(1, len(judged)),
            "accuracy": accuracy, "standard_error": error,
            "votes_A_share": sum(v == "A" for v in votes) / max(1, len(votes))}


# What each rate of scores.json counts, said there when it is not one greedy judgment per comparison.
COUNTED_OVER = {"invalid_verdict_rate": "samples", "truncated_rate": "samples",
                "verdict_A_share": "judgments (a comparison in one order; its verdict the samples' majority)",
                "gold_A_share": "judgments", "both_orders.position_consistency": "comparisons judged in both orders",
                "both_orders.votes_A_share": "samples with a verdict"}


def scores_of(records, bench, samples=1) -> dict:
    """The benchmark's official scores from log records, and the judge's own health counts; with
    samples > 1 the voting curve, and with both orders in the log their consistency. Every rate
    counts over the judged lines (prompts too long are counted apart), per sample where a line
    holds several (COUNTED_OVER, written beside them when samples or orders make it matter)."""
    n = len(records)
    judged = [r for r in records if r["finish_reason"] != "prompt_too_long"]
    judged_samples = [(v, reason) for r in judged for v, reason in zip(votes_of(r), samples_of(r, "finish_reasons"))]
    results = per_comparison(records)
    two_orders = len(results) < n
    graded = benchmarks.BENCHMARKS[bench].score is not None  # --bench label grades nothing
    scores = {
        "bench": bench,
        "comparisons": len(results),
        **({"judgments": n} if two_orders else {}),
        "prompt_too_long": n - len(judged),
        # share of samples whose text holds neither or both of [[A]] / [[B]]
        "invalid_verdict_rate": sum(v is None for v, _ in judged_samples) / max(1, len(judged_samples)),
        "truncated_rate": sum(reason == "length" for _, reason in judged_samples) / max(1, len(judged_samples)),
        # position bias shows as a verdict-A share away from the gold A share
        "verdict_A_share": sum(r["verdict"] == "A" for r in judged) / max(1, len(judged)),
        "gold_A_share": sum(r["chosen_position"] == "A" for r in judged) / max(1, len(judged)),
        "scores": benchmarks.score(bench, results) if graded else {},
    }
    if samples > 1 or two_orders:
        scores["counted_over"] = {k: v for k, v in COUNTED_OVER.items() if two_orders or "both_orders" not in k}
    if samples > 1 and graded:
        scores["voting"] = {"rule": "majority of the first k samples; equal votes are half right, no vote is wrong",
                            "curve": voting_curve(records, samples, bench)}
    if two_orders:
        scores["both_orders"] = orders_of(records)
        if not graded:  # --bench label: "correct" is "picked response_a"
            del scores["both_orders"]["accuracy"], scores["both_orders"]["standard_error"]
    return scores


def labeled(records) -> list[dict]:
    """--bench label: each pair the judge picked an answer for, as a preference pair (prompt, chosen,
    rejected: what grpo.py --data and DPO trainers read) with its votes and, with both orders, their
    consistency. Pairs with no pick (a tie, no vote) are left out; scores.json counts them."""
    out = []
    for rs in by_comparison(records):
        choice, votes, consistent = tally([(r["chosen_position"], votes_of(r)) for r in rs])
        if choice is None:
            continue
        meta = rs[0]["meta"]
        a, b = meta["response_a"], meta["response_b"]
        out.append({"id": rs[0]["uid"], **({"prompt": meta["prompt"]} if "prompt" in meta else {}),
                    "chosen": a if choice == "chosen" else b, "rejected": b if choice == "chosen" else a,
                    "picked": "response_a" if choice == "chosen" else "response_b",
                    "votes": {"response_a": votes["chosen"], "response_b": votes["rejected"], "none": votes["none"]},
                    "consistent": consistent})
    return out


def summary(scores) -> str:
    """A two-column table: every scalar score in percent, then the counts."""
    rows = [(k, f"{100 * v:.1f}") for k, v in scores["scores"].items() if isinstance(v, float)]
    rows += [(k, str(scores[k])) for k in ("comparisons", "prompt_too_long")]
    rows += [(k, f"{100 * scores[k]:.1f}") for k in ("invalid_verdict_rate", "truncated_rate",
                                                      "verdict_A_share", "gold_A_share")]
    for point in scores.get("voting", {}).get("curve", []):
        rows.append((f"majority of {point['k']}", f"{100 * point['accuracy']:.1f} +- {100 * point['standard_error']:.1f}"))
    if "both_orders" in scores:
        orders = scores["both_orders"]
        if "accuracy" in orders:
            rows.append(("both orders: accuracy", f"{100 * orders['accuracy']:.1f} +- {100 * orders['standard_error']:.1f}"))
        rows += [("both orders: consistency", f"{100 * orders['position_consistency']:.1f}"),
                 ("both orders: votes for A", f"{100 * orders['votes_A_share']:.1f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>7}" for k, v in rows)


def no_result(scores) -> str | None:
    """Why a finished evaluation is no result (and eval.py exits non-zero): no judgment held a verdict."""
    judged = scores.get("judgments", scores["comparisons"]) - scores["prompt_too_long"]
    if judged and scores["invalid_verdict_rate"] == 1.0:
        return (f"none of the {judged} judgments holds a verdict ([[A]] or [[B]]): the scores are written, but "
                f"they are not a result. Check the model (its weights, its tokenizer), --style and "
                f"--max_new_tokens ({100 * scores['truncated_rate']:.0f}% of the sampled judgments were cut there)")
    return None
