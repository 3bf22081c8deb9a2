"""Fast batched sampling over a paged KV cache: the rollouts of GRPO and the verdicts of eval.

    params = SamplingParams(temperature=1.0, max_new_tokens=8192, n=7, stop_token_ids=(eos,), seed=step)
    completions = generate(model, prompts, params, max_batch_size=256)   # len(prompts) * n, prompt-major
    completions, stats = generate(model, prompts, params, return_stats=True)  # RolloutStats too
    completions[0].token_ids, completions[0].logprobs, completions[0].finish_reason

How it works, in the order the code runs (generate's loop: admit, reserve, decode, advance):
- one pool of KV pages (kvcache.KVCache, PAGE_SIZE positions each) sized from a memory budget
  (kv_budget_bytes; by default what the device has free, less 10% of it: kvcache.kv_budget); each sequence
  holds only the pages its length needs, taken as it grows and given back when it ends;
- admission: waiting sequences take idle slots (at most max_batch_size decode together) while
  pages last, paced by the pages the decoding ones are expected to grow into (PACE); new
  prompts are prefilled together, packed as documents, once each: their n samples share the
  prompt's pages by reference and copy only its partly filled last page, and a prompt's leading
  full pages that another prompt in flight has written already (the judge's system prompt, a
  group's question) are shared, not computed again (vLLM's automatic prefix caching, within a call);
- preemption: when the pool runs out, the most recently admitted sequence gives its pages back
  and waits again from its start, regenerating the same tokens (below): on the CPU in fp32
  results never depend on the budget; on a GPU the regenerated trace runs in other batches and
  buckets, other kernels, whose bf16 logits may differ in the last bits and flip a near-tied
  sample (the trace's tokens and log-probs still agree with each other, which is what GRPO
  needs; bench/gpu_check.py records how often); at any budget cache_pages accepts, the
  scheduler makes progress (Scheduler's docstring);
- every step decodes one token for the busy slots (kept at 0..n-1), attending over each one's
  pages up to its own length (the Triton kernel) or the furthest one's (the torch path); on CUDA
  the step (model forward + sampling) is recorded as a CUDA graph once per bucket of n and of
  length (powers of two) and replayed (`use_cuda_graph`);
- sampling is exact categorical sampling by the Gumbel-max trick, with noise that is a hash of
  (seed, prompt index, sample index, position, token id): a sample never depends on which other
  sequences shared its batch, so any single trace can be regenerated. Callers derive `seed` from
  their step (grpo.py: the training step), which makes a resumed run draw the same rollouts.

Log-probs are those of the sampled token under softmax(logits / T) over the full vocabulary, in
fp32 (T = 1 when greedy), not renormalized after top-k / top-p: the quantity the trainer computes
with a full forward pass at the same temperature, so the PPO ratio starts at 1.

FSDP2: generate() only calls model forward. The caller gathers the full weights once around the
whole call and decodes through the plain module that distributed.full_weights yields: FSDP2's
hooks would break a CUDA-graph capture.
"""

import functools
from dataclasses import dataclass

import torch

from kvcache import PAGE_SIZE, cache_pages, device_kv_budget, new_cache
from reward import parse_verdict
from scheduler import Completion, Scheduler, as_prompts


@dataclass
class SamplingParams:
    temperature: float = 1.0      # 0 = greedy (top_p and top_k then have no effect)
    top_p: float = 1.0            # nucleus: keep the smallest set of tokens with this much mass
    top_k: int = 0                # keep the k most likely tokens; 0 = off
    max_new_tokens: int = 256     # a completion that reaches this ends with reason "length"
    n: int = 1                    # samples per prompt (GRPO's group size)
    stop_token_ids: tuple[int, ...] = ()  # any of these ends a completion (and is kept in its tokens)
    seed: int = 0                 # in [0, 2**32); derive it from the training step


def check_inputs(prompts, params, vocab_size, max_batch_size):
    """prompts: [Prompt]; an error names the prompt, the token or the setting."""
    if not prompts:
        raise ValueError("prompts is empty; pass a list of token-id lists")
    for i, prompt in enumerate(prompts):
        p = prompt.ids
        if prompt.max_new_tokens is not None and prompt.max_new_tokens < 1:
            raise ValueError(f"prompts[{i}].max_new_tokens={prompt.max_new_tokens} must be >= 1 (or None)")
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        if min(p) < 0 or max(p) >= vocab_size:
            j, t = next((j, t) for j, t in enumerate(p) if not 0 <= t < vocab_size)
            raise ValueError(f"prompts[{i}][{j}]: token id {t} is outside the model's vocabulary "
                             f"[0, {vocab_size}); was it tokenized with another tokenizer?")
    checks = [
        ("temperature", params.temperature >= 0, "must be >= 0 (0 = greedy)"),
        ("top_p", 0 < params.top_p <= 1, "must be in (0, 1]"),
        ("top_k", params.top_k >= 0, "must be >= 0 (0 = off)"),
        ("max_new_tokens", params.max_new_tokens >= 1, "must be >= 1"),
        ("n", params.n >= 1, "must be >= 1"),
        ("seed", 0 <= params.seed < 2**32, "must be in [0, 2**32); reduce it modulo 2**32"),
        ("stop_token_ids", all(0 <= t < vocab_size for t in params.stop_token_ids),
         f"must be token ids in [0, {vocab_size})"),
    ]
    for name, ok, rule in checks:
        if not ok:
            raise ValueError(f"SamplingParams.{name}={getattr(params, name)!r} {rule}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")


M32 = 0xFFFFFFFF


def mix32(x):
    """A 32-bit integer hash of an int64 tensor (two multiply-xorshift rounds, constants from
    C. Wellons' hash-prospector). Both constants are below 2**31, so every product of a 32-bit
    value fits in int64 and the hash is exact and identical on CPU and GPU."""
    x = x & M32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def gumbel_noise(seed, prompt_index, sample_index, position, vocab_size):
    """(B, V) Gumbel(0, 1) noise, a pure function of (seed, prompt, sample, position, token id)."""
    key = mix32(mix32(mix32(mix32(torch.full_like(position, seed)) ^ prompt_index) ^ sample_index)
                ^ position)
    token = torch.arange(vocab_size, device=position.device)
    bits = mix32(key[:, None] + token * 0x9E3779B9)  # a Weyl sequence over the vocabulary, hashed
    # 23 random bits: k + 0.5 then needs 24 significant bits, which fp32 holds exactly, so u lies in
    # [2**-24, 1 - 2**-24] for every pattern (with 24 bits, k = 2**24 - 1 rounds to u = 1: +inf noise).
    u = ((bits >> 9).float() + 0.5) * 2.0**-23
    return -torch.log(-torch.log(u))


def filter_logits(scaled, top_k, top_p):
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf (as transformers
    orders them); the argmax over the survivors plus Gumbel noise samples the renormalized rest."""
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # the most likely token always stays (mass 0)
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        scaled = scaled.scatter(-1, order, sorted_logits)
    return scaled


def sample(logits, params, prompt_index, sample_index, position):
    """Next tokens (B,) and their log-probs (B,) from last-position logits (B, V)."""
    logits = logits.float()
    if params.temperature == 0:
        next_ids = logits.argmax(-1)
        logprobs = logits.log_softmax(-1)
    else:
        scaled = logits / params.temperature
        logprobs = scaled.log_softmax(-1)
        noise = gumbel_noise(params.seed, prompt_index, sample_index, position, logits.shape[-1])
        next_ids = (filter_logits(scaled, params.top_k, params.top_p) + noise).argmax(-1)
    return next_ids, logprobs.gather(-1, next_ids[:, None])[:, 0]


@torch.no_grad()
def decode(model, cache, state, params, kv_len):
    """One decode step for every slot: next tokens (B,) and their log-probs (B,). state (4, B)
    holds each slot's input token, its position, and the (prompt key, sample) of its noise."""
    tokens, positions = state[0][:, None], state[1][:, None]
    logits = model.decode(tokens, positions, cache, kv_len)[:, -1]  # (B, V)
    return sample(logits, params, state[2], state[3], state[1])


def attend_len(max_position, cache_len, buckets=True):
    """Cache positions a decode step attends over: with buckets (a CUDA graph per length), the
    power of two above the furthest query position (at least 16, at most the cache), so only
    log2(cache_len) lengths ever occur; without, the multiple of 16 above it."""
    need = max(16, 1 << max_position.bit_length()) if buckets else -(-(max_position + 1) // 16) * 16
    return min(cache_len, need)


@functools.cache
def side_stream(device_index: int):
    """The one stream every decode graph warms up and is captured on. cuBLAS keeps a workspace
    (32 MiB on Hopper) for each stream it has run on, for the process's life, and torch hands out
    a new stream per torch.cuda.Stream() (round-robin over 32): one per graph would keep dozens."""
    return torch.cuda.Stream(device_index)


def cuda_graph(fn, pool=None):
    """Record fn() once (it must read only static buffers) and return a function that replays it.
    Kernel launches dominate a decode step of a small batch; a replay is one launch. Graphs
    recorded with the same `pool` share their scratch memory (they never run at once)."""
    side = side_stream(torch.cuda.current_device())
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up outside the graph: cuBLAS workspaces, kernel selection
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=side):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def graph_pool(device, use_cuda_graph):
    """The memory pool the decode step's CUDA graphs share, or None for eager steps (off CUDA, or
    when not asked for). With a pool, generate rounds each step's batch and length up to buckets."""
    return torch.cuda.graph_pool_handle() if use_cuda_graph and device.type == "cuda" else None


class Sampler:
    """One generate() call: the KV pool sized from the budget, the Scheduler that feeds it, and
    the decode step (eager, or replayed from a CUDA graph per bucket). generate() runs it to the
    end; the memory plan walks it (walk) on fake tensors, where no token can be read back."""

    def __init__(self, model, prompts, params: SamplingParams, max_batch_size=64, use_cuda_graph=True,
                 prompt_keys=None, kv_budget_bytes=None, page_size=PAGE_SIZE, share_prefixes=True):
        prompts = as_prompts(prompts, prompt_keys)
        check_inputs(prompts, params, model.config.vocab_size, max_batch_size)
        weight = model.embed_tokens.weight
        self.model, self.prompts, self.params = model, prompts, params
        self.slots = min(max_batch_size, len(prompts) * params.n)
        self.seq_len = max(len(p.ids) + p.limit(params) for p in prompts)
        budget = device_kv_budget(weight.device) if kv_budget_bytes is None else kv_budget_bytes
        n_pages = cache_pages(model.config, prompts, params, weight.dtype, budget, self.slots, page_size)
        self.cache = new_cache(model, self.slots, self.seq_len, page_size, n_pages)
        self.batch = Scheduler(self.cache, prompts, params, self.slots, share_prefixes)
        # The decode step's inputs, one column per slot: the token to feed, its position, and
        # which (prompt, sample) the slot holds, for the sampling noise. Fixed address and shape.
        self.state = torch.zeros(4, self.slots, dtype=torch.long, device=weight.device)
        # With CUDA graphs the step's batch and length are rounded up to powers of two, so that a
        # graph is recorded once per (batch, length) bucket, not once per step.
        self.pool = graph_pool(weight.device, use_cuda_graph)
        self.graphs = {}

    def decode(self, n, kv_len):
        """One decode step of slots 0..n-1 over the first kv_len positions of each one's pages:
        it costs the live batch and length."""
        def eager():
            return decode(self.model, self.cache, self.state[:, :n], self.params, kv_len)
        if self.pool is None:
            return eager()
        if (n, kv_len) not in self.graphs:
            # Its warm-up runs write this step's keys/values, the same ones the replay writes.
            self.graphs[n, kv_len] = cuda_graph(eager, self.pool)
        return self.graphs[n, kv_len]()

    def step(self):
        """Admit what the pool allows, give every busy slot a page for its next position, decode
        one token each, and hand the tokens to the scheduler."""
        batch = self.batch
        batch.admit(self.model)
        batch.reserve()
        self.cache.sync()
        busy = len(batch.order)
        n = min(self.slots, 1 << (busy - 1).bit_length()) if self.pool is not None else busy  # buckets: graphs only
        self.state[:, :n].copy_(batch.state(n))
        next_ids, logprobs = self.decode(n, attend_len(max(batch.pos[:n]), self.seq_len, buckets=self.pool is not None))
        batch.advance(next_ids.tolist(), logprobs.tolist())

    @torch.no_grad()
    def run(self):
        """Decode until every sequence has finished: (completions, prompt-major, RolloutStats)."""
        was_training = self.model.training
        self.model.eval()
        try:
            while self.batch.busy:
                self.step()
        finally:
            self.model.train(was_training)
        self.batch.stats.pages_held_at_end = self.cache.n_pages - 1 - len(self.cache.free)
        return self.batch.results, self.batch.stats

    @torch.no_grad()
    def walk(self):
        """What the memory plan runs instead of run(): the first admission (its prefill, as many
        prompts as one prefill takes), then the step in which every slot decodes at the longest
        length, its worst. Returns full-length placeholder completions (fake tensors hold no tokens)
        and the stats."""
        self.batch.admit(self.model)
        self.decode(self.slots, self.seq_len)
        return full_length(len(self.prompts), self.params), self.batch.stats


def full_length(n_prompts, params: SamplingParams) -> list[Completion]:
    """Placeholder completions of max_new_tokens each (ended by a stop token, so that no option
    drops them): what the memory plan trains on."""
    ids, logprobs = [0] * params.max_new_tokens, [0.0] * params.max_new_tokens  # shared: only ever read
    return [Completion(p, s, ids, logprobs, "stop") for p in range(n_prompts) for s in range(params.n)]


@torch.no_grad()
def generate(model, prompts, params: SamplingParams, max_batch_size=64, use_cuda_graph=True,
             prompt_keys=None, kv_budget_bytes=None, page_size=PAGE_SIZE, return_stats=False, share_prefixes=True):
    """Sample params.n completions for each prompt (a list of token ids, or a scheduler.Prompt
    with a key and a limit of its own); returns
    len(prompts) * n Completions, prompt-major (prompt 0 samples 0..n-1, then prompt 1, ...),
    and, with return_stats, (completions, RolloutStats).

    max_batch_size caps the sequences decoded together; the KV cache is a pool of pages of
    page_size positions that kv_budget_bytes sizes (default: device_kv_budget, no limit on
    CPU), and sequences hold only the pages their length needs. use_cuda_graph replays the
    decode step as a CUDA graph on a CUDA model; pass False to debug or profile it eagerly.
    The sampling noise of prompts[i] is keyed by prompt_keys[i] (default i): a data-parallel
    caller that passes each prompt's global index draws the same traces whatever the number of
    ranks (Completion.prompt_index stays the local i). share_prefixes: a prompt's leading full
    pages that another prompt in flight holds already are shared, not computed again (False: each
    prompt prefilled whole, as a reference for the tests and benchmarks).
    """
    completions, stats = Sampler(model, prompts, params, max_batch_size, use_cuda_graph, prompt_keys,
                                 kv_budget_bytes, page_size, share_prefixes).run()
    return (completions, stats) if return_stats else completions


def greedy_verdicts(model, tokenizer, prompts, max_new_tokens, max_batch_size, kv_budget_bytes=None):
    """Judge each prompt (token ids) greedily, stopping at EOS: [(judgment text, verdict "A" / "B" /
    None, finish_reason)] in prompt order. What eval.py logs and grpo.py's held-out accuracy reads."""
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,))
    out = []
    for c in generate(model, prompts, params, max_batch_size=max_batch_size, kv_budget_bytes=kv_budget_bytes):
        text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
        out.append((text, parse_verdict(text), c.finish_reason))
    return out
