"""Tensor-parallel decoding (tp.py) on the CPU: 2 ranks under gloo, against the whole model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tp
from model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["untied", "tied"])
def ranks(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          str(ROOT / "tests" / "tp_worker.py"), str(tmp / "out.json"), str(tmp / "ckpt"),
                          request.param], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    threads = [json.loads((tmp / f"out.json.threads.{rank}").read_text()) for rank in (0, 1)]
    return [dict(r, mode=request.param, threads_after_shutdown=t)
            for r, t in zip(json.loads((tmp / "out.json").read_text()), threads)]


def test_shutdown_leaves_no_process_group_thread_to_the_interpreters_teardown(ranks):
    # A gloo thread alive at teardown frees its last work there and aborts the process now and
    # then ("terminate called without an active exception"): distributed.shutdown ends them all.
    for r in ranks:
        if r["threads_after_shutdown"] is None:
            pytest.skip("no /proc/self/task here to list a process's threads")
        assert not [t for t in r["threads_after_shutdown"] if "gloo" in t], r["threads_after_shutdown"]


def test_each_rank_holds_its_half_of_every_matrix(ranks):
    for r in ranks:
        assert (r["q_rows"], r["k_rows"], r["down_cols"]) == (2 * 8, 1 * 8, 32), r  # heads 4 -> 2, KV 2 -> 1
        assert r["cache_kv_heads"] == 1 and r["all_dtensor"]
    assert [r["vocab_rows"] for r in ranks] == [151, 150]  # torch.chunk's split of 301 rows


def test_tied_embeddings_stay_one_tensor(ranks):
    assert all(r["tied"] == (r["mode"] == "tied") for r in ranks)


@pytest.mark.parametrize("run", ["greedy", "sampled"])
def test_tp2_decodes_the_tokens_of_the_whole_model(ranks, run):
    for r in ranks:
        assert r[run]["tokens_equal"], (r["rank"], run)
        assert r[run]["logprob_gap"] < 1e-5, (r["rank"], run)


def test_tp2_loaded_from_safetensors_decodes_the_same(ranks):
    assert all(r["loaded_tokens_equal"] for r in ranks)


def test_a_group_decodes_its_ranks_prompts_together_and_each_keeps_its_own(ranks):
    assert all(r["group_equal"] for r in ranks)


def test_a_prompts_own_limit_travels_with_it_through_the_group(ranks):
    assert all(r["own_limits_equal"] and r["own_limits_kept"] for r in ranks), ranks


def test_a_group_decodes_under_the_smallest_of_its_ranks_budgets(ranks):
    for r in ranks:
        assert r["small_budget_pages"] == 10, r  # rank 1's own budget was 40 pages
        assert r["small_budget_equal"], r


def test_uneven_heads_are_refused_with_the_fix():
    config = ModelConfig(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_key_value_heads \\(3\\) to divide by 2"):
        tp.check_divisible(config, 2)


def test_the_shard_config_is_what_one_rank_holds():
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    local = tp.shard_config(config, 2)
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size,
            local.head_dim, local.vocab_size) == (2, 1, 32, 8, 64)
    assert Transformer(local).layers[0].self_attn.k_proj.weight.shape == torch.Size([8, 32])
