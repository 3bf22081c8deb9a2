"""Runs under torchrun --nproc_per_node=2 for tests/test_tp.py; not a test itself.

    python -m torch.distributed.run --nproc_per_node=2 tests/tp_worker.py OUT.json CHECKPOINT_DIR TIED

A TP = 2 decoder, made from FSDP2 shards (tp.weights) and from safetensors (tp.load), against the
same weights whole and unsharded: each rank's shapes, and the tokens and log-probs it samples.
After distributed.shutdown, each rank writes the names of its threads (OUT.json.threads.RANK):
none of the process groups' may be left for the interpreter's teardown.
"""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distributed as D  # noqa: E402
import tp  # noqa: E402
from checkpoint import save_pretrained  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from kvcache import new_cache  # noqa: E402
from rollout import SamplingParams, generate  # noqa: E402
from scheduler import Prompt, as_prompts  # noqa: E402


def run(out, checkpoint_dir, tied):
    # GQA (4 query heads over 2 KV heads), and a vocabulary that does not split evenly.
    config = ModelConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    ctx = D.init(tp=2)
    sharded = D.load_model(None, ctx, config=config, seed=3)
    whole = Transformer(config)
    D.init_weights(whole, seed=3)
    if D.is_main():
        save_pretrained(whole, checkpoint_dir)
    D.barrier()
    prompts = [[5, 6, 7], [8, 9], [10], list(range(20, 45))]
    runs = {"greedy": SamplingParams(temperature=0, max_new_tokens=12),
            "sampled": SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, n=3, seed=1)}
    result = {"rank": ctx.rank}
    decoder = tp.weights(sharded, ctx.tp_mesh, torch.float32, ctx.device)
    attn = decoder.layers[0].self_attn
    result["q_rows"] = attn.q_proj.weight.to_local().shape[0]
    result["k_rows"] = attn.k_proj.weight.to_local().shape[0]
    result["down_cols"] = decoder.layers[0].mlp.down_proj.weight.to_local().shape[1]
    result["vocab_rows"] = decoder.lm_head.weight.to_local().shape[0]
    result["all_dtensor"] = all(isinstance(p, DTensor) for n, p in decoder.named_parameters() if "proj" in n)
    result["tied"] = decoder.lm_head.weight is decoder.embed_tokens.weight
    result["cache_kv_heads"] = new_cache(decoder, 2, 16, 16, 3).k.shape[3]
    for name, params in runs.items():
        got, want = generate(decoder, prompts, params), generate(whole, prompts, params)
        result[name] = {"tokens_equal": [c.token_ids for c in got] == [c.token_ids for c in want],
                        "logprob_gap": max(abs(a - b) for c, w in zip(got, want)
                                           for a, b in zip(c.logprobs, w.logprobs))}
    loaded = tp.load(checkpoint_dir, ctx.tp_mesh, torch.float32, ctx.device)
    got, want = generate(loaded, prompts, runs["greedy"]), generate(whole, prompts, runs["greedy"])
    result["loaded_tokens_equal"] = [c.token_ids for c in got] == [c.token_ids for c in want]
    # A group's ranks bring different prompts; each gets its own back, as if decoded alone.
    mine = prompts[ctx.rank::2]
    keys = list(range(ctx.rank, len(prompts), 2))
    got, _ = tp.generate_in_group(loaded, as_prompts(mine, keys), runs["sampled"], ctx)
    want = generate(whole, mine, runs["sampled"], prompt_keys=keys)
    result["group_equal"] = [(c.prompt_index, c.token_ids) for c in got] == [(c.prompt_index, c.token_ids) for c in want]
    # What is per prompt travels with it through the group's gather: each rank's prompts carry
    # their own limits (3 + key % 5 new tokens), and each completion keeps to its own prompt's.
    limited = [Prompt(p.ids, p.key, max_new_tokens=3 + p.key % 5) for p in as_prompts(mine, keys)]
    own, _ = tp.generate_in_group(loaded, limited, runs["sampled"], ctx)
    alone = generate(whole, limited, runs["sampled"])
    result["own_limits_equal"] = [c.token_ids for c in own] == [c.token_ids for c in alone]
    result["own_limits_kept"] = all(len(c.token_ids) <= limited[c.prompt_index].max_new_tokens and
                                    (c.finish_reason == "stop" or len(c.token_ids) == limited[c.prompt_index].max_new_tokens)
                                    for c in own)
    # Budgets that differ by rank (as free memory does): the group takes the smallest, 10 pages of
    # 2 KiB, and its ranks stay in step.
    page = 2 * config.num_hidden_layers * 1 * config.head_dim * 16 * 4
    got, stats = tp.generate_in_group(loaded, as_prompts(mine, keys), runs["sampled"], ctx,
                                      kv_budget_bytes=(10 if ctx.rank == 0 else 40) * page)
    result["small_budget_equal"] = [c.token_ids for c in got] == [c.token_ids for c in want]
    result["small_budget_pages"] = stats.pool_pages
    every = D.all_gather_objects(result)
    if D.is_main():
        Path(out).write_text(json.dumps(every))
    return ctx.rank


def main(out, checkpoint_dir, tied):
    rank = run(out, checkpoint_dir, tied)  # what it built on the process group is gone with it
    D.shutdown()
    tasks = Path("/proc/self/task")
    threads = sorted((t / "comm").read_text().strip() for t in tasks.iterdir()) if tasks.exists() else None
    Path(f"{out}.threads.{rank}").write_text(json.dumps(threads))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "tied")
