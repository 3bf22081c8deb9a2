"""LoRA (lora.py): adapters on a frozen base, the reference with them off, the rollout's merged
weights, adapter-only checkpoints and the exports (merged for transformers, the adapter for PEFT)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distributed as D
import grpo
import lora
import passes
from checkpoint import load_config
from grpo import GRPOConfig
from model import on_meta

ROOT = Path(__file__).resolve().parents[1]
ONE = D.Context(rank=0, world_size=1, device=torch.device("cpu"))
ADAPTERS = lora.LoRAConfig(rank=4, alpha=8.0)


def rows(tokenizer, n=2, length=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tokenizer), (n, length), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def logprobs(model, ids, targets):
    return model(ids, targets=targets)[0]


def with_random_adapters(model, seed=1):
    """B drawn too (it starts at 0), so the adapters change the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_adapters_with_b_zero_give_exactly_the_base_model(tiny_policy):
    path, tokenizer = tiny_policy
    base, adapted = D.load_model(path, ONE), D.load_model(path, ONE, adapters=ADAPTERS)
    ids, targets = rows(tokenizer)
    assert torch.equal(logprobs(adapted, ids, targets), logprobs(base, ids, targets))
    names = [n for n, _ in adapted.named_parameters() if lora.is_adapter(n)]
    assert len(names) == 2 * 7 * 2, "A and B on the 7 projections of both blocks"
    assert all(p.requires_grad == lora.is_adapter(n) for n, p in adapted.named_parameters())


def test_a_target_that_names_no_module_is_refused():
    with pytest.raises(ValueError, match="--lora_targets 'q_proj,q_prj': names q_prj: the block projections"):
        grpo.check_config(GRPOConfig(lora_rank=4, lora_targets="q_proj,q_prj"), 1)
    with pytest.raises(ValueError, match="--lora_rank -1: must be >= 0"):
        grpo.check_config(GRPOConfig(lora_rank=-1), 1)
    with pytest.raises(ValueError, match="--lora_rank 4: does not combine with --offload_states"):
        grpo.check_config(GRPOConfig(lora_rank=4, offload_states=True), 1)
    with pytest.raises(ValueError, match="no such module in the model's blocks"):
        lora.add_adapters(on_meta(load_config(ROOT / "demo" / "sft")),
                          lora.LoRAConfig(4, 8.0, ("lm_head",)))


def test_gradients_reach_only_the_adapters_and_the_reference_is_the_base(tiny_policy):
    path, tokenizer = tiny_policy
    base = D.load_model(path, ONE)
    model = with_random_adapters(D.load_model(path, ONE, adapters=ADAPTERS))
    ids, targets = rows(tokenizer)
    with lora.adapters_off(model):
        assert torch.equal(logprobs(model, ids, targets), logprobs(base, ids, targets))
    assert not torch.equal(logprobs(model, ids, targets), logprobs(base, ids, targets))
    logprobs(model, ids, targets).sum().backward()
    for name, p in model.named_parameters():
        if lora.is_adapter(name):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert [id(p) for g in D.adamw(model, ONE).param_groups for p in g["params"]] == \
        [id(p) for n, p in model.named_parameters() if lora.is_adapter(n)], "AdamW holds the adapters alone"


def test_merged_weights_equal_the_unmerged_adapters(tiny_policy):
    path, tokenizer = tiny_policy
    model = with_random_adapters(D.load_model(path, ONE, adapters=ADAPTERS))
    merged = on_meta(model.config).materialize("cpu")
    merged.load_state_dict(lora.merged_state_dict(model.state_dict(), model))
    ids, targets = rows(tokenizer)
    ours, theirs = logprobs(model, ids, targets), logprobs(merged, ids, targets)
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=0,
                               msg=lambda m: f"merged vs unmerged, max {(theirs - ours).abs().max():.2e}: {m}")


def test_the_reference_log_probs_of_a_step_are_the_base_models(tiny_policy):
    path, tokenizer = tiny_policy
    cfg = GRPOConfig(model=path, kl_coef=1e-3, lora_rank=4, bf16=False, temperature=1.0)
    model = with_random_adapters(D.load_model(path, ONE, adapters=lora.of(cfg)))
    base = D.load_model(path, ONE)
    row = passes.pack_rows([passes.Trace(list(range(5, 25)), 8, 1.0, [0.0] * 12)], 64)[0]
    passes.old_and_ref_logprobs(model, None, [row], cfg, ONE)
    expected = passes.forward_logprobs(base, row, 1.0)[0]
    assert torch.equal(row.ref_logprobs, expected)
    assert not torch.equal(row.old_logprobs, expected)


# ---- under torchrun: the rollout's merged weights, 2 ranks vs 1, a resumed run, the exports ----

def run_worker(model_dir, out, nproc=1, **overrides):
    from test_grpo_run import run_worker as worker
    return worker(model_dir, out, steps=2, lr=3e-3, nproc=nproc, lora_rank=4, **overrides)


def test_lora_on_two_ranks_and_through_a_tensor_parallel_rollout_takes_the_steps_of_one_process(tiny_policy, tmp_path):
    # 1 process decodes with the adapters unmerged; 2 ranks through FSDP2's gathered weights with
    # them merged in place; rollout_tp 2 through a TP copy with them merged matrix by matrix. The
    # adapters move at step 1 (B leaves 0), so step 2's rollout and reference differ from the base.
    path = tiny_policy[0]
    one = run_worker(path, tmp_path / "one.json")
    two = run_worker(path, tmp_path / "two.json", nproc=2)
    tp = run_worker(path, tmp_path / "tp.json", nproc=2, rollout_tp=2)
    assert one["history"][1]["kl"] > 0, "step 2's policy is not the reference: the adapters moved"
    for other in (two, tp):
        for key in ("reward", "response_len", "loss", "kl", "entropy", "grad_norm", "rollout_logprob_diff_max"):
            for step, (a, b) in enumerate(zip(one["history"], other["history"])):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), f"{key} at step {step}"
        assert other["checksum"] == pytest.approx(one["checksum"], rel=1e-6)


def test_a_lora_run_resumes_bit_equal_and_its_exports_load_in_transformers_and_peft(tiny_policy, tmp_path):
    import shutil
    import torch.distributed.checkpoint as dcp
    import data
    import demo as demo_task
    path = str(shutil.copytree(tiny_policy[0], tmp_path / "base"))  # its weights are rewritten below
    records = data.write_records(tmp_path / "rlvr.jsonl", demo_task.rlvr_records(24, seed=0))
    args = ["grpo.py", "--model", path, "--data", str(records), "--rollout_batch_size", "8", "--mini_batch_size", "4",
            "--n_samples", "2", "--max_response_len", "8", "--micro_batch_tokens", "512", "--no-bf16",
            "--no-activation_checkpointing", "--lr", "3e-3", "--rollout_slots", "16", "--lora_rank", "4",
            "--lora_targets", "q_proj,v_proj,down_proj", "--kl_coef", "0.01", "--entropy_coef", "0.01"]

    def grpo(out, *extra, ok=True):
        res = subprocess.run([sys.executable, *args, "--out", str(out), *extra], cwd=ROOT, capture_output=True,
                             text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert (res.returncode == 0) == ok, res.stderr[-3000:]
        return res.stderr

    grpo(tmp_path / "full")
    grpo(tmp_path / "cut", "--max_steps", "2")
    grpo(tmp_path / "cut", "--resume")
    files = ("model.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json")
    for name in files:
        assert (tmp_path / "full" / "hf" / name).read_bytes() == (tmp_path / "cut" / "hf" / name).read_bytes(), name
    # a checkpoint holds the adapters (and their AdamW state), not the frozen base
    saved = dcp.FileSystemReader(str(tmp_path / "full" / "step_00000003")).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all(lora.is_adapter(k) for k in model_keys), model_keys[:4]
    assert len(model_keys) == 2 * 3 * 2, "A and B of 3 projections in 2 blocks"
    # export.py makes the same directory from that checkpoint
    import export
    export.export(str(tmp_path / "full" / "step_00000003"), str(tmp_path / "exported"))
    for name in files:
        assert (tmp_path / "exported" / name).read_bytes() == (tmp_path / "full" / "hf" / name).read_bytes(), name

    peft = pytest.importorskip("peft", reason="peft is a test-only dependency (requirements.txt)")
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[5, 17, 33, 8, 41, 12, 7, 19]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "hf", dtype=torch.float32)
    adapter = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                             tmp_path / "full" / "hf" / "adapter")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ours = D.load_model(path, ONE, adapters=lora.LoRAConfig(4, 8.0, ("q_proj", "v_proj", "down_proj")))
    state = load_file(tmp_path / "full" / "hf" / "adapter" / "adapter_model.safetensors")
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if lora.is_adapter(name):
                kind = name.rsplit(".", 1)[1]
                p.copy_(state[f"base_model.model.model.{name.removesuffix('.' + kind)}.{kind}.weight"])
    with torch.no_grad():
        by_merged, by_peft, by_base, by_ours = (m(ids).logits if m is not ours else m(ids)
                                                for m in (merged, adapter, base, ours))
    torch.testing.assert_close(by_peft, by_merged, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_ours, by_merged, atol=1e-5, rtol=0)
    assert (by_peft - by_base).abs().max() > 1e-4, "the adapter changed the model"
    config = json.loads((tmp_path / "full" / "hf" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["base_model_name_or_path"] == path

    # other weights at --model (an SFT run written there again): the adapters are not theirs
    weights = load_file(Path(path) / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    from safetensors.torch import save_file
    save_file(weights, Path(path) / "model.safetensors", metadata={"format": "pt"})
    said = grpo(tmp_path / "cut", "--resume", "--resume_step", "2", ok=False)
    assert "holds other weights than the base this LoRA run's adapters were trained on" in said, said[-2000:]
    with pytest.raises(ValueError, match="its adapters were trained on another base than"):
        export.export(str(tmp_path / "full" / "step_00000003"), str(tmp_path / "exported2"))


def test_sft_with_lora_on_two_ranks_trains_the_adapters_alone_as_one_process_does(tiny_policy, tmp_path):
    import data
    import demo as demo_task
    path = tiny_policy[0]
    records = tmp_path / "sft.jsonl"
    data.write_records(records, demo_task.sft_records(12, seed=0))
    args = ["sft.py", "--model", path, "--data", str(records), "--batch_size", "4", "--max_len", "1024", "--lr", "1e-2",
            "--no-bf16", "--no-activation_checkpointing", "--lora_rank", "4", "--lora_targets", "q_proj,up_proj"]

    def sft(out, nproc):
        launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
        res = subprocess.run(launch + args + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]

    one, two = sft(tmp_path / "one", 1), sft(tmp_path / "two", 2)
    assert len(one) == 3 and two == pytest.approx(one, rel=1e-5) and one[-1] < one[0]
    base, merged = load_file(Path(path) / "model.safetensors"), load_file(tmp_path / "two" / "hf" / "model.safetensors")
    assert base.keys() == merged.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "mlp.up_proj")}
    assert (tmp_path / "two" / "hf" / "adapter" / "adapter_model.safetensors").exists()
