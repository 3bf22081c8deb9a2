"""serve.py over real HTTP on 127.0.0.1: OpenRLHF's remote reward protocol (one sample per request, as
its client sends them), rewards equal to the judge's in process, concurrent clients, chat templates
read back, every bad input a 4xx naming the field and index, keys, caps, a window, a client that
leaves, and a clean stop on SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

import demo
import serve
from judge import Judge

ROOT = Path(__file__).resolve().parents[1]
CFG = serve.ServeConfig(port=0, group_size=3, window_s=20.0, max_new_tokens=32, max_prompt_len=1024)


@pytest.fixture(scope="module")
def judge():
    return Judge.load(demo.SHIPPED, max_new_tokens=CFG.max_new_tokens, max_prompt_len=CFG.max_prompt_len)


@pytest.fixture
def server(judge):
    servers = []

    def start(**settings):
        s = serve.RewardServer(judge, replace(CFG, **settings))
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
        return f"http://127.0.0.1:{s.server_address[1]}"
    yield start
    for s in servers:
        s.drain()
        s.server_close()


def post(url, body, headers=None, raw=None):
    """(status, JSON answer) of POST url/get_reward."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/get_reward", data=data, headers={"Content-Type": "application/json",
                                                                                **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


QUESTIONS = {"What is 2 + 3?": ["2 + 3 = 5", "2 + 3 = 6", "2 + 3 = 4"],
             "Say something about cats. Use exactly 3 words.": ["Cats are soft.", "Cats purr a lot.", "cats."]}


def chatml(question):
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def test_one_sample_per_request_from_eight_clients_equals_the_judge_in_process(server, judge):
    url = server()
    # 4 prompts of 3 responses each: 12 requests, 8 at a time
    queries = [(chatml(q + again), r) for again in ("", " Please.") for q, rs in QUESTIONS.items() for r in rs]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda qr: post(url, {"query": [qr[0] + qr[1] + "<|im_end|>"], "prompts": [qr[0]],
                                                      "labels": [None]}), queries))
    assert all(status == 200 for status, _ in answers), answers
    groups = {}
    for (prompt, response), (_, answer) in zip(queries, answers):
        groups.setdefault(prompt, []).append((response, answer))
    assert len(groups) == 4 and all(len(entries) == 3 for entries in groups.values())
    for prompt, entries in groups.items():
        question = prompt.split("\n")[1].removesuffix("<|im_end|>")
        (expected,) = judge.rewards([(question, [r for r, _ in entries])])
        assert [a["rewards"][0] for _, a in entries] == expected.rewards, question
        assert [a["scores"][0] for _, a in entries] == [(r + 1) / 2 for r in expected.rewards]
        assert all(a["extra_logs"]["group_complete"] == [1.0] and a["extra_logs"]["group_size"] == [3.0]
                   for _, a in entries)


def test_a_group_that_does_not_fill_is_ranked_when_its_window_passes(server):
    url = server(window_s=0.5)
    start = time.monotonic()
    status, answer = post(url, {"query": [chatml("What is 2 + 3?") + "5", chatml("What is 2 + 3?") + "6"],
                                "prompts": [chatml("What is 2 + 3?")] * 2})
    assert status == 200 and time.monotonic() - start >= 0.5
    assert answer["extra_logs"]["group_complete"] == [0.0, 0.0] and answer["extra_logs"]["group_size"] == [2.0, 2.0]
    assert sum(answer["rewards"]) == pytest.approx(0) and all(-1 <= r <= 1 for r in answer["rewards"])  # zero-sum


def test_chat_templates_are_read_back_into_a_conversation():
    qwen = ("<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
            "<|im_start|>assistant\n")
    messages, ends = serve.conversation_of(qwen)
    assert messages == [{"role": "system", "content": "You are Qwen."}, {"role": "user", "content": "What is 2 + 3?"}]
    assert serve.response_of(qwen + "It is 5.<|im_end|>\n<|endoftext|>", qwen, ends) == "It is 5."
    llama = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n")
    messages, ends = serve.conversation_of(llama)
    assert messages == [{"role": "user", "content": "Hi there"}]
    assert serve.response_of(llama + "Hello!<|eot_id|>", llama, ends) == "Hello!"
    assert serve.conversation_of("Plain question?")[0] == "Plain question?"


@pytest.mark.parametrize("body, status, field, index", [
    (b"{not json", 400, None, None),
    ([1, 2], 400, None, None),
    ({"query": ["a"]}, 400, "prompts", None),
    ({"query": ["ab", "cd"], "prompts": ["a"]}, 400, "prompts", None),
    ({"query": ["ab"], "prompts": ["a"], "labels": ["x", "y"]}, 400, "labels", None),
    ({"query": ["ab", ""], "prompts": ["a", ""]}, 400, "query", 1),
    ({"query": ["ab", "cd"], "prompts": ["a", "x"]}, 400, "prompts", 1),
    ({"query": ["q" + "What is 2 + 3? " * 300 + "5"], "prompts": ["q" + "What is 2 + 3? " * 300]}, 400, "prompts", 0),
    ({"query": [], "prompts": []}, 400, "query", None),
])
def test_bad_input_is_a_4xx_naming_the_field_and_index(server, body, status, field, index):
    url = server(group_size=1)  # a lone query is ranked at once: no window to wait for
    got, answer = post(url, None, raw=body) if isinstance(body, bytes) else post(url, body)
    assert got == status and "error" in answer, answer
    assert answer.get("field") == field and answer.get("index") == index, answer
    # the server goes on answering
    assert post(url, {"query": ["What is 1 + 1?2"], "prompts": ["What is 1 + 1?"]})[0] == 200


def test_reference_needs_labels(server):
    url = server(method="reference", group_size=1)
    status, answer = post(url, {"query": ["What is 1 + 1?2"], "prompts": ["What is 1 + 1?"], "labels": [None]})
    assert status == 400 and answer["field"] == "labels" and answer["index"] == 0
    status, answer = post(url, {"query": ["What is 1 + 1?2"], "prompts": ["What is 1 + 1?"], "labels": ["2"]})
    assert status == 200 and answer["rewards"][0] in (-1.0, 0.0, 1.0)


def test_a_key_is_required_when_set_and_bodies_and_requests_are_capped(server):
    url = server(api_key="s3cret", max_body_mb=0.001, max_queries=2, group_size=1)
    body = {"query": ["What is 1 + 1?2"], "prompts": ["What is 1 + 1?"]}
    assert post(url, body)[0] == 401
    assert post(url, body, {"Authorization": "Bearer wrong"})[0] == 401
    assert post(url, body, {"Authorization": "Bearer s3cret"})[0] == 200
    status, answer = post(url, {"query": ["x" * 2000], "prompts": ["x"]}, {"Authorization": "Bearer s3cret"})
    assert status == 413 and "max_body_mb" in answer["error"]
    status, answer = post(url, {"query": ["ab"] * 3, "prompts": ["a"] * 3}, {"Authorization": "Bearer s3cret"})
    assert status == 413 and answer["field"] == "query"


def test_a_client_that_leaves_costs_only_its_own_work(server):
    url = server(window_s=0.3)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"query": ["What is 1 + 1?2"], "prompts": ["What is 1 + 1?"]}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    # gone before its answer; the next client is answered
    assert post(url, {"query": ["What is 2 + 2?4"], "prompts": ["What is 2 + 2?"]})[0] == 200


def test_sigterm_answers_what_is_in_flight_and_exits_0(tmp_path):
    proc = subprocess.Popen([sys.executable, "serve.py", "--port", "0", "--group_size", "4", "--window_s", "60",
                             "--max_new_tokens", "16"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        url = line.split(" on ")[1].split("/get_reward")[0]
        result = {}
        waiting = threading.Thread(target=lambda: result.update(answer=post(url, {
            "query": ["What is 1 + 1?2"], "prompts": ["What is 1 + 1?"]})))
        waiting.start()  # one response of a group of 4, its window a minute: it waits
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        waiting.join(timeout=120)
        assert result["answer"][0] == 200 and result["answer"][1]["extra_logs"]["group_complete"] == [0.0]
        assert proc.wait(timeout=60) == 0
        assert "every request in flight was answered" in proc.stdout.read()
    finally:
        proc.kill()


def test_a_group_closes_at_its_size_so_a_repeated_prompt_makes_two_groups(server):
    url = server(group_size=2)
    queries = ["What is 7 - 4?3", "What is 7 - 4?2", "What is 7 - 4?7 - 4 = 3", "What is 7 - 4?It is 11"]
    status, answer = post(url, {"query": queries, "prompts": ["What is 7 - 4?"] * 4})
    assert status == 200 and answer["extra_logs"]["group_size"] == [2.0] * 4, answer
    # each pair ranked alone: its two rewards are opposite (a share of one match), never a 4-way ranking
    assert answer["rewards"][0] == -answer["rewards"][1] and answer["rewards"][2] == -answer["rewards"][3]
