"""GRPO options users of verl / TRL / OpenRLHF ask for: dynamic sampling (filtering all-equal
groups, oversampling), overlong handling, dual clip, traces on disk, checkpoint retention, exports
during a run, and export.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import demo
import distributed as D
import grpo
import passes
from conftest import loss_row
from grpo import GRPOConfig
from objective import equal_groups, overlong_penalty, policy_loss

ROOT = Path(__file__).resolve().parents[1]


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([100., 1000., 1024., 1536., 2048.])
    # DAPO: 0 up to max - buffer, then (max - buffer - L) / buffer, down to -1 at max
    expected = torch.tensor([0.0, 0.0, 0.0, -0.5, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, max_len=2048, buffer=1024), expected)


def test_equal_groups_by_hand():
    rewards = torch.tensor([1., 1., 1., -1., 1., -1., -1., -1., -1., 0.5, 0.5, 0.5])
    assert equal_groups(rewards, 3).tolist() == [True, False, True, True]


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    logp = torch.tensor([3.0, 3.0, 0.1, -3.0])  # ratios e^3 (twice), e^0.1, e^-3
    old, zeros, mask = torch.zeros(4), torch.zeros(4), torch.ones(4)
    adv = torch.tensor([-1.0, 1.0, -1.0, -1.0])
    seq = torch.zeros(4, dtype=torch.long)
    off = GRPOConfig(kl_coef=0.0, clip_ratio_c=0.0)
    on = GRPOConfig(kl_coef=0.0, clip_ratio_c=3.0)
    e = math.exp
    per_token_off = [e(3), -1.2, e(0.1), 0.8]  # max(-A r, -A clip(r, 0.8, 1.2)), by hand
    per_token_on = [3.0, -1.2, e(0.1), 0.8]  # token 0: A < 0 and -A r = e^3 > -A c = 3
    loss_off, _ = policy_loss(logp, zeros, loss_row(old, zeros, adv, mask, seq), off, 4, 1)
    loss_on, sums = policy_loss(logp, zeros, loss_row(old, zeros, adv, mask, seq), on, 4, 1)
    assert float(loss_off) == pytest.approx(sum(per_token_off) / 4, rel=1e-5)
    assert float(loss_on) == pytest.approx(sum(per_token_on) / 4, rel=1e-5)
    assert float(sums["dual_clip_frac"]) == 1


def test_filtering_reads_the_verdicts_not_the_overlong_penalty():
    # 7 wrong verdicts, one trace 1 token into the overlong buffer: DAPO filters on correctness,
    # so the group is dropped; read off the penalised rewards, it would train on advantages
    # [0.38 x 6, -2.26] driven by the length penalty alone.
    from scheduler import Completion, Prompt
    cfg = GRPOConfig(rollout_batch_size=1, mini_batch_size=1, n_samples=7, max_response_len=8, overlong_buffer=4,
                     overlong="penalty", filter_equal_groups=True)
    lengths = [2, 2, 2, 5, 2, 2, 2]
    completions = [Completion(0, s, [1] * n, [0.0] * n, "stop") for s, n in enumerate(lengths)]
    prompt = [Prompt([5, 6], 0)]
    rnd = passes.score_round([{"label": "model_a"}], prompt, completions, [""] * 7, None, cfg, -torch.ones(7))
    assert rnd.train_rewards[3] == pytest.approx(-1.25) and rnd.train_rewards[0] == -1
    one = D.Context(rank=0, world_size=1, device=torch.device("cpu"))
    assert passes.kept_groups(rnd, 0, [0], cfg, one) == []
    mixed = passes.score_round([{"label": "model_a"}], prompt, completions, [""] * 7, None, cfg,
                               torch.tensor([1.0] + [-1.0] * 6))
    assert passes.kept_groups(mixed, 0, [0], cfg, one) == [(0, 0)]


# ---- in one process: which groups and traces a step trains on ----

def by_kind(completions, texts, records):
    """Rewards set by each prompt's record: "right" all +1, "wrong" all -1, "mixed" alternating."""
    out = []
    for c in completions:
        kind = records[c.prompt_index]["kind"]
        out.append(1.0 if kind == "right" or kind == "mixed" and c.sample_index % 2 == 0 else -1.0)
    return torch.tensor(out)


def run_step(tiny_policy, monkeypatch, kinds, draws=(), **overrides):
    """One grpo_step in this process; returns its metrics and every trained row's sequences."""
    path, tokenizer = tiny_policy
    cfg = GRPOConfig(model=path, lr=1e-3, rollout_batch_size=len(kinds), mini_batch_size=2, n_samples=2,
                     max_response_len=4, micro_batch_tokens=512, kl_coef=0.0, bf16=False,
                     activation_checkpointing=False, rollout_slots=16, **overrides)
    ctx = D.Context(rank=0, world_size=1, device=torch.device("cpu"))
    model = D.load_model(path, ctx)
    policy = grpo.Policy(model, torch.optim.AdamW(model.parameters(), lr=cfg.lr), tokenizer, None)
    # the first round takes records 0..R-1, the k-th further round the next R (draws[k - 1])
    R, every = len(kinds), list(kinds) + [k for extra in draws for k in extra]
    monkeypatch.setattr(data, "step_prompts", lambda n, step, cfg: list(range(R)))
    monkeypatch.setattr(data, "oversample_prompts", lambda n, step, k, cfg: list(range(k * R, (k + 1) * R)))
    prompts = grpo.Prompts([{"kind": k, "label": "model_a"} for k in every], [[5 + i, 6, 7] for i in range(len(every))])
    trained = []
    real_update = passes.update

    def update(model, optimizer, rows, cfg, ctx):
        trained.append([(s, a) for r in rows for s, a, m in zip(r.seq.tolist(), r.advantages.tolist(), r.mask.tolist())
                        if m])
        return real_update(model, optimizer, rows, cfg, ctx)
    monkeypatch.setattr(passes, "update", update)
    return grpo.grpo_step(policy, prompts, 0, cfg, ctx, score=by_kind).metrics, trained


def test_filtering_drops_all_equal_groups_and_the_token_mean_is_over_the_rest(tiny_policy, monkeypatch):
    m, trained = run_step(tiny_policy, monkeypatch, ["right", "mixed", "wrong", "mixed"],
                          filter_equal_groups=True)
    assert m["kept_groups"] == 0.5 and m["updates"] == 1
    assert len(trained) == 1
    # one mini-batch: the two mixed groups, whose advantages are +-1/std, never 0
    assert all(abs(a) > 0.5 for _, a in trained[0]) and len({s for s, _ in trained[0]}) == 4
    m, trained = run_step(tiny_policy, monkeypatch, ["right", "mixed", "wrong", "mixed"])
    assert m["kept_groups"] == 1.0 and m["updates"] == 2
    assert sum(a == 0 for _, a in trained[0] + trained[1]) > 0, "unfiltered, zero advantages train"


def test_oversampling_draws_until_the_kept_groups_fill_the_batch(tiny_policy, monkeypatch):
    kinds = ["right", "mixed", "wrong", "wrong"]
    m, trained = run_step(tiny_policy, monkeypatch, kinds, draws=[["wrong", "mixed", "right", "mixed"]],
                          filter_equal_groups=True, oversample=1)
    assert m["rollout_rounds"] == 2 and m["kept_groups"] == 0.75 and m["updates"] == 2
    m, _ = run_step(tiny_policy, monkeypatch, kinds, draws=[["mixed"] * 4, ["mixed"] * 4],
                    filter_equal_groups=True, oversample=2)
    assert m["rollout_rounds"] == 2 and m["kept_groups"] == 1.0, "it stops once the batch is full"


def test_overlong_mask_drops_truncated_traces_from_the_loss(tiny_policy, monkeypatch):
    # A random tiny policy almost never samples EOS within 4 tokens: every trace is cut.
    m, trained = run_step(tiny_policy, monkeypatch, ["mixed"] * 4, overlong="mask")
    assert m["truncated"] == 1.0 and m["updates"] == 0 and trained == [[], []]
    m, trained = run_step(tiny_policy, monkeypatch, ["mixed"] * 4, overlong="penalty", overlong_buffer=2)
    # every trace is at the limit: -1 each, so rewards shift but the groups' advantages do not
    assert m["updates"] == 2 and m["reward"] == 0.0


# ---- end to end: traces, checkpoint retention, exports during the run, export.py ----

def test_traces_checkpoints_and_exports_during_a_run(tiny_policy, tmp_path):
    path, _ = tiny_policy
    records = tmp_path / "rlvr.jsonl"
    data.write_records(records, demo.rlvr_records(24, seed=0))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "grpo.py", "--model", path, "--data", str(records), "--out", str(out),
                          "--rollout_batch_size", "8", "--mini_batch_size", "4", "--n_samples", "2",
                          "--max_response_len", "8", "--micro_batch_tokens", "512", "--no-bf16",
                          "--no-activation_checkpointing", "--lr", "1e-3", "--rollout_slots", "16",
                          "--save_every", "1", "--keep_last", "1", "--export_every", "1", "--log_traces_every", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(os.listdir(out))
    assert [n for n in names if n.startswith("step_")] == ["step_00000003"], names
    assert sorted(os.listdir(out / "hf" / "step_00000001")) == sorted(os.listdir(out / "hf" / "step_00000002"))
    assert (out / "hf" / "model.safetensors").exists(), "the final export sits beside the step exports"
    traces = [json.loads(line) for line in (out / "rollouts" / "step_00000002.jsonl").read_text().splitlines()]
    assert len(traces) == grpo.TRACE_GROUPS * 2  # rank 0's first groups, 2 traces each
    assert {"prompt", "label", "trace", "verdict", "reward", "finish_reason"} <= set(traces[0])
    assert traces[0]["label"] in ("model_a", "model_b") and traces[0]["reward"] in (-1.0, 1.0)
    res = subprocess.run([sys.executable, "export.py", str(out / "step_00000003"), str(tmp_path / "exported")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ours, final = load_file(tmp_path / "exported" / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert ours.keys() == final.keys() and all(torch.equal(ours[k], final[k]) for k in ours)
    assert (tmp_path / "exported" / "tokenizer.json").exists()


def test_filtering_and_oversampling_give_the_same_step_on_two_ranks(tiny_policy, tmp_path):
    path, _ = tiny_policy
    options = json.dumps({"filter_equal_groups": True, "oversample": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    runs = []
    for nproc in (1, 2):
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        f"--nproc_per_node={nproc}"]
        res = subprocess.run(launcher + ["tests/grpo_worker.py", path, str(tmp_path / f"{nproc}.json"), "2",
                                         "1e-3", options], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(json.loads((tmp_path / f"{nproc}.json").read_text()))
    one, two = runs
    for a, b in zip(one["history"], two["history"]):
        for key in ("reward", "kept_groups", "rollout_rounds", "updates", "loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert two["checksum"] == pytest.approx(one["checksum"], rel=1e-6)


def test_a_records_own_max_new_tokens_holds_under_a_tensor_parallel_rollout(tiny_policy, tmp_path):
    # per-prompt values travel with the prompt through the TP group's gather: every other record asks
    # for 3 new tokens at most, the others take --max_response_len 8
    import tokenization
    path, tokenizer = tiny_policy
    records = [dict(r, max_new_tokens=3) if i % 2 else r for i, r in enumerate(demo.rlvr_records(16, seed=0))]
    data.write_records(tmp_path / "rlvr.jsonl", records)
    limit = {tokenizer.decode(tokenization.encode_prompt(tokenizer, r["context_messages"], 4096)): r.get("max_new_tokens", 8)
             for r in records}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "grpo.py", "--model", path,
                          "--data", str(tmp_path / "rlvr.jsonl"), "--out", str(tmp_path / "out"), "--rollout_tp", "2",
                          "--rollout_batch_size", "16", "--mini_batch_size", "4", "--n_samples", "2",
                          "--max_response_len", "8", "--micro_batch_tokens", "512", "--no-bf16",
                          "--no-activation_checkpointing", "--rollout_slots", "16", "--log_traces_every", "1",
                          "--max_steps", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    traces = [json.loads(line) for line in (tmp_path / "out" / "rollouts" / "step_00000001.jsonl").read_text().splitlines()]
    limits = [(limit[t["prompt"]], t["tokens"], t["finish_reason"]) for t in traces]
    assert {own for own, _, _ in limits} == {3, 8}, "rank 0 logged prompts of both kinds"
    assert all(tokens <= own and (reason == "stop" or tokens == own) for own, tokens, reason in limits), limits
    data.write_records(tmp_path / "bad.jsonl", [records[0], dict(records[1], max_new_tokens=0)])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'max_new_tokens' must be >= 1, got 0"):
        data.load_rlvr(str(tmp_path / "bad.jsonl"))


def test_rollout_correction_and_the_sequence_ratio_run_in_a_step_and_log_their_weights(tiny_policy, monkeypatch):
    m, trained = run_step(tiny_policy, monkeypatch, ["mixed"] * 4, rollout_is="sequence", rollout_is_mode="mask",
                          ratio_level="sequence", loss_agg="seq-mean-token-mean")
    # fp32 on the CPU: the sampler's log-probs are the trainer's to ~1e-6, so every weight is ~1, none masked
    assert m["updates"] == 2 and m["rollout_is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert 1.0 <= m["rollout_is_weight_max"] < 1.001 and m["rollout_is_outside"] == 0
    off, _ = run_step(tiny_policy, monkeypatch, ["mixed"] * 4)
    assert "rollout_is_weight_mean" not in off
