"""What a run does when something goes wrong: non-finite losses, resumes with other settings,
kills during a save, a full disk, bad input, prompts that would be dropped silently."""

import errno
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import data
import demo
import distributed as D
import run
import grpo
import sft
from cli import parse_config
from data import step_prompts
from grpo import GRPOConfig
from conftest import loss_row
from objective import policy_loss
import checkpoint
from checkpoint import save_pretrained
from model import ModelConfig, Transformer
from sft import SFTConfig

CPU = D.Context(rank=0, world_size=1, device=torch.device("cpu"))  # a plain process

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1)


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(TINY)


# ---- non-finite values never reach the weights, a checkpoint or an export ----

def test_a_non_finite_gradient_stops_before_the_optimizer_step():
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randint(0, 64, (1, 5))).sum().backward()
    model.lm_head.weight.grad[0, 0] = float("nan")  # a finite loss, a NaN gradient
    with pytest.raises(FloatingPointError, match="non-finite gradient norm"):
        D.clip_and_step(model, optimizer, 1.0, CPU)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "weights changed"
    assert all(p.grad is None for p in model.parameters())
    model(torch.randint(0, 64, (1, 5))).sum().backward()
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        D.clip_and_step(model, optimizer, 1.0, CPU, loss=torch.tensor(float("inf")))


def test_non_finite_weights_are_never_saved_or_exported(tmp_path):
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    with torch.no_grad():
        model.norm.weight[0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        run.save_state(str(tmp_path), 3, model, optimizer, {})
    with pytest.raises(FloatingPointError, match="non-finite"):
        D.save_hf(model, None, str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path)) == []


def test_the_stop_message_names_every_kept_checkpoint(tmp_path):
    assert "No checkpoint was saved yet" in str(run.non_finite_exit(1, "non-finite loss (nan)", str(tmp_path)))
    for step in (2, 4):
        (tmp_path / f"step_{step:08d}").mkdir()
        (tmp_path / f"step_{step:08d}" / "trainer_state.json").write_text("{}")
    (tmp_path / "latest").write_text("step_00000004")
    message = str(run.non_finite_exit(5, "non-finite loss (nan)", str(tmp_path)))
    assert "step 5: non-finite loss (nan)" in message and str(tmp_path / "step_00000004") in message
    assert "--resume --resume_step K (K one of [0, 2, 4]" in message


def test_the_non_finite_stop_advice_works_when_followed(tmp_path):
    # --lr 1e6 ruins the weights at step 1 (still finite: saved) and goes NaN at step 2. Resuming from
    # step 1 with a lower --lr fails again; the advice names step 0 too, and following it works.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    demo_sft = [sys.executable, "sft.py", "--demo_examples", "24", "--demo_layers", "2", "--demo_hidden", "32",
                "--demo_rounds", "1", "--demo_copy_steps", "0", "--batch_size", "8", "--warmup_steps", "0",
                "--epochs", "1", "--out", str(tmp_path / "d"), "--export", str(tmp_path / "d" / "hf"), "--save_every", "1"]
    res = subprocess.run(demo_sft + ["--lr", "1e6"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "step 2: non-finite" in res.stderr, res.stderr[-2000:]
    advice = re.search(r"--resume --resume_step K \(K one of \[([\d, ]+)\]", res.stderr)
    assert advice and advice.group(1) == "0, 1", res.stderr[-2000:]
    again = subprocess.run(demo_sft + ["--resume", "--lr", "1e-3"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 1 and "step 2: non-finite" in again.stderr, "step 1's weights are ruined"
    followed = subprocess.run(demo_sft + ["--resume", "--resume_step", "0", "--lr", "1e-3"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    assert followed.returncode == 0, followed.stderr[-2000:]
    assert (tmp_path / "d" / "hf" / "model.safetensors").exists()
    assert os.listdir(tmp_path / "d" / "abandoned") == ["step_00000001"], "the abandoned checkpoint is kept aside"
    steps = [json.loads(line)["step"] for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3], "one line per step, from the restart"
    bad = subprocess.run(demo_sft + ["--resume", "--resume_step", "7"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "--resume_step 7" in bad.stderr and "steps [1, 2, 3]" in bad.stderr


def test_policy_loss_is_finite_for_any_log_ratio():
    cfg = GRPOConfig()
    logp = torch.tensor([100.0, -100.0, 100.0])  # log-ratios of +-100: exp() overflows in fp32
    zeros, ones = torch.zeros(3), torch.ones(3)
    adv = torch.tensor([0.0, 1.0, -1.0])  # 0 * inf was NaN
    loss, _ = policy_loss(logp, zeros, loss_row(zeros, logp, adv, ones, torch.zeros(3, dtype=torch.long)), cfg, 3, 3)
    assert math.isfinite(float(loss))
    # clamped at +-20: token 2 (A = -1, ratio e^20) costs e^20, token 1 (A = 1, ratio e^-20) -(1 - 0.2)
    assert float(loss) == pytest.approx((0 - 0.8 + math.exp(20)) / 3, rel=1e-5)


# ---- every setting is checked, before any model or data is read, naming its flag ----

@pytest.mark.parametrize("argv, match", [
    (["--n_samples", "1"], "--n_samples 1: must be >= 2"),
    (["--n_samples", "0"], "--n_samples 0: must be >= 2"),
    (["--mini_batch_size", "0"], "--mini_batch_size 0: must be >= 1"),
    (["--rollout_batch_size", "0"], "--rollout_batch_size 0: must be >= 1"),
    (["--temperature", "0"], "--temperature 0.0: must be > 0"),
    (["--epochs", "0"], "--epochs 0: must be >= 1"),
    (["--max_steps", "-1"], "--max_steps -1: must be >= 0"),
    (["--clip_ratio_low", "1.5"], r"--clip_ratio_low 1.5: must be in \[0, 1\)"),
    (["--kl_coef", "-1"], "--kl_coef -1.0: must be >= 0"),
    (["--clip_ratio_c", "0.5"], "--clip_ratio_c 0.5: must be > 1"),
    (["--oversample", "2"], "--oversample 2: needs --filter_equal_groups"),
    (["--rollout_tp", "2"], "--rollout_tp 2: must be >= 1 and divide the 1 ranks: start grpo.py under torchrun"),
])
def test_grpo_settings_are_checked_by_flag(argv, match):
    cfg, _ = parse_config(GRPOConfig, argv)
    with pytest.raises(ValueError, match=match):
        grpo.check_config(cfg, world_size=1)


@pytest.mark.parametrize("argv, match", [
    (["--batch_size", "0"], "--batch_size 0: must be >= 1"),
    (["--epochs", "0"], "--epochs 0: must be >= 1"),
    (["--max_steps", "-1"], "--max_steps -1: must be >= 0"),
    (["--keep_last", "-1"], "--keep_last -1: must be >= 0"),
    (["--export_every", "-2"], "--export_every -2: must be >= 0"),
])
def test_sft_settings_are_checked_by_flag(argv, match):
    cfg, _ = parse_config(SFTConfig, argv)
    with pytest.raises(ValueError, match=match):
        sft.check_config(cfg)


@pytest.mark.parametrize("config, flag, value, allowed", [
    (GRPOConfig, "overlong", "cut", "keep, mask, penalty"),
    (GRPOConfig, "loss_agg", "seq-mean", "token-mean, seq-mean-token-mean"),
    (GRPOConfig, "kl_estimator", "k3", "k1, mse, low_var_kl"),
    (SFTConfig, "schedule", "linear", "constant, cosine"),
])
def test_a_setting_of_listed_values_is_refused_by_flag_and_in_python(config, flag, value, allowed, capsys):
    # the values are listed once, in the field's Literal type: the parser and check_fields read them there
    with pytest.raises(SystemExit):
        parse_config(config, [f"--{flag}", value])
    err = capsys.readouterr().err
    assert f"argument --{flag}: invalid choice: '{value}'" in err and all(v in err for v in allowed.split(", "))
    check = (lambda c: grpo.check_config(c, world_size=1)) if config is GRPOConfig else sft.check_config
    with pytest.raises(ValueError, match=f"--{flag} '{value}': must be one of {allowed}"):
        check(config(**{flag: value}))


def test_help_is_the_comment_beside_each_field(capsys):
    with pytest.raises(SystemExit):
        parse_config(GRPOConfig, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--kl_coef KL_COEF weight of the KL-to-reference loss term; 0 skips the ref model (default 0.001)" in text
    assert "--loss_agg {token-mean,seq-mean-token-mean}" in text


def test_flags_are_never_abbreviated(capsys):
    with pytest.raises(SystemExit):
        parse_config(GRPOConfig, ["--n_sample", "3"])
    assert "unrecognized arguments: --n_sample" in capsys.readouterr().err


def test_a_missing_model_directory_fails_at_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "grpo.py", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and f"{tmp_path / 'nope'}: no such model directory" in res.stderr
    assert not (tmp_path / "o").exists(), "the run directory was made before the settings were checked"


# ---- bad input speaks at once, naming the file ----

def test_bad_files_name_the_file_and_the_fix(tmp_path):
    cases = {"empty.jsonl": (b"", "holds no records"),
             "latin1.jsonl": ('{"a": "caf\u00e9"}\n'.encode("latin-1"), r"latin1.jsonl:1: not valid UTF-8"),
             "one.json": (b'{\n  "a": 1\n}\n', "holds one JSON dict; a .json file must hold a list")}
    for name, (content, match) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=match):
            data.read_records(tmp_path / name)


def test_a_data_file_holds_one_kind_of_record(tmp_path):
    rlvr = {"context_messages": [{"role": "user", "content": "judge"}], "winner": "model_a"}
    pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(rlvr) + "\n" + json.dumps(pair) + "\n")
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: a raw preference pairs record in a file that starts "
                                         r"with RLVR records"):
        grpo.load_records(str(path), GRPOConfig())


def test_pairs_with_identical_answers_are_dropped_and_counted():
    pairs = [{"prompt": "q", "chosen": "same", "rejected": " same "},
             {"prompt": "q", "chosen": "good", "rejected": "bad"}]
    records, identical = data.pairs_to_rlvr(pairs, seed=0)
    assert identical == 1 and len(records) == 1


# ---- no prompt dropped silently ----

def test_each_epochs_leftovers_open_the_next_epoch():
    cfg = GRPOConfig(rollout_batch_size=4, seed=3)
    steps = [step_prompts(10, step, cfg) for step in range(5)]  # 10 prompts x 2 epochs = 5 steps of 4
    assert sorted(steps[0] + steps[1] + steps[2][:2]) == list(range(10)), "epoch 1 uses every prompt once"
    assert sorted(steps[2][2:] + steps[3] + steps[4]) == list(range(10)), "so does epoch 2"
    assert steps == [step_prompts(10, step, cfg) for step in range(5)], "a pure function of (seed, step)"


# ---- the run directory: settings compared on resume, nothing mixed, nothing half-written ----

def run_config(**changes):
    return asdict(GRPOConfig(**changes))


def test_a_fresh_run_into_a_used_directory_is_refused(tmp_path):
    run.start_run(str(tmp_path), run_config(), resume=False)
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 1e-6
    with pytest.raises(ValueError, match="holds a run already: pass --resume"):
        run.start_run(str(tmp_path), run_config(), resume=False)


def test_resume_needs_a_checkpoint_and_the_same_settings(tmp_path, capsys):
    with pytest.raises(ValueError, match="--resume: .* has no checkpoint to continue from"):
        run.start_run(str(tmp_path / "typo"), run_config(), resume=True)
    run.start_run(str(tmp_path), run_config(), resume=False)
    (tmp_path / "latest").write_text("step_00000002")
    for change in ({"n_samples": 3}, {"data": "other.jsonl"}, {"seed": 1}, {"epochs": 3}):
        with pytest.raises(ValueError, match=f"--{next(iter(change))}: "):
            run.start_run(str(tmp_path), run_config(**change), resume=True)
    # what the non-finite stop advises (a lower --lr) is a change a resume may make, logged
    run.start_run(str(tmp_path), run_config(max_steps=5, save_every=2, eval_every=1, lr=5e-7), resume=True)
    out = capsys.readouterr().out
    assert "resume: --max_steps 0 -> 5" in out and "resume: --save_every 0 -> 2" in out
    assert "resume: --lr 1e-06 -> 5e-07" in out


def test_a_run_directory_moved_with_mv_resumes(tmp_path):
    run.start_run(str(tmp_path / "a"), run_config(out=str(tmp_path / "a")), resume=False)
    (tmp_path / "a" / "latest").write_text("step_00000002")
    os.replace(tmp_path / "a", tmp_path / "b")  # was: refused, "--out changed"
    run.start_run(str(tmp_path / "b"), run_config(out=str(tmp_path / "b")), resume=True)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["out"] == str(tmp_path / "b")


def test_resume_refuses_data_whose_contents_changed_unless_told(tmp_path, capsys):
    records = tmp_path / "rlvr.jsonl"
    data.write_records(records, demo.rlvr_records(4, seed=0))
    run_dir = str(tmp_path / "run")
    run.start_run(run_dir, run_config(data=str(records)), resume=False)
    (tmp_path / "run" / "latest").write_text("step_00000002")
    run.start_run(run_dir, run_config(data=str(records)), resume=True)  # the same bytes: fine
    data.write_records(records, demo.rlvr_records(4, seed=1))  # the same path, regenerated
    with pytest.raises(ValueError, match=r"--data_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'.*--resume_data_changed"):
        run.start_run(run_dir, run_config(data=str(records)), resume=True)
    run.start_run(run_dir, run_config(data=str(records), resume_data_changed=True), resume=True)
    run.start_run(run_dir, run_config(data=str(records)), resume=True)  # the new digest is the run's now


def test_a_checkpoint_renamed_in_before_latest_switched_is_adopted(tmp_path, capsys):
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    run.start_run(str(tmp_path), run_config(), resume=False)
    run.save_state(str(tmp_path), 3, model, optimizer, {})
    run.save_state(str(tmp_path), 4, model, optimizer, {})
    (tmp_path / "latest").write_text("step_00000003")  # killed after step 4's rename, before latest moved
    run.start_run(str(tmp_path), run_config(), resume=True)
    assert (tmp_path / "latest").read_text() == "step_00000004"  # was: one step behind for good
    assert "step_00000004 is complete but `latest` still named step_00000003" in capsys.readouterr().out


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs), where the machine lets this process mount one."""
    mount = tmp_path / "small"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.decode().strip()}); the faked test covers the logic")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_every_writer_says_a_full_disk_is_full_and_leaves_nothing_half_written(small_disk):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1))  # 2 MiB of embedding alone
    optimizer = torch.optim.AdamW(model.parameters())
    writers = {"save_state (grpo.py, sft.py)": lambda: run.save_state(str(small_disk), 1, model, optimizer, {}),
               "save_pretrained (export.py, the runs' hf/)": lambda: save_pretrained(model, small_disk / "hf"),
               "write_atomic": lambda: checkpoint.write_atomic(str(small_disk / "big.txt"), "x" * 2**21)}
    for name, write in writers.items():
        with pytest.raises(OSError, match=r"no space left to write .*: it needs about [\d.]+ MiB and its disk "
                                          r"has [\d.]+ MiB free") as e:
            write()
        assert e.value.errno == errno.ENOSPC, name
        assert os.listdir(small_disk) == [], f"{name} left {os.listdir(small_disk)}"


def fill(disk):
    """Write to `disk` until it has no byte left."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_appended_logs_and_the_demo_tokenizer_say_a_full_disk_is_full_and_keep_whole_lines(small_disk):
    # metrics.jsonl (both trainers) and samples.jsonl (eval.py) are appended to a line at a time,
    # through checkpoint.append_whole; sft.py's demo writes its tokenizer first. Was: a raw OSError.
    logger = run.MetricsLogger(str(small_disk), 2, {})
    logger.log(1, {"loss": 1.0})
    fill(small_disk)
    full = r"no space left to write .*: it needs about [\d.]+ MiB and its disk has [\d.]+ MiB free"
    with pytest.raises(OSError, match=full):  # a line longer than what is left of the file's last page
        logger.log(2, {f"metric_{i}": 0.5 for i in range(500)})
    lines = (small_disk / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1]  # no torn second line
    with pytest.raises(OSError, match=full):
        demo.build_tokenizer(str(small_disk / "tokenizer"), ["a judge's trace"] * 10)
    assert sorted(os.listdir(small_disk)) == ["filler", "metrics.jsonl"]


def test_start_removes_what_a_killed_save_left(tmp_path):
    (tmp_path / "step_00000004.tmp").mkdir()
    (tmp_path / "hf.old").mkdir()
    (tmp_path / "latest.tmp").write_text("x")
    (tmp_path / "latest").write_text("step_00000002")
    run.start_run(str(tmp_path), run_config(), resume=True)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "latest"]


def test_a_resumed_finished_run_keeps_its_checkpoint(tmp_path):
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    run.save_state(str(tmp_path), 4, model, optimizer, {})
    first = (tmp_path / "step_00000004" / ".metadata").stat().st_mtime_ns
    run.save_state(str(tmp_path), 4, model, optimizer, {})  # was: delete, then rename the new one in
    assert (tmp_path / "step_00000004" / ".metadata").stat().st_mtime_ns == first
    assert (tmp_path / "latest").read_text() == "step_00000004"


def test_an_export_left_half_renamed_by_a_kill_comes_back(tmp_path):
    model = tiny()
    save_pretrained(model, tmp_path / "hf")
    os.replace(tmp_path / "hf", tmp_path / "hf.old")  # killed between publish's two renames
    save_pretrained(model, tmp_path / "hf")  # was: "Directory not empty" on every later export
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_a_full_disk_says_so_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError("enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    monkeypatch.setattr(run.dcp, "save", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**10))
    model = tiny()
    with pytest.raises(OSError, match="no space left to write .*step_00000001.tmp") as e:
        run.save_state(str(tmp_path), 1, model, torch.optim.AdamW(model.parameters()), {})
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_a_resumed_run_drops_the_metrics_past_its_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)] + ['{"step": 4, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    logger = run.MetricsLogger(str(tmp_path), total_steps=5, config={}, start=2)
    logger.log(3, {"loss": 0.5})
    logger.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def grpo_on_demo_records(tiny_policy, tmp_path, n_records, *flags, timeout=600):
    """grpo.py on the tiny policy and n_records demo RLVR records, out in tmp_path/out."""
    records = tmp_path / "rlvr.jsonl"
    data.write_records(records, demo.rlvr_records(n_records, seed=0))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "grpo.py", "--model", tiny_policy[0], "--data", str(records),
                           "--out", str(tmp_path / "out"), "--rollout_batch_size", "8", "--mini_batch_size", "4",
                           "--max_response_len", "8", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_run_gone_nan_exits_non_zero_and_exports_nothing(tiny_policy, tmp_path):
    res = grpo_on_demo_records(tiny_policy, tmp_path, 24, "--n_samples", "2", "--micro_batch_tokens", "512",
                               "--no-bf16", "--no-activation_checkpointing", "--rollout_slots", "16",
                               "--lr", "1e6", "--save_every", "1")  # was: NaN from step 1, exported, exit 0
    assert res.returncode == 1, res.stderr[-2000:]
    assert "step 1: non-finite gradient norm (nan); stopped before the optimizer step" in res.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json"]  # no step was logged


@pytest.mark.parametrize("script", ["grpo.py", "sft.py"])
def test_data_without_a_model_is_refused_not_given_the_demo_preset(script, tmp_path):
    res = subprocess.run([sys.executable, script, "--data", str(tmp_path / "mine.jsonl"), "--out", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "--data" in res.stderr and "needs --model" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_micro_batch_tokens_that_cannot_hold_one_sequence_is_refused_at_start(tiny_policy, tmp_path):
    res = grpo_on_demo_records(tiny_policy, tmp_path, 8, "--micro_batch_tokens", "16",  # was: accepted, ran on
                               timeout=300)
    assert res.returncode != 0 and not (tmp_path / "out").exists(), res.stderr[-2000:]
    assert re.search(r"--micro_batch_tokens 16: a packed row must hold one prompt and its response, the longest "
                     r"prompt \(\d+ tokens\) \+ --max_response_len \(8\): raise it to at least \d+", res.stderr)


def gloo_threads():
    tasks = Path("/proc/self/task")
    return [t for t in tasks.iterdir() if "gloo" in (t / "comm").read_text()] if tasks.exists() else []


def test_an_entry_point_that_fails_still_ends_its_process_groups():
    # distributed.running: the groups end with the entry point however it ends (was: only on success,
    # leaving a failed run's gloo threads to abort the process at interpreter teardown)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    before = len(gloo_threads())
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    with pytest.raises(ValueError, match="a run that failed"):
        with D.running():
            mesh = init_device_mesh("cpu", (1,))  # held by this frame when the error leaves it
            D.all_reduce_sum(torch.ones(1), mesh.get_group())
            raise ValueError("a run that failed")
    assert not dist.is_initialized()
    assert len(gloo_threads()) == before
