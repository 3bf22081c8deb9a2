"""The paged scheduler at the budgets users hit: from the least that cache_pages accepts up, a page
at a time, over random small configurations, on the eager path and on the bucketed path that CUDA
graphs take (simulated on the CPU: the same batch and length buckets, nothing recorded). Every run
finishes, draws exactly the unbudgeted tokens (of a run that shares no prefix pages) and gives every
page back. The states where the old
scheduler stalled (nothing decoding, the front refused for pages that kept prefixes held or that
it charged twice) are rare enough that no sweep here reaches them: the last tests build them."""

import random

import pytest
import torch

import rollout
import scheduler
import kvcache
from distributed import init_weights
from kvcache import KVCache
from model import ModelConfig, Transformer
from rollout import SamplingParams, generate

VOCAB, PAGE = 48, 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1))
    init_weights(m, seed=0)
    return m.eval()


def configuration(seed):
    """Prompts whose cached positions end just before, on, and just after page boundaries; n from
    1 to 7; stop tokens and T > 1, so that lengths vary and slots free up at different steps."""
    rng = random.Random(seed)
    lengths = [PAGE * rng.randint(1, 4) + rng.choice((-1, 0, 1, 2)) for _ in range(rng.randint(1, 4))]
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
    for p in prompts[1:]:  # some begin with the first prompt's leading pages: shared while both are in flight
        common = min(PAGE * rng.randint(0, 3), len(p), len(prompts[0]))
        p[:common] = prompts[0][:common]
    params = SamplingParams(temperature=1.5, max_new_tokens=rng.randint(4, 14), n=rng.randint(1, 7),
                            stop_token_ids=tuple(rng.sample(range(VOCAB), 5)), seed=seed)
    return prompts, params, rng.choice((2, 3, 8, 64))


@pytest.fixture
def bucketed(monkeypatch):
    """generate's CUDA-graph path on the CPU: batches rounded up to powers of two (idle slots decode
    a dummy token), lengths to powers of two; the step runs eagerly. A run that takes far more
    decode steps than its tokens could need has stalled: on this path a stall (nothing decoding,
    something waiting) would replay idle slots forever, where the eager path fails at once."""
    steps = {"all": 0, "run": 0}

    def pool(device, use_cuda_graph):  # called once per generate: a new run
        steps["run"] = 0
        return "simulated"

    def no_record(fn, pool=None):
        def replay():
            steps["all"] += 1
            steps["run"] += 1
            if steps["run"] > 2_000:  # the configurations here need at most ~60 steps even one at a time
                raise RuntimeError("the scheduler stalled: 2,000 decode steps in one run")
            return fn()
        return replay
    monkeypatch.setattr(rollout, "graph_pool", pool)
    monkeypatch.setattr(rollout, "cuda_graph", no_record)
    return steps


def run(model, prompts, params, slots, pages, share_prefixes=True):
    budget = None if pages is None else pages * KVCache.bytes_per_slot(model.config, PAGE, torch.float32)
    out, stats = generate(model, prompts, params, max_batch_size=slots, kv_budget_bytes=budget, page_size=PAGE,
                          return_stats=True, share_prefixes=share_prefixes)
    assert stats.pages_held_at_end == 0, f"{pages} pages: {stats.pages_held_at_end} pages never came back"
    assert budget is None or stats.peak_kv_bytes <= budget
    return out, stats


def sweep(model, seeds):
    preempted = shared = 0
    for seed in seeds:
        prompts, params, slots = configuration(seed)
        reference, _ = run(model, prompts, params, slots, None, share_prefixes=False)  # each prompt prefilled whole
        least = kvcache.cache_pages(model.config, scheduler.as_prompts(prompts), params, torch.float32, None, 1, PAGE)
        for pages in range(least, least + 12):
            out, stats = run(model, prompts, params, slots, pages)
            where = f"seed {seed}, {pages} pages (least {least}), {slots} slots"
            assert [c.token_ids for c in out] == [c.token_ids for c in reference], where
            torch.testing.assert_close(torch.tensor([x for c in out for x in c.logprobs]),
                                       torch.tensor([x for c in reference for x in c.logprobs]),
                                       atol=1e-5, rtol=0, msg=lambda m: f"{where}: {m}")
            preempted += stats.preemptions
            shared += stats.prompt_tokens - stats.prefill_tokens
    assert preempted > 0, "the sweep must force preemptions"
    assert shared > 0, "the sweep must share prefix pages"


def test_every_budget_from_the_least_finishes_with_the_same_tokens(model):
    sweep(model, range(12))


def test_every_budget_finishes_on_the_bucketed_cuda_graph_path(model, bucketed):
    sweep(model, range(12))
    assert bucketed["all"] > 0, "the simulated graph path did not run"


def test_a_pool_that_cannot_hold_the_front_names_the_pages(model):
    """cache_pages refuses such a budget before the scheduler sees it; handed a pool that small
    anyway, the scheduler says what it needs and what is held instead of looping."""
    prompts, params = [[1] * 13], SamplingParams(temperature=0.0, max_new_tokens=8)
    cache = kvcache.new_cache(model, 1, 21, PAGE, 3)  # the prompt's 12 cached positions alone need 3 pages
    batch = scheduler.Scheduler(cache, scheduler.as_prompts(prompts), params, 1)
    with pytest.raises(RuntimeError, match=r"needs 4 pages to start and 2 are free"):
        batch.admit(model)


def scheduler_with_kept_prefixes(model, prompts, kept, waiting, n=2, max_new_tokens=4):
    """A Scheduler over the least pool cache_pages accepts, in a state a run reaches after
    preemptions: nothing decoding, prefixes kept for the prompts in `kept`, `waiting` in line."""
    from collections import deque
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, n=n)
    least = kvcache.cache_pages(model.config, scheduler.as_prompts(prompts), params, torch.float32, None, 1, PAGE)
    cache = kvcache.new_cache(model, 2, max(map(len, prompts)) + max_new_tokens, PAGE, least)
    batch = scheduler.Scheduler(cache, scheduler.as_prompts(prompts), params, 2)
    for p in kept:
        batch.prefixes[p] = [cache.take(cache.pages_for(len(prompts[p]) - 1)), sum(q == p for q, _ in waiting)]
    batch.waiting = deque(waiting)
    return batch, least


def test_admission_counts_a_prompts_shared_pages_once(model):
    """Prompt 0 caches 16 positions (4 full pages of 4, kept), prompt 1 caches 12 (3 pages, kept);
    the least pool is 11 pages (6 for one sequence of 17 + 4, 4 of prefix, 1 scratch), so 3 are
    free. The front, a sample of prompt 0, starts with its 4 shared pages and 1 of its own: it
    fits, and so does the next (prompt 1's 3 shared pages and 1 of its own). Charging the shared
    pages again (5 > 3) left nothing decoding and the front waiting for good."""
    prompts = [[1] * 17, [2] * 13]
    batch, least = scheduler_with_kept_prefixes(model, prompts, kept=(0, 1), waiting=[(0, 1), (1, 0), (1, 1)])
    assert least == 11 and len(batch.cache.free) == 3
    batch.admit(model)
    assert batch.order == [0, 1] and batch.seq[:2] == [(0, 1), (1, 0)]
    assert [len(t) for t in batch.cache.tables] == [5, 4] and list(batch.prefixes) == [1]


def test_nothing_decoding_lets_other_prompts_prefixes_go(model):
    """The front's prompt is fresh (4 pages of prefix + 1 of its own to start) and the prefixes
    kept for prompts 1 and 2 leave 4 of 10 pages free: they are let go, and the front starts."""
    prompts = [[1] * 17, [2] * 13, [3] * 13]
    batch, _ = scheduler_with_kept_prefixes(model, prompts, kept=(1, 2), waiting=[(0, 0), (0, 1), (1, 1), (2, 1)])
    assert len(batch.cache.free) == 4
    batch.admit(model)
    assert batch.seq[:2] == [(0, 0), (0, 1)]
    assert not batch.prefixes, "prompts 1 and 2 prefill again when their turn comes"
    assert len(batch.cache.free) == 10 - 4 - 2  # prompt 0's 4 full pages shared, a page of each sample's own
