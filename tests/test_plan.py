"""The memory plan (plan.py): the paper's 7B runs fit 8 x 80 GB, a run that cannot fit is refused."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import demo
import plan

ROOT = Path(__file__).resolve().parents[1]
QWEN25_7B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
                 rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768)


QWEN25_14B = dict(QWEN25_7B, hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
                  num_key_value_heads=8, intermediate_size=13824)
QWEN25_32B = dict(QWEN25_14B, num_hidden_layers=64, intermediate_size=27648)


def config_dir(tmp_path_factory, name, config):
    path = tmp_path_factory.mktemp(name)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def qwen7b(tmp_path_factory):
    """A model directory that holds nothing but Qwen2.5-7B-Instruct's config.json."""
    path = tmp_path_factory.mktemp("qwen7b")
    (path / "config.json").write_text(json.dumps(QWEN25_7B))
    return str(path)


def run_plan(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, script, "--plan", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    phases = dict(re.findall(r"^(\S.*?)\s{2,}([\d.]+)\s+[\d.]+(?:\s+<- over)?$", res.stdout, re.M))
    return res, {name: float(gib) for name, gib in phases.items()}


def test_grpo_7b_paper_defaults_fit_8_gpus_of_80_gib(qwen7b):
    res, peaks = run_plan("grpo.py", "--model", qwen7b, "--plan_world_size", "8", "--plan_gpu_gib", "80")
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "fits: the peak is" in res.stdout
    names = list(peaks)
    for phase in ("load", "rollout: gather", "rollout: KV pool", "rollout: prefill", "rollout: decode",
                  "old + reference", "update: forward + backward", "update: clip + AdamW"):
        assert any(n.startswith(phase) for n in names), f"no {phase!r} phase in {names}"
    assert max(peaks.values()) <= 77.0, peaks
    full = int(re.search(r"KV pool \([\d,]+ pages of 16: (\d+) sequences at full length", res.stdout).group(1))
    assert full >= 32, f"room for only {full} full-length sequences per rank"
    assert "decode step (256 sequences)" in res.stdout


def test_sft_7b_paper_defaults_fit_8_gpus_of_80_gib(qwen7b):
    res, peaks = run_plan("sft.py", "--model", qwen7b, "--plan_world_size", "8", "--plan_gpu_gib", "80")
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert any(n.startswith("forward + backward (one row of 12,288 tokens)") for n in peaks), peaks
    assert max(peaks.values()) <= 77.0, peaks


def test_a_run_that_cannot_fit_is_refused_with_the_table():
    # 3.05 GiB GPUs leave 0.05 GiB beside the CUDA context: not even the demo judge's rollout fits.
    res, peaks = run_plan("grpo.py", "--plan_world_size", "2", "--plan_gpu_gib", "3.05")
    assert res.returncode == 1, res.stdout + res.stderr[-3000:]
    assert "does not fit" in res.stdout and "phase" in res.stdout


def test_a_cuda_run_checks_the_plan_before_its_first_step(monkeypatch):
    # What a GPU run does before step 1 (here without a GPU: the device's size is made up).
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    argv = ["grpo.py", "--model", demo.SHIPPED, "--rollout_batch_size", "8", "--mini_batch_size", "8"]
    for gib, fits in ((3.05, False), (8.0, True)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, gib=gib: SimpleNamespace(total_memory=int(gib * 2**30)))
        if fits:
            plan.check_before_training(argv)
        else:
            with pytest.raises(SystemExit, match="does not fit"):
                plan.check_before_training(argv)


def full_length_sequences(stdout):
    return int(re.search(r"KV pool \([\d,]+ pages of 16: (\d+) sequences at full length", stdout).group(1))


def test_grpo_14b_fits_one_node_with_a_tensor_parallel_rollout(tmp_path_factory):
    res, peaks = run_plan("grpo.py", "--model", config_dir(tmp_path_factory, "q14b", QWEN25_14B), "--rollout_tp", "2",
                          "--plan_world_size", "8", "--plan_gpu_gib", "80")
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert any(n.startswith("rollout: tensor-parallel weights (1/2 of every matrix)") for n in peaks), peaks
    assert max(peaks.values()) <= 77.0, peaks
    # gathering the full weights left room for 9 (README); half of them leave more than 3 times that
    assert full_length_sequences(res.stdout) >= 28, res.stdout


def test_grpo_32b_fits_four_nodes_with_tp_8_and_one_with_offloaded_states(tmp_path_factory):
    model = config_dir(tmp_path_factory, "q32b", QWEN25_32B)
    res, peaks = run_plan("grpo.py", "--model", model, "--rollout_tp", "8", "--plan_world_size", "32",
                          "--plan_gpu_gib", "80")
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert max(peaks.values()) <= 77.0 and full_length_sequences(res.stdout) >= 64, res.stdout
    res, peaks = run_plan("grpo.py", "--model", model, "--rollout_tp", "8", "--offload_states",
                          "--plan_world_size", "8", "--plan_gpu_gib", "80")
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert any("AdamW state back" in n for n in peaks) and any("reference read for them" in n for n in peaks), peaks
    assert max(peaks.values()) <= 77.0, res.stdout
