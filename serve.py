"""The judge as a reward server: OpenRLHF's remote reward protocol over HTTP, for a policy trained
elsewhere (OpenRLHF's --remote_rm_url, or any client that speaks it).

    python serve.py                                            # the shipped demo judge, 127.0.0.1:5000
    python serve.py --model runs/grpo7b/hf --group_size 8 --host 0.0.0.0 --api_key "$KEY"
    curl -s localhost:5000/get_reward -d '{"query": ["What is 2 + 3?5", "What is 2 + 3?6"],
                                           "prompts": ["What is 2 + 3?", "What is 2 + 3?"]}'

POST /get_reward with JSON {"query": [...], "prompts": [...], "labels": [...]}: query[i] is
prompts[i] followed by a response, as the policy's tokenizer decodes them with special tokens
kept (a chat template's markers are read back into a conversation: ChatML, Llama 3, or plain
text as it is); labels, optional, are reference answers (--method reference needs them). The
answer is {"rewards": [...], "scores": [...] (the rewards mapped to [0, 1]), "extra_logs": {...}}
with one entry per query, each extra_logs value a list per query as OpenRLHF logs them.

A reward compares responses to the same prompt (judge.Judge.rewards): the server holds each
prompt's responses until --group_size of them have come (OpenRLHF sends each sample in a request
of its own) or --window_s has passed since the first, then ranks what it has; extra_logs says
which (group_complete, group_size). Whatever groups are ready at once, from however many
clients, go to the judge's sampler together. GET /health answers {"status": "ok"}.

Safe by default: it listens on 127.0.0.1 unless --host says otherwise; with --api_key (or the
environment variable RM_R1_API_KEY) every request must carry "Authorization: Bearer <key>" (401
otherwise, compared in constant time); a body over --max_body_mb is refused unread (413), as is a
request of more than --max_queries queries. A malformed request is a 4xx JSON error naming the
field and the index, and never a made-up reward; a client that goes away costs only its own
work; SIGTERM or SIGINT stops taking requests (503), answers those in flight, and exits 0.
"""

import copy
import hmac
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

import tokenization
from cli import check_fields, parse_config
from data import Style
from judge import Judge, judge_figures, judged_context

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "sft")  # demo.SHIPPED, without the demo


@dataclass
class ServeConfig:
    model: str = SHIPPED              # the judge (HF dir); default: the shipped demo judge
    method: Literal["round_robin", "knockout", "reference"] = "round_robin"  # how a group's responses are ranked
    group_size: int = 7               # responses of a prompt ranked together (the trainer's samples per prompt)
    window_s: float = 30.0            # rank what a prompt has after this many seconds (under the client's timeout)
    host: str = "127.0.0.1"           # 0.0.0.0 listens on every interface: set --api_key then
    port: int = 5000                  # 0: any free port (printed)
    api_key: str = ""                 # required bearer token; empty: RM_R1_API_KEY if set, else none
    max_body_mb: float = 16.0         # larger request bodies are refused unread (413)
    max_queries: int = 4096           # larger requests are refused (413)
    style: Style = "instruct"         # the judge's prompt style
    samples: int = 1                  # sampled judgments per order; the verdict is their majority
    temperature: float = 0.0          # 0: greedy; samples > 1 need T > 0
    seed: int = 0                     # the sampling noise and the knockout brackets' coins
    max_new_tokens: int = 8192        # judgment length (the demo judge: 160)
    max_prompt_len: int = 4096        # a longer policy prompt is refused (400)
    batch_size: int = 64              # sequences the sampler decodes at once


# ---- reading the policy's strings ----

CHAT_TURNS = {  # a template's turns: (pattern of one turn, what ends a response)
    "chatml": (re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n?", re.S), ("<|im_end|>", "<|endoftext|>")),
    "llama3": (re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S),
               ("<|eot_id|>", "<|end_of_text|>")),
}
OPENERS = {"chatml": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n"}


def conversation_of(prompt: str) -> tuple[list[dict] | str, tuple[str, ...]]:
    """The conversation before the answer that a policy's prompt string holds, and the markers that
    may end its response: ChatML's or Llama 3's turns read back out of the template (the last,
    open assistant turn dropped), or plain text as it is (one user turn)."""
    for name, (turn, ends) in CHAT_TURNS.items():
        body = prompt.removeprefix("<|begin_of_text|>")
        if body.endswith(OPENERS[name]) and turn.match(body):
            messages = [{"role": role, "content": content} for role, content in turn.findall(body)]
            return messages, ends
    return prompt, ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


def response_of(query: str, prompt: str, ends) -> str:
    """What the policy wrote: the query after its prompt, end-of-turn markers dropped."""
    response = query[len(prompt):]
    changed = True
    while changed:
        changed = False
        for end in ends:
            if response.rstrip().endswith(end):
                response, changed = response.rstrip()[:-len(end)], True
    return response


class BadRequest(ValueError):
    def __init__(self, message, field="", index=None, status=400):
        super().__init__(message)
        self.field, self.index, self.status = field, index, status


def parse_request(body: dict, cfg: ServeConfig, tokenizer) -> list[tuple]:
    """A /get_reward body -> [(group key, context, response, reference)], or BadRequest naming the
    field and index of the first thing wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with 'query' and 'prompts'")
    for field in ("query", "prompts"):
        if not isinstance(body.get(field), list) or not all(isinstance(x, str) for x in body[field]):
            raise BadRequest(f"'{field}' must be a list of strings", field)
    queries, prompts = body["query"], body["prompts"]
    labels = body.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(x is None or isinstance(x, str) for x in labels)):
        raise BadRequest("'labels' must be a list of strings (or nulls)", "labels")
    labels = labels if labels is not None else [None] * len(queries)
    for field, values in (("prompts", prompts), ("labels", labels)):
        if len(values) != len(queries):
            raise BadRequest(f"'{field}' has {len(values)} entries and 'query' {len(queries)}: one per query", field)
    if not queries:
        raise BadRequest("'query' is empty", "query")
    if len(queries) > cfg.max_queries:
        raise BadRequest(f"{len(queries)} queries: at most --max_queries {cfg.max_queries} a request", "query",
                         status=413)
    items = []
    for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
        if not query:
            raise BadRequest("an empty query", "query", i)
        if not query.startswith(prompt):
            raise BadRequest("the prompt is not the start of its query (query = prompt + response)", "prompts", i)
        if cfg.method == "reference" and not label:
            raise BadRequest("--method reference needs each query's reference answer in 'labels'", "labels", i)
        context, ends = conversation_of(prompt)
        context = judged_context(context)
        length = len(tokenization.chat_ids(tokenizer, context, add_generation_prompt=False))
        if length > cfg.max_prompt_len:
            raise BadRequest(f"the prompt has {length} tokens, over --max_prompt_len {cfg.max_prompt_len}", "prompts", i)
        items.append(((prompt, label), context, response_of(query, prompt, ends), label))
    return items


# ---- groups, gathered across requests and ranked together ----

class Pending:
    """A prompt's responses waiting to be ranked: each with the slot its request waits on."""

    def __init__(self, context, reference):
        self.context, self.reference, self.first = context, reference, time.monotonic()
        self.responses, self.slots = [], []


class Slot:
    """One query's reward, filled by the ranking thread; its request's thread waits on `done`."""

    def __init__(self):
        self.done, self.reward, self.logs, self.error = threading.Event(), None, {}, None


class Batcher:
    """Holds each prompt's responses until its group is full or its window has passed, and ranks
    every ready group in one Judge.rewards call, on one thread that owns the judge."""

    def __init__(self, judge: Judge, cfg: ServeConfig):
        self.judge, self.cfg = judge, cfg
        self.pending: dict = {}   # prompt (and label) -> the group filling up
        self.full: list = []      # groups of --group_size, to be ranked
        self.closing = False
        self.wake = threading.Condition()
        self.thread = threading.Thread(target=self.loop, name="judge", daemon=True)
        self.thread.start()

    def submit(self, items) -> list[Slot]:
        """Each item's slot; None once close() has begun (the request is refused, not left hanging)."""
        slots = []
        with self.wake:
            if self.closing:
                return None
            for key, context, response, reference in items:
                group = self.pending.setdefault(key, Pending(context, reference))
                group.responses.append(response)
                group.slots.append(Slot())
                slots.append(group.slots[-1])
                if len(group.responses) >= self.cfg.group_size:  # full: the prompt's next response starts a group
                    self.full.append(self.pending.pop(key))
            self.wake.notify()
        return slots

    def close(self):
        """Rank what waits now, and stop after it."""
        with self.wake:
            self.closing = True
            self.wake.notify()
        self.thread.join()

    def ready(self) -> list:
        now, cfg = time.monotonic(), self.cfg
        keys = [k for k, g in self.pending.items() if self.closing or now - g.first >= cfg.window_s]
        full, self.full = self.full, []
        return full + [self.pending.pop(k) for k in keys]

    def loop(self):
        while True:
            with self.wake:
                groups = self.ready()
                while not groups and not self.closing:
                    soonest = min((g.first for g in self.pending.values()), default=None)
                    self.wake.wait(None if soonest is None else max(0.0, soonest + self.cfg.window_s - time.monotonic()))
                    groups = self.ready()
                if not groups and self.closing:
                    return
            self.rank(groups)

    def rank(self, groups):
        try:
            result = self.judge.rewards([(g.context, g.responses, *([g.reference] if g.reference else []))
                                         for g in groups], self.cfg.method)
        except Exception as e:  # the judge failed: every waiting request says so, none gets a made-up reward
            for g in groups:
                for slot in g.slots:
                    slot.error = f"the judge failed: {type(e).__name__}: {e}"
                    slot.done.set()
            return
        for g, rewards in zip(groups, result):
            figures = judge_figures([rewards])
            logs = {"group_size": float(len(g.responses)),
                    "group_complete": float(len(g.responses) >= self.cfg.group_size), **figures}
            for slot, reward in zip(g.slots, rewards.rewards):
                slot.reward, slot.logs = reward, logs
                slot.done.set()


# ---- HTTP ----

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # a client that stops sending mid-body frees its thread
    server: "RewardServer"

    def reply(self, status, payload):
        body = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status >= 400:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client went away: its answer goes nowhere
            self.close_connection = True

    def refuse(self, status, message, field="", index=None):
        self.reply(status, {"error": message, **({"field": field} if field else {}),
                            **({"index": index} if index is not None else {})})

    def do_GET(self):
        if self.path != "/health":
            return self.refuse(404, f"no such path {self.path!r}: POST /get_reward, GET /health")
        self.reply(200, {"status": "ok"})

    def do_POST(self):
        server = self.server
        if self.path != "/get_reward":
            return self.refuse(404, f"no such path {self.path!r}: POST /get_reward")
        if server.api_key and not hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                                      f"Bearer {server.api_key}".encode()):
            return self.refuse(401, "a missing or wrong key: send 'Authorization: Bearer <key>'")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return self.refuse(411, "send the body's Content-Length")
        if int(length) > server.cfg.max_body_mb * 2**20:
            return self.refuse(413, f"a body of {int(length):,} bytes, over --max_body_mb {server.cfg.max_body_mb:g}")
        if not server.enter():
            return self.refuse(503, "the server is shutting down")
        try:
            try:
                body = json.loads(self.rfile.read(int(length)))
                with server.tokenizer_lock:  # a fast tokenizer's state is not for two threads at once
                    items = parse_request(body, server.cfg, server.tokenizer)
            except json.JSONDecodeError as e:
                return self.refuse(400, f"the body is not valid JSON ({e.msg}, position {e.pos})")
            except BadRequest as e:
                return self.refuse(e.status, str(e), e.field, e.index)
            slots = server.batcher.submit(items)
            if slots is None:
                return self.refuse(503, "the server is shutting down")
            for slot in slots:
                slot.done.wait()
            failed = next((s.error for s in slots if s.error), None)
            if failed:
                return self.refuse(500, failed)
            rewards = [s.reward for s in slots]
            logs = {k: [s.logs[k] for s in slots] for k in slots[0].logs}
            self.reply(200, {"rewards": rewards, "scores": [(r + 1) / 2 for r in rewards], "extra_logs": logs})
        finally:
            server.leave()

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)


class RewardServer(ThreadingHTTPServer):
    """The HTTP server: a thread per request, the judge's Batcher, and a count of requests in
    flight, so a shutdown answers them before it stops."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, judge: Judge, cfg: ServeConfig, verbose=False):
        super().__init__((cfg.host, cfg.port), Handler)
        self.judge, self.cfg, self.verbose = judge, cfg, verbose
        self.api_key = cfg.api_key or os.environ.get("RM_R1_API_KEY", "")
        self.batcher = Batcher(judge, cfg)
        # the request threads read prompts with a tokenizer of their own: the judge's is its thread's
        self.tokenizer, self.tokenizer_lock = copy.deepcopy(judge.tokenizer), threading.Lock()
        self.lock, self.in_flight, self.draining = threading.Condition(), 0, False

    def enter(self) -> bool:
        with self.lock:
            if self.draining:
                return False
            self.in_flight += 1
            return True

    def leave(self):
        with self.lock:
            self.in_flight -= 1
            self.lock.notify_all()

    def drain(self):
        """Stop taking requests, rank every group that waits, answer the requests in flight, stop."""
        with self.lock:
            self.draining = True
        self.batcher.close()
        with self.lock:
            while self.in_flight:
                self.lock.wait()
        self.shutdown()


def check_config(cfg: ServeConfig):
    check_fields(cfg, [
        ("group_size", cfg.group_size >= 1, "must be >= 1"),
        ("window_s", cfg.window_s > 0, "must be > 0 (OpenRLHF's client gives up after 180 s)"),
        ("port", 0 <= cfg.port < 65536, "must be a port number (0: any free one)"),
        ("max_body_mb", cfg.max_body_mb > 0, "must be > 0"),
        ("max_queries", cfg.max_queries >= 1, "must be >= 1"),
        ("samples", cfg.samples == 1 or cfg.temperature > 0, "more than one sample needs --temperature > 0"),
        *[(name, getattr(cfg, name) >= 1, "must be >= 1") for name in ("max_new_tokens", "max_prompt_len", "batch_size")],
    ])


def main(argv=None):
    cfg, given = parse_config(ServeConfig, argv, __doc__)
    if cfg.model == SHIPPED and "max_new_tokens" not in given:
        cfg.max_new_tokens = 160  # the demo judge's traces (demo/recipe.py EVAL)
    check_config(cfg)
    judge = Judge.load(cfg.model, style=cfg.style, samples=cfg.samples, temperature=cfg.temperature, seed=cfg.seed,
                       max_new_tokens=cfg.max_new_tokens, max_prompt_len=cfg.max_prompt_len, batch_size=cfg.batch_size)
    server = RewardServer(judge, cfg, verbose=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=server.drain, name="drain").start())
    host, port = server.server_address[:2]
    key = "with a key" if server.api_key else "no key"
    print(f"serving {cfg.model} ({cfg.method}, groups of {cfg.group_size}) on http://{host}:{port}/get_reward, {key}",
          flush=True)
    server.serve_forever()
    server.server_close()
    print("stopped: every request in flight was answered", flush=True)


if __name__ == "__main__":
    sys.exit(main())
