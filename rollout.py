"""Fast batched sampling over a paged KV cache: the rollouts of GRPO and the verdicts of eval.

    params = SamplingParams(temperature=1.0, max_new_tokens=8192, n=7, stop_token_ids=(eos,), seed=step)
    completions = generate(model, prompts, params, max_batch_size=256)   # len(prompts) * n, prompt-major
    completions, stats = generate(model, prompts, params, return_stats=True)  # RolloutStats too
    completions[0].token_ids, completions[0].logprobs, completions[0].finish_reason

How it works, in the order the code runs (generate's loop: admit, reserve, decode, advance):
- one pool of KV pages (kvcache.KVCache, PAGE_SIZE positions each) sized from a memory budget
  (kv_budget_bytes; by default what the device has free, less KV_RESERVE of it); each sequence
  holds only the pages its length needs, taken as it grows and given back when it ends;
- admission: waiting sequences take idle slots (at most max_batch_size decode together) while
  pages last, paced by the pages the decoding ones are expected to grow into (PACE); new
  prompts are prefilled together, packed as documents, once each: their n samples share the
  prompt's pages by reference and copy only its partly filled last page;
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
from collections import deque
from dataclasses import dataclass

import torch

from kvcache import KVCache, long_tensor
from reward import parse_verdict


@dataclass
class SamplingParams:
    temperature: float = 1.0      # 0 = greedy (top_p and top_k then have no effect)
    top_p: float = 1.0            # nucleus: keep the smallest set of tokens with this much mass
    top_k: int = 0                # keep the k most likely tokens; 0 = off
    max_new_tokens: int = 256     # a completion that reaches this ends with reason "length"
    n: int = 1                    # samples per prompt (GRPO's group size)
    stop_token_ids: tuple[int, ...] = ()  # any of these ends a completion (and is kept in its tokens)
    seed: int = 0                 # in [0, 2**32); derive it from the training step


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    token_ids: list[int]     # generated tokens, the stop token included when there was one
    logprobs: list[float]    # one fp32 log-prob per generated token, under softmax(logits / T)
    finish_reason: str       # "stop" or "length"


def check_inputs(prompts, params, vocab_size, max_batch_size):
    if not prompts:
        raise ValueError("prompts is empty; pass a list of token-id lists")
    for i, p in enumerate(prompts):
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


# Share of device memory a default budget leaves free for everything a decode step allocates
# besides the cache (logits, sampling noise, attention scores) and for the allocator's slack.
KV_RESERVE = 0.05


def kv_budget(free_bytes, total_bytes) -> int:
    """The default KV-cache budget: what is free once everything else is resident, less KV_RESERVE."""
    return max(0, int(free_bytes - KV_RESERVE * total_bytes))


def device_kv_budget(device) -> int | None:
    """kv_budget of a CUDA device now (memory the caching allocator holds unused counts as free);
    None (no limit) elsewhere."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return kv_budget(free, total)


PAGE_SIZE = 16          # positions per KV page (vLLM's default too)
PREFILL_TOKENS = 8192   # prompt tokens per prefill forward, at most (one prompt, if it is longer)
# Admission counts on each decoding sequence taking this share of the pages it is expected to
# grow into (1: all of them, so almost nothing is ever preempted, and fewer run at once); lower
# runs more at once and preempts more. The README's benchmark table has what 0.3 gives.
PACE = 0.3


def cache_pages(config, prompts, params, dtype, budget_bytes, slots, page_size=PAGE_SIZE) -> int:
    """Pages in the pool: what the budget (bytes; None: no limit) holds, and no more than this
    call could ever use at once (every slot at full length, every prompt's pages, the scratch
    page). A budget below what one sequence needs is an error that names the number."""
    L = max(map(len, prompts))
    per_seq = -(-(L + params.max_new_tokens) // page_size)
    prefix = -(-(L - 1) // page_size)
    page_bytes = KVCache.bytes_per_slot(config, page_size, dtype)
    most = slots * per_seq + min(slots, len(prompts)) * prefix + 1
    if budget_bytes is None:
        return most
    one = per_seq + prefix + 1
    if budget_bytes < one * page_bytes:
        raise ValueError(f"the KV cache needs {one} pages of {page_size} positions ({one * page_bytes / 2**30:.2f} "
                         f"GiB) for one sequence of {L} + {params.max_new_tokens} tokens, but its budget is "
                         f"{budget_bytes / 2**30:.2f} GiB: raise the budget (kv_budget_gib), free device "
                         f"memory, or shorten prompts / max_new_tokens")
    return min(most, budget_bytes // page_bytes)


def new_cache(model, n_slots, seq_len, page_size, n_pages) -> KVCache:
    """A paged KV cache in the model's dtype and device: n_slots page tables of up to seq_len
    positions over a pool of n_pages pages."""
    weight = model.embed_tokens.weight
    return KVCache(model.config, n_slots, seq_len, weight.dtype, weight.device, page_size, n_pages)


@torch.no_grad()
def prefill(model, cache, prefixes):
    """Write the keys/values of several prompts at once: prefixes is [(token ids, pages)], each
    prompt's ids but its last (the first decode input, so that the first sampled token comes out
    of a decode step like every other) and the pages that will hold them. One forward, the
    prompts packed as documents that never attend to each other."""
    prefixes = [(ids, pages) for ids, pages in prefixes if ids]
    if not prefixes:
        return
    device, P = cache.k.device, cache.page_size
    ids = [t for p, _ in prefixes for t in p]
    index = [pages[j // P] * P + j % P for p, pages in prefixes for j in range(len(p))]
    positions = [j for p, _ in prefixes for j in range(len(p))]
    model(torch.tensor(ids, device=device)[None], torch.tensor(positions, device=device)[None],
          kv_cache=cache, cache_index=torch.tensor(index, device=device)[None],
          doc_lens=[len(p) for p, _ in prefixes], hidden_only=True)


@torch.no_grad()
def decode(model, cache, state, params, kv_len):
    """One decode step for every slot: next tokens (B,) and their log-probs (B,). state (4, B)
    holds each slot's input token, its position, and the (prompt key, sample) of its noise."""
    tokens, positions = state[0][:, None], state[1][:, None]
    logits = model(tokens, positions, kv_cache=cache, kv_len=kv_len)[:, -1]  # (B, V)
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


@dataclass
class RolloutStats:
    peak_sequences: int = 0     # sequences decoding at once, at most
    peak_kv_bytes: int = 0      # bytes of KV pages held at once, at most
    pool_pages: int = 0         # pages in the pool (one of them scratch)
    page_size: int = 0
    page_bytes: int = 0         # bytes of one page (every layer's keys and values)
    preemptions: int = 0        # sequences sent back to wait for pages (and regenerated exactly)
    prefill_tokens: int = 0
    prefill_forwards: int = 0
    decode_steps: int = 0
    pages_held_at_end: int = 0  # 0: every page came back to the pool


class Scheduler:
    """The host side of generate: which sequence each slot holds, the pages it holds, who waits.

    A prompt is prefilled once into pages of its own (its "prefix"), which its samples share by
    reference; each sample copies the prefix's partly filled last page, the one it goes on
    writing. When the pool runs out, the most recently admitted sequence gives its pages back
    and waits again from its start: its noise is keyed by position, so it regenerates the same
    tokens (exactly on the CPU in fp32; on a GPU, a step of another batch or length runs other
    kernels, so bf16 logits may differ in their last bits and flip a near-tied sample).

    Progress, whatever the budget cache_pages accepted: whenever nothing is decoding and a
    sequence waits, the front one is admitted if the pool could hold it alone (prefixes kept for
    other prompts' waiting samples are let go, and prefilled again when their turn comes); if it
    could not, admit raises with the pages it needs and the pages held. While something decodes,
    the oldest sequence is never preempted, so it advances every step. The busy slots are always
    0..n-1 (a finished or preempted slot's hole is filled by the highest busy one), so a decode
    step runs n slots, not all.
    """

    def __init__(self, cache, prompts, keys, params, n_slots):
        self.cache, self.prompts, self.keys, self.params = cache, prompts, keys, params
        self.stop = frozenset(params.stop_token_ids)
        self.waiting = deque((p, s) for p in range(len(prompts)) for s in range(params.n))
        # Per slot: the (prompt, sample) it holds (None: idle), the token it feeds next and that
        # token's position, its noise key, and the tokens and log-probs it has generated so far.
        self.seq = [None] * n_slots
        self.token, self.pos, self.key = [0] * n_slots, [0] * n_slots, [0] * n_slots
        self.ids, self.lps = [None] * n_slots, [None] * n_slots
        self.order = []                         # busy slots, oldest admission first
        self.results = [None] * (len(prompts) * params.n)
        self.prefixes = {}                      # prompt -> [its prefix pages, samples yet to admit]
        self.finished, self.finished_tokens = 0, 0
        self.stats = RolloutStats(pool_pages=cache.n_pages, page_size=cache.page_size, page_bytes=cache.page_bytes)

    @property
    def busy(self):
        return bool(self.order or self.waiting)

    def expected_pages(self, cached, pos, held):
        """Pages a sequence whose prompt caches `cached` positions, now at `pos` and holding
        `held` pages (shared ones included), is counted on to take beyond them: up to its next
        position, and PACE of the way from there to the length sequences have been ending at
        (the mean of the finished ones; half of max_new_tokens before any has finished)."""
        length = self.finished_tokens / self.finished if self.finished else self.params.max_new_tokens / 2
        end = max(pos + 1, min(cached + 1 + round(length), cached + self.params.max_new_tokens))
        end = pos + 1 + round((end - pos - 1) * PACE)
        return max(0, self.cache.pages_for(end) - held)

    def growth(self):
        """Pages the busy sequences are expected to take before they end. Admitting into them
        would have the newcomers preempted (their work lost) as soon as the others grow; this
        only paces admission, results never depend on it."""
        return sum(self.expected_pages(len(self.prompts[self.seq[s][0]]) - 1, self.pos[s], len(self.cache.tables[s]))
                   for s in self.order)

    def admit(self, model):
        """Fill idle slots from the front of the waiting sequences while pages last (at least the
        front when nothing decodes: the class's progress rule); prefill their new prompts together."""
        cache, P = self.cache, self.cache.page_size
        if not self.waiting or len(self.order) == len(self.seq):
            return
        free, growth = len(cache.free), self.growth()
        new, to_prefill, tokens = [], [], 0
        for slot in range(len(self.order), len(self.seq)):  # the idle slots
            if not self.waiting:
                break
            p, s = self.waiting[0]
            cached = len(self.prompts[p]) - 1  # positions the prefill writes
            fresh = p not in self.prefixes and p not in to_prefill
            prefix = cache.pages_for(cached) if fresh else 0
            # The prefix's full pages are shared: the sample's own pages start at the partial one.
            need = prefix + self.expected_pages(cached, cached, cached // P)
            if fresh and to_prefill and tokens + cached > PREFILL_TOKENS:
                break
            if need + growth > free:
                if self.order or new:
                    break
                free = self.make_room_for_front(prefix + 1)  # to start: the prefix and one page
            free -= need
            self.waiting.popleft()
            new.append((slot, p, s))
            if fresh:
                to_prefill.append(p)
                tokens += cached
        if to_prefill:
            for p in to_prefill:
                samples = sum(q == p for q, _ in self.waiting) + sum(q == p for _, q, _ in new)
                self.prefixes[p] = [cache.take(cache.pages_for(len(self.prompts[p]) - 1)), samples]
            prefill(model, cache, [(self.prompts[p][:-1], self.prefixes[p][0]) for p in to_prefill])
            self.stats.prefill_tokens += tokens
            self.stats.prefill_forwards += 1
        for slot, p, s in new:
            self.start(slot, p, s)

    def make_room_for_front(self, start):
        """Nothing decodes and the front waits: let go of the prefixes kept for other prompts if
        the free pages cannot start it. Returns the free pages; raises if even that is too few."""
        front = self.waiting[0][0]
        if start > len(self.cache.free):
            self.drop_prefixes(keep=front)
        if start > len(self.cache.free):
            held = sum(len(pages) for pages, _ in self.prefixes.values())
            raise RuntimeError(f"the KV pool ({self.cache.n_pages} pages of {self.cache.page_size} positions) cannot "
                               f"hold prompt {front} alone: it needs {start} pages to start and "
                               f"{len(self.cache.free)} are free ({held} held by its own prefix); "
                               f"cache_pages should have refused this budget")
        return len(self.cache.free)

    def drop_prefixes(self, keep=None):
        """Give back the prefixes kept for waiting samples (but keep's): those samples prefill again."""
        for p in [p for p in self.prefixes if p != keep]:
            self.cache.give(self.prefixes.pop(p)[0])

    def start(self, slot, p, s):
        """Slot takes sample s of prompt p: the prefix's full pages by reference, a copy of its
        partial last page (or a fresh page when the prompt fills its pages exactly)."""
        cache, P = self.cache, self.cache.page_size
        pages, _ = entry = self.prefixes[p]
        cached = len(self.prompts[p]) - 1
        full, partial = divmod(cached, P)
        own = cache.take(1)
        if partial:
            cache.copy_page(own[0], pages[full])
        cache.set_table(slot, cache.share(pages[:full]) + own)
        entry[1] -= 1
        if entry[1] == 0:  # every sample has its own references now
            cache.give(pages)
            del self.prefixes[p]
        self.seq[slot], self.token[slot], self.pos[slot] = (p, s), self.prompts[p][-1], cached
        self.key[slot], self.ids[slot], self.lps[slot] = self.keys[p], [], []
        self.order.append(slot)

    def reserve(self):
        """A page for the position each busy slot decodes next; when the pool runs short, the
        most recently admitted sequences give theirs back and wait again."""
        cache, P = self.cache, self.cache.page_size

        def needy():  # asked again after each preemption: releasing a slot moves another into it
            return [slot for slot in self.order if self.pos[slot] >= P * len(cache.tables[slot])]
        slots = needy()
        while len(slots) > len(cache.free):
            if len(self.order) == 1:  # prefixes kept for waiting samples hold the rest: let go
                self.drop_prefixes()
                if len(slots) > len(cache.free):
                    raise RuntimeError(f"the KV pool ({cache.n_pages} pages) cannot hold one sequence: it holds "
                                       f"{len(cache.tables[self.order[0]])} and none is free "
                                       f"(cache_pages should have refused this budget)")
                break
            self.preempt(self.order[-1])
            slots = needy()
        for slot in slots:
            cache.append_page(slot, cache.take(1)[0])
        self.stats.peak_sequences = max(self.stats.peak_sequences, len(self.order))
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, cache.used_bytes)

    def preempt(self, slot):
        p, s = self.seq[slot]
        self.release(slot)
        self.waiting.appendleft((p, s))
        if p in self.prefixes:
            self.prefixes[p][1] += 1
        self.stats.preemptions += 1

    def release(self, slot):
        """Give the slot's pages back. The busy slots stay 0..n-1: the last busy one moves into
        the hole (only its page table and host state move)."""
        cache = self.cache
        cache.give(cache.tables[slot])
        self.order.remove(slot)
        last = len(self.order)  # the highest busy slot, when slot was below it
        fields = (self.seq, self.token, self.pos, self.key, self.ids, self.lps)
        if slot < last:
            cache.set_table(slot, cache.tables[last])
            for f in fields:
                f[slot] = f[last]
            self.order[self.order.index(last)] = slot
            slot = last
        cache.set_table(slot, [])
        for f, idle in zip(fields, (None, 0, 0, 0, None, None)):
            f[slot] = idle

    def state(self, n):
        """The decode step's inputs (4, n) for slots 0..n-1: token, position, prompt key, sample;
        idle slots decode a dummy token at position 0 of the scratch page."""
        samples = [seq[1] if seq else 0 for seq in self.seq[:n]]
        return long_tensor(self.token[:n] + self.pos[:n] + self.key[:n] + samples, (4, n))

    def advance(self, next_ids, logprobs):
        """Append each busy slot's token; a finished sequence gives its pages back."""
        n, limit, done = len(self.order), self.params.max_new_tokens, []
        for slot, t, lp, ids, lps in zip(range(n), next_ids, logprobs, self.ids, self.lps):
            ids.append(t)
            lps.append(lp)
            if t in self.stop or len(ids) == limit:
                done.append(slot)
        self.token[:n] = next_ids[:n]
        self.pos[:n] = [pos + 1 for pos in self.pos[:n]]
        for slot in reversed(done):  # releasing moves only slots above it, which are done already
            (p, s), ids = self.seq[slot], self.ids[slot]
            reason = "stop" if ids[-1] in self.stop else "length"
            self.results[p * self.params.n + s] = Completion(p, s, ids, self.lps[slot], reason)
            self.finished, self.finished_tokens = self.finished + 1, self.finished_tokens + len(ids)
            self.release(slot)
        self.stats.decode_steps += 1


class Sampler:
    """One generate() call: the KV pool sized from the budget, the Scheduler that feeds it, and
    the decode step (eager, or replayed from a CUDA graph per bucket). generate() runs it to the
    end; the memory plan walks it (walk) on fake tensors, where no token can be read back."""

    def __init__(self, model, prompts, params: SamplingParams, max_batch_size=64, use_cuda_graph=True,
                 prompt_keys=None, kv_budget_bytes=None, page_size=PAGE_SIZE):
        keys = list(range(len(prompts))) if prompt_keys is None else list(prompt_keys)
        check_inputs(prompts, params, model.config.vocab_size, max_batch_size)
        weight = model.embed_tokens.weight
        self.model, self.prompts, self.params = model, prompts, params
        self.slots = min(max_batch_size, len(prompts) * params.n)
        self.seq_len = max(map(len, prompts)) + params.max_new_tokens
        budget = device_kv_budget(weight.device) if kv_budget_bytes is None else kv_budget_bytes
        n_pages = cache_pages(model.config, prompts, params, weight.dtype, budget, self.slots, page_size)
        self.cache = new_cache(model, self.slots, self.seq_len, page_size, n_pages)
        self.batch = Scheduler(self.cache, prompts, keys, params, self.slots)
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
             prompt_keys=None, kv_budget_bytes=None, page_size=PAGE_SIZE, return_stats=False):
    """Sample params.n completions for each prompt (a list of token ids); returns
    len(prompts) * n Completions, prompt-major (prompt 0 samples 0..n-1, then prompt 1, ...),
    and, with return_stats, (completions, RolloutStats).

    max_batch_size caps the sequences decoded together; the KV cache is a pool of pages of
    page_size positions that kv_budget_bytes sizes (default: device_kv_budget, no limit on
    CPU), and sequences hold only the pages their length needs. use_cuda_graph replays the
    decode step as a CUDA graph on a CUDA model; pass False to debug or profile it eagerly.
    The sampling noise of prompts[i] is keyed by prompt_keys[i] (default i): a data-parallel
    caller that passes each prompt's global index draws the same traces whatever the number of
    ranks (Completion.prompt_index stays the local i).
    """
    completions, stats = Sampler(model, prompts, params, max_batch_size, use_cuda_graph, prompt_keys,
                                 kv_budget_bytes, page_size).run()
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
