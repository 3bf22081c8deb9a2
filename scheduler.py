"""The host side of the sampler (rollout.Sampler): which sequence each decode slot holds, which
KV pages it holds, who waits, who is preempted, and the prefill of newly admitted prompts.

    batch = Scheduler(cache, prompts, params, n_slots)      # prompts: [Prompt]
    batch.admit(model); batch.reserve(); cache.sync()       # before each decode step
    batch.advance(next_ids, logprobs)                       # after it: tokens appended, ends released
"""

from collections import deque
from dataclasses import dataclass, fields

import torch

from kvcache import long_tensor


PREFILL_TOKENS = 8192   # prompt tokens per prefill forward, at most (one prompt, if it is longer)
# Admission counts on each decoding sequence taking this share of the pages it is expected to
# grow into (1: all of them, so almost nothing is ever preempted, and fewer run at once); lower
# runs more at once and preempts more. The README's benchmark table has what 0.3 gives.
PACE = 0.3


@dataclass
class Prompt:
    """A prompt to sample from, with what is its own: its tokens, the key of its sampling noise
    (a data-parallel caller passes its global index, so the same prompt draws the same traces
    whatever the number of ranks), and its own limit. It travels whole through the TP gather
    (tp.generate_in_group), the sampler and the scheduler, so a per-prompt setting is a field here
    and the place that reads it."""
    ids: list[int]
    key: int
    max_new_tokens: int | None = None   # this prompt's own limit; None: SamplingParams.max_new_tokens

    def limit(self, params) -> int:
        return self.max_new_tokens or params.max_new_tokens

    @classmethod
    def of(cls, ids, key, record: dict) -> "Prompt":
        """The prompt of a data record (data.py), with the record's own settings: the fields after
        ids and key that the record holds."""
        return cls(ids, key, **{f.name: record[f.name] for f in fields(cls)[2:] if f.name in record})


def as_prompts(prompts, keys=None) -> list[Prompt]:
    """Token-id lists (each keyed by keys[i], default i) as Prompts; Prompts as they are."""
    return [p if isinstance(p, Prompt) else Prompt(list(p), i if keys is None else keys[i])
            for i, p in enumerate(prompts)]


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    token_ids: list[int]     # generated tokens, the stop token included when there was one
    logprobs: list[float]    # one fp32 log-prob per generated token, under softmax(logits / T)
    finish_reason: str       # "stop" or "length"


@torch.no_grad()
def prefill(model, cache, prefixes):
    """Write the keys/values of several prompts at once: prefixes is [(token ids, pages, start)],
    each prompt's ids but its last (the first decode input, so that the first sampled token comes
    out of a decode step like every other), the pages that hold them, and how many leading
    positions those pages hold already (shared with another prompt: not computed again). One
    forward, the prompts packed as documents that never attend to each other."""
    prefixes = [(ids, pages, start) for ids, pages, start in prefixes if len(ids) > start]
    if not prefixes:
        return
    device, P = cache.k.device, cache.page_size
    ids = [t for p, _, start in prefixes for t in p[start:]]
    index = [pages[j // P] * P + j % P for p, pages, start in prefixes for j in range(start, len(p))]
    positions = [j for p, _, start in prefixes for j in range(start, len(p))]
    contexts = [(start, pages) for _, pages, start in prefixes] if any(start for _, _, start in prefixes) else None
    model.prefill(torch.tensor(ids, device=device)[None], torch.tensor(positions, device=device)[None], cache,
                  cache_index=torch.tensor(index, device=device)[None],
                  doc_lens=[len(p) - start for p, _, start in prefixes], contexts=contexts)


@dataclass
class RolloutStats:
    peak_sequences: int = 0     # sequences decoding at once, at most
    peak_kv_bytes: int = 0      # bytes of KV pages held at once, at most
    pool_pages: int = 0         # pages in the pool (one of them scratch)
    page_size: int = 0
    page_bytes: int = 0         # bytes of one page (every layer's keys and values)
    preemptions: int = 0        # sequences sent back to wait for pages (and regenerated exactly)
    prompt_tokens: int = 0      # prompt positions admitted fresh (what a prefill without sharing computes)
    prefill_tokens: int = 0     # of them computed: the rest were in pages shared with prompts in flight
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

    def __init__(self, cache, prompts: list[Prompt], params, n_slots, share_prefixes=True):
        self.cache, self.params, self.share_prefixes = cache, params, share_prefixes
        self.prompts, self.keys = [p.ids for p in prompts], [p.key for p in prompts]
        self.limits = [p.limit(params) for p in prompts]
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

    def expected_pages(self, p, pos, held):
        """Pages a sequence of prompt p (which caches all its positions but the last), now at
        `pos` and holding `held` pages (shared ones included), is counted on to take beyond them:
        up to its next position, and PACE of the way from there to the length sequences have been
        ending at (the mean of the finished ones; half of its limit before any has finished)."""
        cached, limit = len(self.prompts[p]) - 1, self.limits[p]
        length = self.finished_tokens / self.finished if self.finished else limit / 2
        end = max(pos + 1, min(cached + 1 + round(length), cached + limit))
        end = pos + 1 + round((end - pos - 1) * PACE)
        return max(0, self.cache.pages_for(end) - held)

    def growth(self):
        """Pages the busy sequences are expected to take before they end. Admitting into them
        would have the newcomers preempted (their work lost) as soon as the others grow; this
        only paces admission, results never depend on it."""
        return sum(self.expected_pages(self.seq[s][0], self.pos[s], len(self.cache.tables[s])) for s in self.order)

    def admit(self, model):
        """Fill idle slots from the front of the waiting sequences while pages last (at least the
        front when nothing decodes: the class's progress rule); prefill their new prompts together,
        each past the leading full pages it shares with prompts in flight (KVCache.shared_prefix).
        A new prompt that would share pages another one of this prefill is about to write waits
        for the next step, when it can (the first of many judge prompts that begin alike goes
        alone, the others then share its pages)."""
        cache, P = self.cache, self.cache.page_size
        if not self.waiting or len(self.order) == len(self.seq):
            return
        free, growth = len(cache.free), self.growth()
        new, to_prefill, shared, tokens = [], [], {}, 0
        for slot in range(len(self.order), len(self.seq)):  # the idle slots
            if not self.waiting:
                break
            p, s = self.waiting[0]
            cached = len(self.prompts[p]) - 1  # positions the prefill writes
            fresh = p not in self.prefixes and p not in to_prefill
            computed = prefix = 0  # a prompt prefilled already: its pages are held
            if fresh:
                shared[p], computed, prefix = self.fresh_prefix(p, cached)
                if to_prefill and self.shares_more_with(p, len(shared[p]), to_prefill):
                    break
            # The prefix's full pages are shared: the sample's own pages start at the partial one.
            need = prefix + self.expected_pages(p, cached, cached // P)
            if fresh and to_prefill and tokens + computed > PREFILL_TOKENS:
                break
            if need + growth > free:
                if self.order or new:
                    break
                # to start: its prefix (whole: the pages it shared may go with the others') and one page
                free = self.make_room_for_front((cache.pages_for(cached) if fresh else 0) + 1)
                if fresh:  # what it shares once the other prompts' prefixes are let go
                    shared[p], computed, prefix = self.fresh_prefix(p, cached)
                    need = prefix + self.expected_pages(p, cached, cached // P)
            free -= need
            self.waiting.popleft()
            new.append((slot, p, s))
            if fresh:
                to_prefill.append(p)
                tokens += computed
                self.stats.prompt_tokens += cached
        if to_prefill:
            for p in to_prefill:
                samples = sum(q == p for q, _ in self.waiting) + sum(q == p for _, q, _ in new)
                own = cache.take(cache.pages_for(len(self.prompts[p]) - 1) - len(shared[p]))
                self.prefixes[p] = [cache.share(shared[p]) + own, samples]
            prefill(model, cache, [(self.prompts[p][:-1], self.prefixes[p][0], P * len(shared[p])) for p in to_prefill])
            for p in to_prefill:
                cache.remember(self.prompts[p][:-1], self.prefixes[p][0])
            self.stats.prefill_tokens += tokens
            self.stats.prefill_forwards += 1
        for slot, p, s in new:
            self.start(slot, p, s)

    def fresh_prefix(self, p, cached):
        """A prompt not prefilled yet: the pages of its `cached` positions it shares with prompts in
        flight (KVCache.shared_prefix), the positions the prefill computes, its own pages."""
        shared = self.cache.shared_prefix(self.prompts[p][:cached]) if self.share_prefixes else []
        return shared, cached - self.cache.page_size * len(shared), self.cache.pages_for(cached) - len(shared)

    def shares_more_with(self, p, found, pending) -> bool:
        """Whether prompt p has more leading full pages in common with a prompt of this prefill
        (not yet written, so not shareable yet) than the `found` it shares already."""
        cached = len(self.prompts[p]) - 1
        pages = cached // self.cache.page_size
        if pages <= found:
            return False
        span = (found + 1) * self.cache.page_size  # one page past what is shared already
        return any(self.prompts[q][:span] == self.prompts[p][:span] and len(self.prompts[q]) - 1 >= span
                   for q in pending)

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
        n, done = len(self.order), []
        for slot, t, lp, ids, lps in zip(range(n), next_ids, logprobs, self.ids, self.lps):
            ids.append(t)
            lps.append(lp)
            if t in self.stop or len(ids) == self.limits[self.seq[slot][0]]:
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
