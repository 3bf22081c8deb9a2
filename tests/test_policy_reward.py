"""grpo.py training a policy with a judge's reward (--reward judge): resumed bit-equal after a kill,
2 ranks against 1, --judge_url against the judge in process reward for reward, bad settings and
records refused before any model is read, a reward server that stops answering."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import demo
import grpo
import serve
import tokenization
from checkpoint import load_pretrained
from cli import parse_config
from demo.loop import prompt_records
from judge import Judge
from rewards import InProcessJudge, RemoteJudge
from rollout import SamplingParams, generate

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
JUDGE_TOKENS = 160  # the demo judge's whole judgments: verdicts, so rewards that vary


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["context_messages"][0]["content"]}) + "\n"
                            for r in prompt_records(24, seed=0)))
    return path


def grpo_run(tiny_policy, prompts, out, *flags, nproc=1, wait=True):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={nproc}"]
    argv = launcher + ["grpo.py", "--model", tiny_policy[0], "--data", str(prompts), "--out", str(out),
                       "--reward", "judge", "--judge", demo.SHIPPED, "--judge_max_new_tokens", str(JUDGE_TOKENS),
                       "--rollout_batch_size", "8", "--mini_batch_size", "4", "--n_samples", "3",
                       "--max_response_len", "12", "--micro_batch_tokens", "512", "--no-bf16",
                       "--no-activation_checkpointing", "--lr", "1e-3", "--rollout_slots", "32", *flags]
    if not wait:
        return subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


def history(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_a_policy_run_with_a_judge_reward_resumes_bit_equal_after_a_kill(tiny_policy, prompts, tmp_path):
    whole = grpo_run(tiny_policy, prompts, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    steps = history(tmp_path / "whole")
    assert len(steps) == 3 and all(s["judge_calls_per_response"] == 2.0 for s in steps)  # round robin, n = 3
    assert all(k in steps[0] for k in ("time_judge", "time_generate", "time_update", "invalid_verdicts",
                                       "position_consistency"))
    killed = grpo_run(tiny_policy, prompts, tmp_path / "killed", "--save_every", "1", wait=False)
    checkpoint = tmp_path / "killed" / "step_00000001" / "trainer_state.json"
    while not checkpoint.exists() and killed.poll() is None:
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = grpo_run(tiny_policy, prompts, tmp_path / "killed", "--save_every", "1", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (load_file(tmp_path / run / "hf" / "model.safetensors") for run in ("whole", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's weights differ"
    assert [s["reward"] for s in history(tmp_path / "killed")] == [s["reward"] for s in steps]


def test_two_ranks_equal_one_process_with_a_judge_reward(tiny_policy, prompts, tmp_path):
    runs = []
    for nproc in (1, 2):
        res = grpo_run(tiny_policy, prompts, tmp_path / str(nproc), "--max_steps", "2", nproc=nproc)
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(history(tmp_path / str(nproc)))
    for one, two in zip(*runs):
        for key in ("reward", "reward_group_std", "invalid_verdicts", "loss", "grad_norm", "entropy"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_a_reward_server_gives_the_judge_in_process_rewards_reward_for_reward(tiny_policy):
    path, tokenizer = tiny_policy
    policy = load_pretrained(path).eval()
    records = prompt_records(4, seed=1)
    ids = [tokenization.encode_prompt(tokenizer, r["context_messages"], 4096) for r in records]
    completions = generate(policy, ids, SamplingParams(temperature=1.0, max_new_tokens=10, n=3, seed=4,
                                                       stop_token_ids=(tokenizer.eos_token_id,)))
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    cfg = grpo.GRPOConfig(n_samples=3, judge_retries=0)
    judge = Judge.load(demo.SHIPPED, max_new_tokens=JUDGE_TOKENS, gather=True)
    server = serve.RewardServer(Judge.load(demo.SHIPPED, max_new_tokens=JUDGE_TOKENS),
                                serve.ServeConfig(port=0, group_size=3, max_new_tokens=JUDGE_TOKENS))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote = RemoteJudge(url, tokenizer, cfg)(completions, texts, records)
        local = InProcessJudge(judge, cfg)(completions, texts, records)
    finally:
        server.drain()
        server.server_close()
    assert remote.tolist() == local.tolist()
    assert len({round(r, 6) for r in local.tolist()}) > 1, "rewards that vary, so the comparison can fail"


@pytest.mark.parametrize("flags, match", [
    (["--reward", "judge"], r"--reward 'judge': judge needs the judge: --judge DIR .* or --judge_url"),
    (["--judge", "x"], r"--judge 'x': is the reward of --reward judge"),
    (["--reward", "judge", "--judge", "x", "--judge_url", "http://y"], r"one of them"),
    (["--reward", "judge", "--judge_url", "http://y", "--eval_data", "e.jsonl"], r"--eval_data .*demo/loop.py"),
])
def test_judge_settings_are_checked_by_flag(flags, match):
    cfg, _ = parse_config(grpo.GRPOConfig, flags)
    with pytest.raises(ValueError, match=match):
        grpo.check_config(cfg, world_size=1)


def test_a_judge_directory_and_prompt_records_are_checked_before_any_model_is_read(tiny_policy, prompts, tmp_path):
    import shutil
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(demo.SHIPPED) / name, no_tokenizer / name)
    no_config = tmp_path / "no-config"
    shutil.copytree(demo.SHIPPED, no_config)
    (no_config / "config.json").unlink()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "What is 1 + 1?"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    plain = prompts
    cases = [(["--judge", str(no_tokenizer)], "no tokenizer files"),
             (["--judge", str(no_config)], "no config.json"),
             (["--judge", demo.SHIPPED, "--data", str(bad)], r"bad.jsonl:2: a prompt record needs 'prompt'"),
             (["--judge", demo.SHIPPED, "--judge_method", "reference", "--data", str(plain)],
              r"prompts.jsonl:1: --judge_method reference needs a 'reference' answer")]
    for flags, match in cases:
        argv = ["--model", tiny_policy[0], "--data", str(plain), "--reward", "judge", "--out", str(tmp_path / "o"),
                "--rollout_batch_size", "8", "--mini_batch_size", "4", *flags]
        with pytest.raises(ValueError, match=match):
            grpo.main(argv)
        assert not (tmp_path / "o").exists(), "refused before the run directory is made"


def test_a_reward_server_that_does_not_answer_stops_the_run_with_a_checkpoint(tiny_policy, prompts, tmp_path):
    with socket_on_a_free_port() as port:  # nothing listens there
        res = grpo_run(tiny_policy, prompts, tmp_path / "o", "--judge", "", "--judge_url",
                       f"http://127.0.0.1:{port}", "--judge_retries", "1")
    assert res.returncode == 1, res.stderr[-3000:]
    assert f"127.0.0.1:{port}" in res.stderr and "after 2 tries" in res.stderr and "--resume" in res.stderr
    assert (tmp_path / "o" / "step_00000000" / "trainer_state.json").exists()
    metrics = tmp_path / "o" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip(), "no step was taken"


class socket_on_a_free_port:
    """A port nothing listens on (bound and closed: connections to it are refused)."""

    def __enter__(self):
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *exc):
        return False


def test_the_judge_reward_walks_in_the_memory_plan(tmp_path):
    res = subprocess.run([sys.executable, "grpo.py", "--plan", "--model", demo.SHIPPED, "--reward", "judge",
                          "--judge", demo.SHIPPED, "--rollout_batch_size", "8", "--mini_batch_size", "8",
                          "--judge_max_new_tokens", "160", "--no-plan_alternatives"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "load: policy shards, bf16 reference, AdamW state, the judge" in res.stdout
    assert "judge: KV pool, 42 judge prompts a group" in res.stdout, res.stdout
    served = subprocess.run([sys.executable, "grpo.py", "--plan", "--model", demo.SHIPPED, "--reward", "judge",
                             "--judge_url", "http://judge:5000", "--rollout_batch_size", "8", "--mini_batch_size", "8",
                             "--no-plan_alternatives"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert served.returncode == 0, served.stdout + served.stderr[-3000:]
    assert "the judge" not in served.stdout and "judge: KV pool" not in served.stdout  # its memory is elsewhere


def test_a_tp_group_judges_when_one_rank_has_nothing_short_enough(tmp_path):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          str(ROOT / "tests" / "judge_tp_worker.py"), str(tmp_path)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    # rank 1's pairs are all over max_prompt_len, and said so: round robin's 3, knockout's 2 matches
    assert [f["too_long"] for f in json.loads((tmp_path / "rank_0.json").read_text())] == [0, 0]
    assert [f["too_long"] for f in json.loads((tmp_path / "rank_1.json").read_text())] == [3, 2]


class Scripted(BaseHTTPRequestHandler):
    """A reward server that answers as the test says: seen[] gets each request's headers and body."""
    answers, seen = [], []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Scripted.seen.append((dict(self.headers), body))
        status, payload = Scripted.answers.pop(0) if Scripted.answers else (200, None)
        if payload is None:  # the right answer: a reward per query
            payload = {"rewards": [0.5] * len(body["query"]), "extra_logs": {"too_long": [0.0] * len(body["query"])}}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data) + (10 if status == 299 else 0)))  # 299: cut off mid-answer
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("answers, tries, said", [
    ([(200, {"rewards": [1.0]})] * 2, 2, "answered 1 rewards for 3 queries"),   # wrong twice: given up
    ([(200, b'{"rewards": [1.0, NaN, 0.0]}')] * 2, 2, "not all finite"),
    ([(200, {"rewards": [True, 1.0, 0.0]})] * 2, 2, "not all finite"),
    ([(299, {"rewards": [1.0, 1.0, 0.0]})] * 2, 2, "IncompleteRead"),
    ([(299, {"rewards": [1.0, 1.0, 0.0]}), (200, None)], 2, None),     # cut off, then answered
    ([(413, {"error": "too big"})], 1, "answered 413"),               # refused: not tried again
    ([(503, {"error": "busy"}), (200, None)], 2, None),                # busy, then answered
])
def test_a_reward_server_answer_counts_only_when_whole(answers, tries, said, monkeypatch):
    monkeypatch.setenv("RM_R1_API_KEY", "k3y")
    monkeypatch.setattr(time, "sleep", lambda s: None)
    Scripted.answers, Scripted.seen = list(answers), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = RemoteJudge(f"http://127.0.0.1:{server.server_address[1]}", None, grpo.GRPOConfig(judge_retries=1))
        answer, error = judge.post({"query": ["a", "b", "c"], "prompts": ["p", "p", "p"]})
    finally:
        server.shutdown()
        server.server_close()
    assert len(Scripted.seen) == tries and all(h["Authorization"] == "Bearer k3y" for h, _ in Scripted.seen)
    if said is None:
        assert error is None and answer["rewards"] == [0.5] * 3
    else:
        assert answer is None and said in error, error


@pytest.mark.parametrize("record, said", [
    ({"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}, "not both"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, r"'messages'\[1\] has role 'user'"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, r"'messages'\[0\] has role"),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "b"}]}, r"'messages'\[0\] has role 'system'"),
    ({"messages": [{"role": "user", "content": " "}]}, r"'messages'\[0\] has no content"),
    ({"prompt": "Hi", "reference": ""}, "field 'reference' is empty"),
])
def test_prompt_records_are_checked_as_the_judge_will_read_them(record, said, tmp_path):
    import data
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"p.jsonl:2: .*{said}"):
        data.load_prompts(str(path))
