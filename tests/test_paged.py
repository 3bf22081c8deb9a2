"""The paged KV cache (kvcache.py) and the sampler over it (rollout.generate): pages from a
budget, a prompt's pages shared by its samples, preemption, batched prefill."""

import pytest
import torch
import transformers

import scheduler
import kvcache
from checkpoint import load_pretrained
from kvcache import KVCache
from rollout import SamplingParams, generate

VOCAB = 320


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random 2-layer Qwen2, as transformers and as ours, with sharpened next-token
    distributions (so that greedy ties are unlikely)."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, rope_theta=10000.0)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(4.0)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, load_pretrained(path)


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def test_greedy_matches_transformers_across_page_boundaries(models):
    hf, ours = models
    # With pages of 4, a prompt of 8, 9 or 10 tokens caches 7, 8 or 9 positions: its last page is
    # just short of full, exactly full, or just begun. Two samples of each share its pages.
    prompts = prompts_of([8, 9, 10, 3])
    params = SamplingParams(temperature=0.0, max_new_tokens=10, n=2)
    out, stats = generate(ours, prompts, params, page_size=4, return_stats=True)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                          min_new_tokens=10, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out[2 * i].token_ids == ref == out[2 * i + 1].token_ids, f"prompt of {len(prompt)} tokens"
    assert stats.pages_held_at_end == 0


def test_samples_do_not_depend_on_page_size_or_budget(models):
    _, ours = models
    prompts = prompts_of([6, 13, 1, 9])
    params = SamplingParams(temperature=1.0, max_new_tokens=12, n=3, seed=5)
    static = generate(ours, prompts, params, page_size=6 + 13 + 12)  # one page per sequence: today's slots
    paged, roomy = generate(ours, prompts, params, page_size=4, return_stats=True)
    # room for a little over one longest sequence: sequences wait, get preempted, regenerate
    page = KVCache.bytes_per_slot(ours.config, 4, torch.float32)
    tight_budget = (kvcache.cache_pages(ours.config, scheduler.as_prompts(prompts), params, torch.float32, None, 1, 4) + 2) * page
    tight, stats = generate(ours, prompts, params, page_size=4, kv_budget_bytes=tight_budget, return_stats=True)
    assert stats.preemptions > 0 and roomy.preemptions == 0
    for name, other in (("paged", paged), ("paged under a tight budget", tight)):
        assert [c.token_ids for c in other] == [c.token_ids for c in static], name
        for a, b in zip(other, static):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    assert stats.peak_kv_bytes <= tight_budget
    assert stats.pages_held_at_end == roomy.pages_held_at_end == 0


def test_a_prompts_samples_share_its_pages(models):
    _, ours = models
    prompt = prompts_of([41])[0]  # 40 cached positions: 10 full pages of 4
    params = SamplingParams(temperature=1.0, max_new_tokens=3, n=7, seed=2)
    _, stats = generate(ours, [prompt], params, page_size=4, return_stats=True)
    page = KVCache.bytes_per_slot(ours.config, 4, torch.float32)
    # the prompt's 10 pages once, and each of 7 samples a page for its own tokens
    assert stats.peak_kv_bytes == (10 + 7) * page, stats
    assert stats.peak_sequences == 7 and stats.prefill_tokens == 40 and stats.prefill_forwards == 1


def test_new_prompts_are_prefilled_together(models, monkeypatch):
    _, ours = models
    calls = []
    real = scheduler.prefill
    monkeypatch.setattr(scheduler, "prefill", lambda model, cache, prefixes: calls.append(len(prefixes)) or
                        real(model, cache, prefixes))
    prompts = prompts_of([5, 7, 2, 9, 4])
    _, stats = generate(ours, prompts, SamplingParams(temperature=0.0, max_new_tokens=2, n=1), page_size=4,
                        return_stats=True)
    assert calls == [5] and stats.prefill_tokens == sum(len(p) - 1 for p in prompts)


def test_a_budget_too_small_for_one_sequence_names_what_it_needs(models):
    _, ours = models
    page = KVCache.bytes_per_slot(ours.config, 4, torch.float32)
    params = SamplingParams(temperature=0.0, max_new_tokens=8, n=1)
    # a 9-token prompt: 2 pages of prefix, 5 pages of sequence (9 + 8 positions), 1 scratch
    with pytest.raises(ValueError, match=r"needs 8 pages of 4 positions .* for one sequence of 9 \+ 8 tokens"):
        generate(ours, prompts_of([9]), params, page_size=4, kv_budget_bytes=7 * page)
    generate(ours, prompts_of([9]), params, page_size=4, kv_budget_bytes=8 * page)


def test_preemption_under_many_budgets_keeps_samples_and_pages(models):
    """Budgets from one sequence's worth up: preemption moves slots around (the highest busy slot
    fills a preempted one's hole), and no sequence may lose its page or leave one behind."""
    _, ours = models
    prompts = prompts_of([6, 13, 3, 9, 11, 2])
    params = SamplingParams(temperature=1.0, max_new_tokens=20, n=4, seed=9)
    static = generate(ours, prompts, params, page_size=13 + 20)
    page = KVCache.bytes_per_slot(ours.config, 4, torch.float32)
    least = kvcache.cache_pages(ours.config, scheduler.as_prompts(prompts), params, torch.float32, None, 1, 4)
    preempted = 0
    for extra in range(0, 40, 3):
        out, stats = generate(ours, prompts, params, page_size=4, kv_budget_bytes=(least + extra) * page,
                              return_stats=True)
        assert [c.token_ids for c in out] == [c.token_ids for c in static], f"{least + extra} pages"
        torch.testing.assert_close(torch.tensor([lp for c in out for lp in c.logprobs]),
                                   torch.tensor([lp for c in static for lp in c.logprobs]), atol=1e-5, rtol=0)
        assert stats.pages_held_at_end == 0, f"{least + extra} pages"
        preempted += stats.preemptions
    assert preempted > 0


def test_prompts_in_flight_share_their_common_leading_pages_with_unchanged_results(models):
    hf, ours = models
    # a 40-token "system prompt" (10 pages of 4) before each question; one prompt twice; one unlike the rest
    system = prompts_of([40], seed=7)[0]
    questions = prompts_of([5, 9, 2, 7], seed=8)
    prompts = [system + q for q in questions] + [system + questions[0], prompts_of([23], seed=9)[0]]
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=3)
    alone, plain = generate(ours, prompts, params, page_size=4, return_stats=True, share_prefixes=False)
    shared, stats = generate(ours, prompts, params, page_size=4, return_stats=True)
    assert [c.token_ids for c in shared] == [c.token_ids for c in alone]
    torch.testing.assert_close(torch.tensor([x for c in shared for x in c.logprobs]),
                               torch.tensor([x for c in alone for x in c.logprobs]), atol=1e-5, rtol=0)
    # the first prompt goes alone and writes the 10 pages; the other four that begin with them share
    # them (the repeated prompt also its 11th: its own first 4 question tokens fill it, 44 cached in all)
    assert stats.prompt_tokens == plain.prompt_tokens == plain.prefill_tokens == sum(len(p) - 1 for p in prompts)
    assert stats.prefill_tokens == plain.prefill_tokens - 40 * 3 - 44
    assert stats.prefill_forwards == 2 and stats.pages_held_at_end == 0
    # greedy against transformers, each prompt alone: the shared pages hold what a whole prefill writes
    greedy = generate(ours, prompts, SamplingParams(temperature=0.0, max_new_tokens=6), page_size=4)
    for prompt, c in zip(prompts, greedy):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                          min_new_tokens=6, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert c.token_ids == ref
