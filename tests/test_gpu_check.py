"""bench/gpu_check.py runs its model and GRPO sections on the CPU at a tiny shape (--smoke), so the
first GPU session spends its minutes on the GPU, not on a typo; and its runner survives what a first
GPU does to it: a section that hangs, one that crashes, a device that stops answering."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def gpu_check(out, *flags):
    return [sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(out), *flags]


def test_gpu_check_smoke_runs_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    res = subprocess.run(gpu_check(out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "budget: model_paths 60 s, grpo_step_one_gpu 90 s, tp_and_offload_one_gpu 60 s" in res.stdout
    sections = json.loads(out.read_text())["sections"]
    assert set(sections) == {"model_paths", "grpo_step_one_gpu", "tp_and_offload_one_gpu", "grpo_step_lora_one_gpu"}, \
        sections
    assert all(s["ok"] for s in sections.values()), sections
    assert sections["model_paths"]["decode_vs_full_forward"] < 1e-5
    # in fp32 on the CPU a preempted trace is regenerated exactly; on a GPU this is a figure
    assert sections["model_paths"]["preemptions"] > 0 and sections["model_paths"]["tight_budget_traces_equal"] == 1.0
    assert sections["grpo_step_one_gpu"]["steps"][0]["rollout_logprob_diff_max"] < 1e-4
    # LoRA's step 2 rolls out through the merged adapters (step 1 moved them): the sampler still agrees
    assert sections["grpo_step_lora_one_gpu"]["steps"][1]["rollout_logprob_diff_max"] < 1e-4
    tp_offload = sections["tp_and_offload_one_gpu"]
    assert tp_offload["tp1_graph_decode_equals_plain"] == 1.0
    assert all(g > 0 for g in tp_offload["offload"]["true"]["grad_norms"]), tp_offload  # a comparison that can fail


def test_a_crashed_and_a_hung_section_cost_only_themselves_and_results_are_kept_as_they_come(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.Popen(gpu_check(out, "--only", "tp_and_offload_one_gpu,model_paths", "--limits", "model_paths=12",
                                      "--inject", "tp_and_offload_one_gpu=crash,model_paths=hang"),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 25
    while time.time() < deadline and not (out.exists() and "tp_and_offload_one_gpu" in out.read_text()):
        time.sleep(0.2)
    # the crashed section is on disk while the hung one still runs: a kill now would keep it
    assert proc.poll() is None and out.exists(), "the JSON was not written after the first section"
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, output[-3000:]
    sections = json.loads(out.read_text())["sections"]
    crashed, hung = sections["tp_and_offload_one_gpu"], sections["model_paths"]
    assert crashed["error"] == "its process died (signal SIGABRT) without a result", crashed
    assert hung["error"] == "timed out: still running after its limit of 12.0 s; killed", hung
    assert 12 <= hung["seconds"] < 40 and crashed["device_answers_after"] and hung["device_answers_after"]


def test_a_device_that_stops_answering_ends_the_run_naming_what_did_not_run(tmp_path):
    out = tmp_path / "check.json"
    res = subprocess.run(gpu_check(out, "--only", "model_paths,tp_and_offload_one_gpu,grpo_step_one_gpu",
                                   "--inject", "model_paths=crash,probe=sticky"),
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    sections = json.loads(out.read_text())["sections"]
    assert sections["model_paths"]["device_answers_after"] is False
    for name in ("tp_and_offload_one_gpu", "grpo_step_one_gpu"):
        assert sections[name] == {"ok": False, "not_run": "the device stopped answering after model_paths"}
