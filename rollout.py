"""Fast batched sampling with a static KV cache: the rollouts of GRPO and the verdicts of eval.

    params = SamplingParams(temperature=1.0, max_new_tokens=8192, n=7, stop_token_ids=(eos,), seed=step)
    completions = generate(model, prompts, params, max_batch_size=64)   # len(prompts) * n, prompt-major
    completions[0].token_ids, completions[0].logprobs, completions[0].finish_reason

How it works, in the order the code runs:
- one static KVCache of (slots, longest prompt + max_new_tokens positions), with as many slots
  as fit the KV memory budget (kv_budget_bytes; by default what the device has free, less
  KV_RESERVE of it), at most max_batch_size;
- continuous batching: every slot holds one sequence; when it finishes, the slot takes the next
  waiting sequence, so a few long traces never leave the batch mostly idle;
- a prompt is prefilled once; its other samples copy its cached keys/values into their slots;
- every step decodes one token for every slot with fixed shapes, attending over the cache up to
  the power of two above the furthest live position; on CUDA the step (model forward +
  sampling) is recorded as a CUDA graph once per such length and replayed (`use_cuda_graph`);
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

from collections import deque
from dataclasses import dataclass

import torch

from model import KVCache


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
    # 24 random bits fill an fp32 mantissa; +0.5 keeps u strictly inside (0, 1).
    u = ((bits >> 8).float() + 0.5) * 2.0**-24
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


def cache_slots(config, seq_len, dtype, budget_bytes, max_slots) -> int:
    """How many sequences of seq_len positions the KV cache holds: max_slots, or fewer when the
    budget (bytes; None = no limit) says so. A budget below one sequence is an error."""
    per_slot = KVCache.bytes_per_slot(config, seq_len, dtype)
    if budget_bytes is None:
        return max_slots
    if budget_bytes < per_slot:
        raise ValueError(f"the KV cache needs {per_slot / 2**30:.2f} GiB for one sequence of {seq_len} "
                         f"positions, but its budget is {budget_bytes / 2**30:.2f} GiB: raise the budget "
                         f"(kv_budget_gib), free device memory, or shorten prompts / max_new_tokens")
    return min(max_slots, budget_bytes // per_slot)


def new_cache(model, n_slots, seq_len) -> KVCache:
    """A KV cache of n_slots x seq_len positions in the model's dtype and device."""
    weight = model.embed_tokens.weight
    return KVCache(model.config, n_slots, seq_len, weight.dtype, weight.device)


@torch.no_grad()
def prefill(model, cache, prompt, slot):
    """Cache the keys/values of prompt[:-1] (a list of ids) in `slot`. The last prompt token is the
    first decode input, so the first sampled token comes out of a decode step like every other."""
    device = cache.k.device
    if len(prompt) > 1:
        ids = torch.tensor(prompt[:-1], device=device)[None]
        model(ids, torch.arange(ids.shape[1], device=device)[None], kv_cache=cache,
              cache_slots=torch.tensor([slot], device=device), hidden_only=True)


@torch.no_grad()
def decode(model, cache, state, params, kv_len):
    """One decode step for every slot: next tokens (B,) and their log-probs (B,). state (4, B)
    holds each slot's input token, its position, and the (prompt key, sample) of its noise."""
    tokens, positions = state[0][:, None], state[1][:, None]
    logits = model(tokens, positions, kv_cache=cache, kv_len=kv_len)[:, -1]  # (B, V)
    return sample(logits, params, state[2], state[3], state[1])


def attend_len(max_position, cache_len):
    """Cache positions a decode step attends over: the power of two above the furthest query
    position (at least 16, at most the cache), so only log2(cache_len) lengths ever occur."""
    return min(cache_len, max(16, 1 << max_position.bit_length()))


def cuda_graph(fn, pool=None):
    """Record fn() once (it must read only static buffers) and return a function that replays it.
    Kernel launches dominate a decode step of a small batch; a replay is one launch. Graphs
    recorded with the same `pool` share their scratch memory (they never run at once)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up outside the graph: cuBLAS workspaces, kernel selection
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


@torch.no_grad()
def generate(model, prompts, params: SamplingParams, max_batch_size=64, use_cuda_graph=True,
             prompt_keys=None, kv_budget_bytes=None):
    """Sample params.n completions for each prompt (a list of token ids); returns
    len(prompts) * n Completions, prompt-major (prompt 0 samples 0..n-1, then prompt 1, ...).

    max_batch_size caps the cache slots (sequences decoded together); kv_budget_bytes caps the
    KV cache's memory (default: device_kv_budget, no limit on CPU), and the cache holds as many
    slots of (longest prompt + max_new_tokens) positions as both allow. use_cuda_graph replays
    the decode step as a CUDA graph on a CUDA model; pass False to debug or profile it eagerly.
    The sampling noise of prompts[i] is keyed by prompt_keys[i] (default i): a data-parallel
    caller that passes each prompt's global index draws the same traces whatever the number of
    ranks (Completion.prompt_index stays the local i).
    """
    keys = list(range(len(prompts))) if prompt_keys is None else list(prompt_keys)
    config = model.config
    check_inputs(prompts, params, config.vocab_size, max_batch_size)
    weight = model.embed_tokens.weight
    device, dtype = weight.device, weight.dtype
    n_seqs = len(prompts) * params.n
    seq_len = max(map(len, prompts)) + params.max_new_tokens
    budget = device_kv_budget(device) if kv_budget_bytes is None else kv_budget_bytes
    B = cache_slots(config, seq_len, dtype, budget, min(max_batch_size, n_seqs))
    cache = new_cache(model, B, seq_len)
    stop = set(params.stop_token_ids)

    # The decode step's inputs, one column per slot: the token to feed, its position, and
    # which (prompt, sample) the slot holds, for the sampling noise. Fixed address and shape.
    state = torch.zeros(4, B, dtype=torch.long, device=device)

    def decode_step(kv_len):
        return decode(model, cache, state, params, kv_len)

    # A step attends over the first attend_len(...) cache positions: attention costs the live
    # length, and a CUDA graph is recorded once per length bucket (at most log2(cache length)
    # of them), not once per step.
    graphs, pool = {}, None
    if use_cuda_graph and device.type == "cuda":
        pool = torch.cuda.graph_pool_handle()

    def step(kv_len):
        if pool is None:
            return decode_step(kv_len)
        if kv_len not in graphs:
            # Its warm-up runs write this step's keys/values, the same ones the replay writes.
            graphs[kv_len] = cuda_graph(lambda: decode_step(kv_len), pool)
        return graphs[kv_len]()

    was_training = model.training
    model.eval()
    try:
        waiting = deque((p, s) for p in range(len(prompts)) for s in range(params.n))
        slot_seq = [None] * B                  # (prompt, sample) in each slot, None when idle
        slot_token, slot_pos = [0] * B, [0] * B
        generated = {}                          # (prompt, sample) -> (token ids, logprobs)
        results = [None] * n_seqs
        last_admitted = None                    # (prompt, slot) of the most recent admission

        while True:
            for slot in range(B):
                if slot_seq[slot] is not None or not waiting:
                    continue
                p, s = waiting.popleft()
                prompt = prompts[p]
                if last_admitted is not None and last_admitted[0] == p:
                    # The prompt's keys/values sit untouched in the slot of its previous sample
                    # (decoding writes from position L-1 on), so copy instead of prefilling.
                    src = last_admitted[1]
                    if src != slot and len(prompt) > 1:
                        cache.k[:, slot, :, :len(prompt) - 1] = cache.k[:, src, :, :len(prompt) - 1]
                        cache.v[:, slot, :, :len(prompt) - 1] = cache.v[:, src, :, :len(prompt) - 1]
                else:
                    prefill(model, cache, prompt, slot)
                last_admitted = (p, slot)
                slot_seq[slot] = (p, s)
                slot_token[slot], slot_pos[slot] = prompt[-1], len(prompt) - 1
                generated[p, s] = ([], [])
            if all(seq is None for seq in slot_seq):
                break

            # Idle slots (nothing left to admit) decode a dummy token at position 0 of their own row.
            seqs = [seq or (0, 0) for seq in slot_seq]
            state.copy_(torch.tensor([slot_token, slot_pos, [keys[p] for p, _ in seqs],
                                      [s for _, s in seqs]]))
            next_ids, logprobs = step(attend_len(max(slot_pos), cache.max_seq_len))
            next_ids, logprobs = next_ids.tolist(), logprobs.tolist()

            for slot, seq in enumerate(slot_seq):
                if seq is None:
                    continue
                ids, lps = generated[seq]
                ids.append(next_ids[slot])
                lps.append(logprobs[slot])
                finished = ("stop" if next_ids[slot] in stop else
                            "length" if len(ids) == params.max_new_tokens else None)
                if finished:
                    p, s = seq
                    results[p * params.n + s] = Completion(p, s, ids, lps, finished)
                    del generated[seq]
                    slot_seq[slot], slot_token[slot], slot_pos[slot] = None, 0, 0
                else:
                    slot_token[slot], slot_pos[slot] = next_ids[slot], slot_pos[slot] + 1
        return results
    finally:
        model.train(was_training)
