"""rollout.generate against transformers' greedy decoding, a full forward pass, and softmax(logits / T)."""

import pytest
import torch
import transformers

from checkpoint import load_pretrained
from rollout import SamplingParams, generate

VOCAB = 320


def tiny_model(tmp_path, vocab_size=VOCAB, logit_scale=1.0, seed=0):
    """A random 2-layer Qwen2 saved by transformers and loaded by checkpoint.load_pretrained.
    `logit_scale` multiplies the LM head so that next-token distributions are far from uniform."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=False,
                                   rope_theta=10000.0)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(logit_scale)
    hf.save_pretrained(tmp_path / "hf")
    return hf, load_pretrained(tmp_path / "hf")


def random_prompts(lengths, seed=1, vocab_size=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def full_forward_logprobs(model, prompt, completion, temperature):
    """Log-probs of the completion tokens from one forward pass over prompt + completion."""
    ids = torch.tensor(prompt + completion)[None]
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:-1].float()
    return (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def chi_square(counts, probs):
    expected = probs * counts.sum()
    return ((counts - expected) ** 2 / expected).sum().item()


def first_token_samples(model, prompt, params, n):
    out = generate(model, [prompt], SamplingParams(**{**params, "n": n, "max_new_tokens": 1}),
                   max_batch_size=512)
    return torch.tensor([c.token_ids[0] for c in out])


def first_token_probs(model, prompt, temperature):
    with torch.no_grad():
        return (model(torch.tensor(prompt)[None])[0, -1] / temperature).softmax(-1)


def test_greedy_matches_transformers_generate(tmp_path):
    hf, ours = tiny_model(tmp_path)
    prompts = random_prompts([5, 17, 1, 11])
    out = generate(ours, prompts, SamplingParams(temperature=0, max_new_tokens=24), max_batch_size=3)
    assert [c.prompt_index for c in out] == [0, 1, 2, 3]
    for i, (prompt, c) in enumerate(zip(prompts, out)):
        ref = hf.generate(torch.tensor(prompt)[None], do_sample=False, max_new_tokens=24,
                          min_new_tokens=24, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert c.token_ids == ref.tolist(), f"prompt {i} (length {len(prompt)}): greedy differs"
        assert c.finish_reason == "length"


def test_logprobs_equal_full_forward(tmp_path):
    # n > 1 with 3 slots exercises the KV copy between a prompt's samples and slot refills;
    # a wrong cache would show up as log-probs that differ from the uncached forward pass.
    _, ours = tiny_model(tmp_path, logit_scale=4.0)
    prompts = random_prompts([6, 13, 2])
    for temperature in (0.7, 0):
        params = SamplingParams(temperature=temperature, max_new_tokens=12, n=3, seed=5)
        for c in generate(ours, prompts, params, max_batch_size=4):
            ref = full_forward_logprobs(ours, prompts[c.prompt_index], c.token_ids, temperature or 1.0)
            got = torch.tensor(c.logprobs)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=lambda m: (
                f"T={temperature} prompt {c.prompt_index} sample {c.sample_index}: max diff "
                f"{(got - ref).abs().max():.2e}\n{m}"))


def test_first_token_frequencies_match_softmax_over_temperature(tmp_path):
    _, ours = tiny_model(tmp_path, vocab_size=16, logit_scale=20.0)
    prompt = random_prompts([7], vocab_size=16)[0]
    probs = first_token_probs(ours, prompt, 0.7)
    tokens = first_token_samples(ours, prompt, dict(temperature=0.7, seed=3), 4000)
    counts = torch.bincount(tokens, minlength=16).double()
    # Pool tokens expected fewer than 5 times, as the chi-square approximation needs.
    rare = probs * 4000 < 5
    counts = torch.cat([counts[~rare], counts[rare].sum()[None]])
    probs = torch.cat([probs[~rare], probs[rare].sum()[None]]).double()
    stat, df = chi_square(counts, probs), len(probs) - 1
    assert df >= 4, "the test needs several tokens with non-negligible probability"
    # 0.999 quantile of chi-square(df) by Wilson-Hilferty: a fixed-seed test that fails if the
    # sampler draws from anything but softmax(logits / T).
    z = 3.0902
    critical = df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f} (df {df}): counts {counts.tolist()}"
    # The same counts against T = 1 must fail, or the test has no power.
    hot = first_token_probs(ours, prompt, 1.0)
    hot = torch.cat([hot[~rare], hot[rare].sum()[None]]).double()
    assert chi_square(counts, hot) > 10 * critical


def test_top_k_and_top_p_never_emit_excluded_tokens(tmp_path):
    _, ours = tiny_model(tmp_path, vocab_size=16, logit_scale=20.0)
    prompt = random_prompts([7], vocab_size=16)[0]
    probs = first_token_probs(ours, prompt, 1.0)
    order = probs.argsort(descending=True)
    top_k = set(order[:4].tolist())
    tokens = first_token_samples(ours, prompt, dict(temperature=1.0, top_k=4, seed=1), 2000)
    assert set(tokens.tolist()) == top_k, "top-k=4 must emit exactly the 4 most likely tokens"
    # The survivors keep their relative odds (renormalized softmax).
    counts = torch.bincount(tokens, minlength=16)[order[:4]].double()
    kept = probs[order[:4]].double()
    assert chi_square(counts, kept / kept.sum()) < 16.27  # chi-square(3) 0.999 quantile

    # Just below and just above the mass of the top 2 and top 3 tokens: an off-by-one in the
    # nucleus boundary either way changes the emitted set.
    cum = probs[order].cumsum(0)
    for top_p in (cum[1] - 0.01, cum[1] + 0.01, cum[2] - 0.01, cum[2] + 0.01):
        nucleus = set(order[(cum - probs[order]) < top_p].tolist())
        tokens = first_token_samples(ours, prompt, dict(temperature=1.0, top_p=top_p.item(), seed=2), 1000)
        assert set(tokens.tolist()) == nucleus, f"top_p={top_p:.3f} must emit exactly {sorted(nucleus)}"


def test_stop_tokens_and_max_new_tokens(tmp_path):
    _, ours = tiny_model(tmp_path)
    prompts = random_prompts([8, 3])
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    free = generate(ours, prompts, greedy)
    stop_id = free[0].token_ids[3]
    assert stop_id not in free[0].token_ids[:3] and stop_id not in free[1].token_ids
    out = generate(ours, prompts, SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=(stop_id,)))
    assert out[0].token_ids == free[0].token_ids[:4] and out[0].finish_reason == "stop"
    assert len(out[0].logprobs) == 4
    assert out[1].token_ids == free[1].token_ids and out[1].finish_reason == "length"


def test_continuous_batching_equals_one_at_a_time(tmp_path):
    # Stop tokens make sequences end at different steps, so slots are refilled mid-flight.
    _, ours = tiny_model(tmp_path, logit_scale=4.0)
    prompts = random_prompts([9, 3, 14, 1, 6])
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=30, n=3, seed=11,
                            stop_token_ids=tuple(range(0, VOCAB, 16)))
    runs = {b: generate(ours, prompts, params, max_batch_size=b) for b in (1, 2, 7, 64)}
    reference = [(c.token_ids, c.finish_reason) for c in runs[1]]
    lengths = [len(ids) for ids, _ in reference]
    assert len(set(lengths)) > 3 and "stop" in {r for _, r in reference}, "test needs ragged finishes"
    for b, out in runs.items():
        assert [(c.prompt_index, c.sample_index) for c in out] == [(p, s) for p in range(5) for s in range(3)]
        assert [(c.token_ids, c.finish_reason) for c in out] == reference, f"max_batch_size={b} differs"
        for c, r in zip(out, runs[1]):
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(r.logprobs), atol=1e-5, rtol=0)


def test_sampling_is_reproducible_and_seeded(tmp_path):
    _, ours = tiny_model(tmp_path, logit_scale=4.0)
    prompts = random_prompts([5, 8])
    params = SamplingParams(temperature=1.0, max_new_tokens=16, n=4, seed=7)
    a = [c.token_ids for c in generate(ours, prompts, params)]
    assert a == [c.token_ids for c in generate(ours, prompts, params)]
    assert len({tuple(t) for t in a[:4]}) == 4, "samples of one prompt must differ"
    params.seed = 8
    b = [c.token_ids for c in generate(ours, prompts, params)]
    assert sum(x != y for x, y in zip(a, b)) >= 6


def test_bf16_model_logprobs_match_its_full_forward(tmp_path):
    _, ours = tiny_model(tmp_path, logit_scale=4.0)
    ours = ours.to(torch.bfloat16)
    prompts = random_prompts([6, 10])
    out = generate(ours, prompts, SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=2))
    for c in out:
        ref = full_forward_logprobs(ours, prompts[c.prompt_index], c.token_ids, 1.0)
        # bf16 attention over a padded static cache vs an unpadded causal pass: bf16 rounding only.
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=0.1, rtol=0)


def test_restores_training_mode(tmp_path):
    _, ours = tiny_model(tmp_path)
    ours.train()
    generate(ours, [[1, 2, 3]], SamplingParams(max_new_tokens=2))
    assert ours.training
    ours.eval()
    generate(ours, [[1, 2, 3]], SamplingParams(max_new_tokens=2))
    assert not ours.training


@pytest.mark.parametrize("prompts,params,match", [
    ([[1, 2], []], SamplingParams(), r"prompts\[1\] is empty"),
    ([[1, 2], [3, VOCAB]], SamplingParams(), r"prompts\[1\]\[1\]: token id 320"),
    ([[1]], SamplingParams(top_p=0), "top_p"),
    ([[1]], SamplingParams(temperature=-1), "temperature"),
    ([[1]], SamplingParams(n=0), r"SamplingParams\.n"),
    ([[1]], SamplingParams(seed=2**32), "seed"),
    ([[1]], SamplingParams(stop_token_ids=(VOCAB,)), "stop_token_ids"),
])
def test_bad_input_errors_name_the_field(tmp_path, prompts, params, match):
    _, ours = tiny_model(tmp_path)
    with pytest.raises(ValueError, match=match):
        generate(ours, prompts, params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph decode needs a GPU")
def test_cuda_graph_decode_equals_eager(tmp_path):
    _, ours = tiny_model(tmp_path, logit_scale=4.0)
    ours = ours.cuda()
    prompts = random_prompts([9, 3, 14, 1])
    params = SamplingParams(temperature=1.0, max_new_tokens=20, n=2, seed=3,
                            stop_token_ids=tuple(range(0, VOCAB, 16)))
    graph = generate(ours, prompts, params, max_batch_size=3, use_cuda_graph=True)
    eager = generate(ours, prompts, params, max_batch_size=3, use_cuda_graph=False)
    assert [c.token_ids for c in graph] == [c.token_ids for c in eager]
