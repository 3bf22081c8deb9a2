"""The memory plan (plan.py): the trainers' own phases walked over two rows, on the card as it
reports itself, with what no tensor shows set aside; the paper's runs' verdicts."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import demo
import distributed as D
import grpo
import plan
import sft
from bench.shapes import config_json
from grpo import GRPOConfig
from sft import SFTConfig

ROOT = Path(__file__).resolve().parents[1]


def config_dir(tmp_path_factory, name, config):
    """A model directory that holds nothing but a config.json."""
    path = tmp_path_factory.mktemp(name)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def qwen7b(tmp_path_factory):
    return config_dir(tmp_path_factory, "qwen7b", config_json("7B"))


def run_plan(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, script, "--plan", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    return res, {name: peak for name, peak, _ in plan.read_table(res.stdout)[0] if peak is not None}


def usable(stdout):
    return plan.read_table(stdout)[1]


def full_length_sequences(stdout):
    return int(re.search(r"a KV pool of [\d,]+ pages of 16 \([\d.]+ GiB\): (\d+) sequences at full length",
                         stdout).group(1))


def test_grpo_7b_paper_defaults_fit_8_gpus_of_80_gb(qwen7b):
    res, peaks = run_plan("grpo.py", "--model", qwen7b)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    out = res.stdout
    # the card as it reports itself, and each thing no tensor shows, on a line of its own
    assert "--plan_gpu_gib 80: an 80 GB card reports 79.1 GiB" in out and "card 79.1 GiB" in out
    for item in ("CUDA context", "NCCL buffers: 1 process group", "cuBLAS workspaces: 2 streams",
                 "allocator fragmentation: 5% of the card", "varlen attention backward scratch: 16,384 tokens"):
        assert f"  {item}" in out, item
    assert usable(out) == pytest.approx(79.1 - 0.4 - 1.0 - 2 / 32 - 0.05 * 79.1 - 16384 * 28 * 128 * 8 / 2**30, abs=0.06)
    names = list(peaks)
    for phase in ("load", "rollout: gathered weights, KV pool, prefill, decode at full length",
                  "old + reference log-probs (2 of 56 rows)", "update: forward + backward (2 of 56 rows)"):
        assert any(n.startswith(phase) for n in names), f"no {phase!r} phase in {names}"
    assert "fits: the peak is" in out and max(peaks.values()) <= usable(out), out
    # rows packed full, as real traces that end early pack them, not one 12,287-token trace a row
    assert "trainer: 56 rows of 16,384 tokens (2 traces of 8,192) per mini-batch per rank" in out, out
    # from the second row on the gradients exist: the update peaks above a one-row walk's 23.8 GiB
    assert peaks[next(n for n in names if n.startswith("update"))] > 25.0, peaks
    assert full_length_sequences(out) >= 32 and "; 256 slots;" in out, out


def test_sft_7b_paper_defaults_fit_8_gpus_of_80_gb(qwen7b):
    res, peaks = run_plan("sft.py", "--model", qwen7b)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert any(n.startswith("step: forward + backward (2 of 16 rows of 12,288 tokens), clip, AdamW step")
               for n in peaks), peaks
    assert max(peaks.values()) <= usable(res.stdout), res.stdout


def test_a_run_that_cannot_fit_is_refused_with_the_table_and_what_would_fit():
    # 1.6 GiB cards keep 0.1 GiB beside the CUDA context and NCCL: not even the demo judge fits.
    res, _ = run_plan("grpo.py", "--plan_world_size", "2", "--plan_gpu_gib", "1.6")
    assert res.returncode == 1, res.stdout + res.stderr[-3000:]
    out = res.stdout
    assert "does not fit" in out and "phase" in out
    options = dict(re.findall(r"^  (--\S+(?: \d+)?).*?: (fits|does not fit|cannot be walked)", out, re.M))
    assert {"--offload_states", "--plan_world_size 4", "--plan_gpu_gib 141", "--plan_world_size 8"} <= set(options), out
    assert options["--plan_gpu_gib 141"] == "fits", out


def test_a_cuda_run_checks_the_plan_on_the_card_as_it_reports_itself(monkeypatch):
    # What a GPU run does before step 1 (here without a GPU: the device's size is made up).
    argv = ["grpo.py", "--model", demo.SHIPPED, "--rollout_batch_size", "8", "--mini_batch_size", "8",
            "--no-plan_alternatives"]
    for gib, fits in ((1.6, False), (8.0, True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda gib=gib: (0, int(gib * 2**30)))
        if fits:
            plan.check_before_training(argv)
        else:
            with pytest.raises(SystemExit, match="does not fit"):
                plan.check_before_training(argv)


def test_grpo_14b_fits_one_node_with_a_tensor_parallel_rollout(tmp_path_factory):
    res, peaks = run_plan("grpo.py", "--model", config_dir(tmp_path_factory, "q14b", config_json("14B")), "--rollout_tp", "2")
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert any(n.startswith("rollout: TP weights (1/2 of every matrix)") for n in peaks), peaks
    assert "NCCL buffers: 3 process groups" in res.stdout  # the world's, and the mesh's dp and tp ones
    assert max(peaks.values()) <= usable(res.stdout), res.stdout
    # the full weights gathered on every rank leave room for 9 such sequences; half of them, for 26
    assert full_length_sequences(res.stdout) >= 20, res.stdout


def test_grpo_32b_does_not_fit_one_node_even_with_offloaded_states(tmp_path_factory):
    # The second row's backward, then AdamW's step, go over (a one-row walk on a card taken as 80 GiB
    # said 73.5 of 77 and called it a fit). Four nodes fit: bench/plans.py, docs/scale.md.
    model = config_dir(tmp_path_factory, "q32b", config_json("32B"))
    res, peaks = run_plan("grpo.py", "--model", model, "--rollout_tp", "8", "--offload_states",
                          "--no-plan_alternatives")
    assert res.returncode == 1, res.stdout + res.stderr[-3000:]
    update = next(n for n in peaks if n.startswith("update"))
    assert peaks[update] > usable(res.stdout) and re.search(rf"^{re.escape(update)}.*<- over$", res.stdout, re.M)


# ---- one step, two uses: the plan walks what a training step runs ----

def direct_calls(fn, caller, module):
    """The project's functions (module.function) that `caller`, a function of `module`, calls
    directly while fn() runs."""
    calls, path = set(), module.__file__

    def profile(frame, event, arg):
        code, back = frame.f_code, frame.f_back
        if event == "call" and back is not None and back.f_code.co_name == caller and back.f_code.co_filename == path \
                and code.co_filename.startswith(str(ROOT)) and "/tests/" not in code.co_filename:
            calls.add(f"{Path(code.co_filename).stem}.{code.co_name}")
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


# What a step does on the host alone (no device memory to walk): which groups are kept (the plan
# keeps all: full mini-batches), the metrics, the traces written to disk.
HOST_ONLY = {"passes.kept_groups", "grpo.step_metrics", "grpo.write_traces"}


def test_every_phase_of_a_grpo_step_is_walked_by_the_plan(tiny_policy):
    path, tokenizer = tiny_policy
    cfg = GRPOConfig(model=path, rollout_batch_size=4, mini_batch_size=2, n_samples=2, max_prompt_len=8,
                     max_response_len=4, micro_batch_tokens=24, bf16=False, activation_checkpointing=False,
                     rollout_slots=8, plan_world_size=1)
    ctx = D.Context(rank=0, world_size=1, device=torch.device("cpu"))
    model, optimizer = grpo.build_policy(cfg, ctx)
    ref_model = grpo.build_reference(cfg, ctx)
    records = [{"label": "model_a"}] * 4
    step = direct_calls(lambda: grpo.grpo_step(model, ref_model, optimizer, tokenizer, records, [[5, 6, 7]] * 4, 0,
                                               list(range(4)), cfg, ctx), "grpo_step", grpo)
    walked = direct_calls(lambda: plan.walk_once(grpo.plan_walk, cfg, 1, 80, 1, 2), "plan_walk", grpo)
    assert {"grpo.rollout", "passes.score_round", "passes.assemble", "grpo.logprob_passes", "passes.train_on"} <= step, step
    assert step - HOST_ONLY <= walked, f"run by a step, not walked by the plan: {step - HOST_ONLY - walked}"


def test_the_sft_step_is_what_the_plan_walks(tiny_policy):
    path, _ = tiny_policy
    cfg = SFTConfig(model=path, max_len=16, batch_size=2, bf16=False, activation_checkpointing=False)
    walked = direct_calls(lambda: plan.walk_once(sft.plan_walk, cfg, 1, 80, 1, 1), "plan_walk", sft)
    assert {"sft.sft_step", "sft.build"} <= walked, walked
