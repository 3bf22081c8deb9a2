"""bench/gpu_check.py runs its model and GRPO sections on the CPU at a tiny shape (--smoke), so the
first GPU session spends its minutes on the GPU, not on a typo."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    assert set(sections) == {"model_paths", "grpo_step_one_gpu", "tp_and_offload_one_gpu"}, sections
    assert all(s["ok"] for s in sections.values()), sections
    assert sections["model_paths"]["decode_vs_full_forward"] < 1e-5
    # in fp32 on the CPU a preempted trace is regenerated exactly; on a GPU this is a figure
    assert sections["model_paths"]["preemptions"] > 0 and sections["model_paths"]["tight_budget_traces_equal"] == 1.0
    assert sections["grpo_step_one_gpu"]["steps"][0]["rollout_logprob_gap"] < 1e-4
    tp_offload = sections["tp_and_offload_one_gpu"]
    assert tp_offload["tp1_graph_decode_equals_plain"] == 1.0
    assert all(g > 0 for g in tp_offload["offload"]["true"]["grad_norms"]), tp_offload  # a comparison that can fail
