"""sft.py: the loss, packing, 2 ranks vs 1, kill-and-resume, and the HF export."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokenization
import demo
from model import ModelConfig, Transformer
from sft import sft_loss

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--demo_examples", "24", "--batch_size", "8", "--epochs", "1", "--max_len", "400",
            "--demo_layers", "2", "--demo_hidden", "32", "--lr", "3e-3", "--warmup_steps", "0",
            "--demo_copy_steps", "1", "--demo_rounds", "1"]  # 1 copying step, then 3 distillation steps


def run(args, nproc=1, env=None):
    # The demo's default export is the shipped demo/sft: tests must never write there.
    args = args + ["--export", args[args.index("--out") + 1] + "/hf"]
    cmd = [sys.executable, "sft.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "sft.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    out = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(Path(run_dir) / "metrics.jsonl")]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo.build_demo_tokenizer(str(tmp_path_factory.mktemp("tok")), n=400)


def test_loss_mask_covers_exactly_the_trace_and_its_end(tokenizer):
    record = demo.sft_records(1, seed=3)[0]
    ids, mask = tokenization.encode_sft(tokenizer, record["context_messages"], record["trace"], 4096)
    trained = [t for t, m in zip(ids, mask) if m]
    assert tokenizer.decode(trained) == record["trace"] + "<|im_end|>"


def test_packed_and_unpacked_batches_give_the_same_loss(tokenizer):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    examples = [tokenization.encode_sft(tokenizer, r["context_messages"], r["trace"], 4096)
                for r in demo.sft_records(3, seed=1)]
    n_tokens = sum(sum(m[1:]) for _, m in examples)
    packed = tokenization.pack(examples, max_len=4096)
    assert len(packed) == 1
    loss_packed, _ = sft_loss(model, packed[0], n_tokens, "cpu")
    separate = sum(sft_loss(model, tokenization.pack([ex], 4096)[0], n_tokens, "cpu")[0] for ex in examples)
    torch.testing.assert_close(loss_packed, separate, atol=1e-5, rtol=1e-5)
    # the token-mean normalizer: equal to the plain mean NLL over every trace token
    nll = []
    for ids, mask in examples:
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])), -1)[0]
        nll += [-logp[t, ids[t + 1]] for t in range(len(ids) - 1) if mask[t + 1]]
    torch.testing.assert_close(loss_packed, torch.stack(nll).mean(), atol=1e-5, rtol=1e-5)


def test_two_ranks_give_the_same_losses_as_one(tmp_path):
    run(TINY_RUN + ["--out", str(tmp_path / "one")])
    run(TINY_RUN + ["--out", str(tmp_path / "two")], nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=1e-5, rtol=1e-5,
                               msg=f"1 rank {one} vs 2 ranks {two}")


def test_stop_and_resume_gives_the_same_losses(tmp_path):
    run(TINY_RUN + ["--out", str(tmp_path / "full")])
    run(TINY_RUN + ["--out", str(tmp_path / "cut"), "--max_steps", "2"])
    assert (tmp_path / "cut" / "latest").read_text() == "step_00000002"
    assert not (tmp_path / "cut" / "hf").exists()
    run(TINY_RUN + ["--out", str(tmp_path / "cut"), "--resume"])
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert cut[:2] == full[:2] and len(cut) == 4
    assert cut[2:] == pytest.approx(full[2:], rel=1e-6, abs=1e-7)


def test_hf_export_loads_in_transformers_with_identical_logits(tmp_path):
    import transformers
    from checkpoint import load_pretrained
    run(TINY_RUN + ["--out", str(tmp_path)])
    ours = load_pretrained(tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tok("<type>Reasoning</type> 12 + 7 = 19")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)


def test_demo_rounds_continue_the_last_export_on_fresh_traces_at_half_the_lr():
    from demo.recipe import Judge, rounds
    from sft import SFTConfig
    one = SFTConfig(out="o")
    assert [(r.cfg, r.examples, r.copy_steps) for r in rounds(one, Judge(rounds=1, examples=9, copy_steps=3))] \
        == [(one, 9, 3)]
    r1, r2, r3 = rounds(SFTConfig(out="o", export="e", lr=2e-3, seed=5, epochs=4),
                        Judge(rounds=3, examples=10, copy_steps=7))
    assert (r1.cfg.out, r1.cfg.export, r1.cfg.model, r1.cfg.lr, r1.cfg.seed, r1.examples, r1.copy_steps, r1.cfg.epochs) \
        == ("o/round1", "o/round1/hf", "", 2e-3, 5, 10, 7, 4)
    assert (r2.cfg.out, r2.cfg.model, r2.cfg.lr, r2.cfg.seed, r2.examples, r2.copy_steps, r2.cfg.epochs) \
        == ("o/round2", "o/round1/hf", 1e-3, 6, 40, 0, 1)
    assert (r3.cfg.model, r3.cfg.lr, r3.cfg.seed, r3.examples, r3.cfg.export) == ("o/round2/hf", 5e-4, 7, 160, "e")
    with pytest.raises(ValueError, match="--demo_rounds"):
        rounds(SFTConfig(), Judge(rounds=0))


def test_second_round_starts_from_the_first_rounds_export(tmp_path):
    # round 2's first logged loss is the round-1 export's loss on round 2's first batch
    from checkpoint import load_pretrained
    from sft import SFTConfig, epochs, load_examples
    run(TINY_RUN + ["--demo_rounds", "2", "--out", str(tmp_path)])  # the later flag wins
    r1, r2 = losses(tmp_path / "round1"), losses(tmp_path / "round2")
    assert len(r1) == 4 and len(r2) == 12  # 24 traces in batches of 8, then 96 fresh ones
    assert (tmp_path / "hf" / "model.safetensors").exists()
    cfg = SFTConfig(model=str(tmp_path / "round1" / "hf"), seed=1, batch_size=8, max_len=400)
    tok = tokenization.load_tokenizer(cfg.model)
    rows = epochs(load_examples(cfg, tok, lambda: demo.sft_records(96, seed=1)), cfg).rows(0)
    n_tokens = sum(sum(r["loss_mask"][1:]) for r in rows)
    model = load_pretrained(cfg.model)
    with torch.no_grad():
        first = sum(float(sft_loss(model, row, n_tokens, "cpu")[0]) for row in rows)
    assert r2[0] == pytest.approx(first, rel=1e-5)
    assert r2[0] < r1[0]


def test_copy_steps_are_for_the_demo_judge_from_scratch_only():
    import sft
    with pytest.raises(ValueError, match="--demo_copy_steps is a setting of the demo judge"):
        sft.main(["--model", "some/checkpoint", "--demo_copy_steps", "10"])
    with pytest.raises(ValueError, match="--model names the model to fine-tune"):
        sft.train(sft.SFTConfig())


def test_lr_schedule_restarts_for_distillation_after_the_copying_steps():
    from demo.recipe import copying_first
    from sft import SFTConfig, epochs
    one_step_each = [([1, 2, 3], [0, 1, 1])]
    distil = epochs(one_step_each * 20, SFTConfig(schedule="cosine", warmup_steps=4, batch_size=1))  # 20 steps
    f = copying_first(10, batch_size=8, seed=0, warmup=4)(distil, tokenizer=None).lr
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]      # copying: warmup
    assert [f(s) for s in range(4, 10)] == [1.0] * 6                 # then constant
    assert [f(s) for s in range(10, 14)] == [0.25, 0.5, 0.75, 1.0]  # distillation: warmup again
    assert f(14) == 1.0 and f(30) == pytest.approx(0.0)              # cosine over its 16 steps
    assert f(22) == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))
    plain = epochs(one_step_each * 5, SFTConfig(schedule="constant", warmup_steps=2, batch_size=1)).lr
    assert [plain(s) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
