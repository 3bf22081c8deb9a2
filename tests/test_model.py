"""model.py against transformers' own implementations, with the same random weights."""

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from checkpoint import load_pretrained, save_pretrained
from kvcache import KVCache
from model import ModelConfig, Transformer

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6)


def hf_model(family, kv_heads=2, tied=False, seed=0):
    torch.manual_seed(seed)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**TINY, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                                       rope_theta=10000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family == "llama":
        cfg = transformers.LlamaConfig(
            **TINY, num_key_value_heads=kv_heads, tie_word_embeddings=tied, rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=64))
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(**TINY, num_key_value_heads=kv_heads, head_dim=32,
                                       tie_word_embeddings=tied)
        model = transformers.Qwen3ForCausalLM(cfg)
    # Random (non-unit) norm weights and biases so that every parameter is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def saved_hf(tmp_path, family, **kw):
    model = hf_model(family, **kw)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def assert_logits_close(ours, ref, what):
    diff = (ours - ref).abs()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0,
                               msg=f"{what}: max diff {diff.max():.2e}, mean {diff.mean():.2e}")


@pytest.mark.parametrize("family,kv_heads,tied", [
    ("qwen2", 2, False), ("qwen2", 4, True), ("llama", 2, False), ("llama", 4, True),
    ("qwen3", 2, False), ("qwen3", 1, True),
])
def test_logits_match_transformers(tmp_path, family, kv_heads, tied):
    ref, path = saved_hf(tmp_path, family, kv_heads=kv_heads, tied=tied)
    ours = load_pretrained(path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 37))
    with torch.no_grad():
        assert_logits_close(ours(ids), ref(ids).logits, f"{family} kv={kv_heads} tied={tied}")


def test_long_positions_use_llama3_rope_scaling(tmp_path):
    # Positions past original_max_position_embeddings exercise the rescaled frequencies.
    ref, path = saved_hf(tmp_path, "llama")
    ours = load_pretrained(path)
    ids = torch.randint(0, TINY["vocab_size"], (1, 200))
    with torch.no_grad():
        assert_logits_close(ours(ids), ref(ids).logits, "llama3 rope at 200 positions")


def test_sharded_checkpoint_loads(tmp_path):
    ref = hf_model("qwen2")
    ref.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = load_pretrained(tmp_path / "hf")
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    with torch.no_grad():
        assert_logits_close(ours(ids), ref(ids).logits, "sharded checkpoint")


def test_left_padded_batch_matches_transformers_and_unpadded(tmp_path):
    ref, path = saved_hf(tmp_path, "qwen2")
    ours = load_pretrained(path)
    lengths = [20, 13, 7]
    T = max(lengths)
    ids = torch.randint(1, TINY["vocab_size"], (3, T))
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    ids = ids * mask  # pad id 0 on the left
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask)
        hf = ref(ids, attention_mask=mask, position_ids=positions).logits
        for b, n in enumerate(lengths):
            alone = ours(ids[b:b + 1, T - n:])[0]
            assert_logits_close(logits[b, T - n:], alone, f"row {b} padded vs alone")
            assert_logits_close(logits[b, T - n:], hf[b, T - n:], f"row {b} vs transformers")


def test_right_padding_does_not_change_real_tokens(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2")
    ours = load_pretrained(path)
    ids = torch.randint(1, TINY["vocab_size"], (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask)
        assert_logits_close(logits[1, :8], ours(ids[1:, :8])[0], "right padded row")
        assert torch.isfinite(logits).all()


def test_save_pretrained_loads_in_transformers(tmp_path):
    for family, tied in [("qwen2", True), ("llama", False), ("qwen3", False)]:
        _, path = saved_hf(tmp_path / family, family, tied=tied)
        ours = load_pretrained(path)
        save_pretrained(ours, tmp_path / family / "ours")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / family / "ours").eval()
        ids = torch.randint(0, TINY["vocab_size"], (2, 24))
        with torch.no_grad():
            assert_logits_close(back(ids).logits, ours(ids), f"{family} round trip")


def test_save_pretrained_shards_and_reloads(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2")
    ours = load_pretrained(path)
    save_pretrained(ours, tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = load_pretrained(tmp_path / "out")
    ids = torch.randint(0, TINY["vocab_size"], (1, 9))
    with torch.no_grad():
        assert_logits_close(again(ids), ours(ids), "our sharded save")


def test_kv_cache_decode_matches_full_forward(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2")
    model = load_pretrained(path)
    lengths, new = [9, 5, 7], 6
    full = [torch.randint(0, TINY["vocab_size"], (n + new,)) for n in lengths]
    cache = KVCache(model.config, batch_size=3, max_seq_len=32)
    P = max(lengths)
    # Right-padded prefill; the padding's cache entries are overwritten before anyone sees them.
    prompt = torch.zeros(3, P, dtype=torch.long)
    for b, n in enumerate(lengths):
        prompt[b, :n] = full[b][:n]
    positions = torch.arange(P).expand(3, P)
    with torch.no_grad():
        logits = model.lm_head(model.prefill(prompt, positions, cache))
        got = [[logits[b, n - 1]] for b, n in enumerate(lengths)]
        for step in range(new - 1):
            tok = torch.stack([full[b][n + step] for b, n in enumerate(lengths)])[:, None]
            pos = torch.tensor(lengths)[:, None] + step
            out = model.decode(tok, pos, cache)
            for b in range(3):
                got[b].append(out[b, 0])
        for b, n in enumerate(lengths):
            ref = model(full[b][None, :n + new - 1])[0, n - 1:]
            assert_logits_close(torch.stack(got[b]), ref, f"row {b} cached decode")


def test_kv_cache_attends_only_the_first_kv_len_positions(tmp_path):
    # rollout.py decodes with kv_len = a power of two above the furthest position; the keys past
    # it are stale entries of earlier sequences, which the full-length mask hides too
    _, path = saved_hf(tmp_path, "qwen2")
    model = load_pretrained(path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    cache = KVCache(model.config, batch_size=2, max_seq_len=64)
    cache.k.normal_()  # stale garbage everywhere, as after earlier sequences
    cache.v.normal_()
    with torch.no_grad():
        model.prefill(ids[:, :11], torch.arange(11).expand(2, 11), cache)
        out = model.decode(ids[:, 11:], torch.tensor([[11], [11]]), cache, kv_len=16)[:, 0]
        assert_logits_close(out, model(ids)[:, -1], "decode over the first 16 cache positions")
        short = model.decode(ids[:, 11:], torch.tensor([[11], [11]]), cache, kv_len=8)[:, 0]
        assert (short - out).abs().max() > 1e-3, "kv_len below the position must drop keys"


def test_kv_cache_slot_refill(tmp_path):
    # Continuous batching: refill slot 1 with a new prompt while slot 0 keeps decoding.
    _, path = saved_hf(tmp_path, "qwen2")
    model = load_pretrained(path)
    cache = KVCache(model.config, batch_size=2, max_seq_len=32)
    a = torch.randint(0, TINY["vocab_size"], (10,))
    b = torch.randint(0, TINY["vocab_size"], (14,))
    c = torch.randint(0, TINY["vocab_size"], (4,))
    with torch.no_grad():
        model.prefill(a[None, :8], torch.arange(8)[None], cache, cache_slots=torch.tensor([0]))
        model.prefill(b[None], torch.arange(14)[None], cache, cache_slots=torch.tensor([1]))
        model.prefill(c[None], torch.arange(4)[None], cache, cache_slots=torch.tensor([1]))
        out = model.decode(torch.stack([a[8:9], a[8:9] * 0 + 7]), torch.tensor([[8], [4]]), cache)
        assert_logits_close(out[0, 0], model(a[None, :9])[0, -1], "slot 0 after refill of slot 1")
        ref_c = model(torch.cat([c, torch.tensor([7])])[None])[0, -1]
        assert_logits_close(out[1, 0], ref_c, "refilled slot 1")


def test_packed_rows_equal_separate_documents(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2")
    model = load_pretrained(path)
    docs = [torch.randint(0, TINY["vocab_size"], (n,)) for n in (7, 11, 5)]
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=positions)[0]
        start = 0
        for i, d in enumerate(docs):
            assert_logits_close(packed[start:start + len(d)], model(d[None])[0], f"document {i}")
            start += len(d)


def test_hidden_states_and_lm_head_give_logits(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2", tied=True)
    model = load_pretrained(path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        h = model(ids, hidden_only=True)
        assert h.shape == (2, 10, TINY["hidden_size"])
        assert_logits_close(h @ model.lm_head.weight.T, model(ids), "hidden @ W^T")
    assert model.lm_head.weight is model.embed_tokens.weight


def test_gradient_checkpointing_gives_same_gradients(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2")
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    grads = []
    for ckpt in (False, True):
        model = load_pretrained(path).train()
        model.gradient_checkpointing = ckpt
        model(ids).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_checkpoint_slices_read_rows_and_meta_build_holds_no_memory(tmp_path):
    from checkpoint import iter_checkpoint
    ref, path = saved_hf(tmp_path, "qwen2")
    config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    with torch.device("meta"):
        model = Transformer(config)
    assert all(p.is_meta for p in model.parameters())
    names = {n: tuple(p.shape) for n, p in model.named_parameters()}
    slices = dict(iter_checkpoint(path, names, config.tie_word_embeddings))
    full = ref.state_dict()["model.layers.1.mlp.up_proj.weight"]
    torch.testing.assert_close(slices["layers.1.mlp.up_proj.weight"][3:7], full[3:7])
    with pytest.raises(ValueError, match="lacks"):
        list(iter_checkpoint(path, names | {"extra.weight": (2,)}, config.tie_word_embeddings))


def test_bad_checkpoint_errors_name_the_problem(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2")
    save_file({"model.bogus.weight": torch.zeros(2)}, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="bogus"):
        load_pretrained(path)
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_pretrained(empty)


def test_targets_path_gives_logprobs_and_entropy_of_the_logits(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2", tied=True)
    model = load_pretrained(path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    targets = torch.randint(0, TINY["vocab_size"], (2, 10))
    logprobs, entropy = model(ids, targets=targets, temperature=0.7)
    ref = torch.log_softmax(model(ids).detach() / 0.7, -1)
    torch.testing.assert_close(logprobs.detach(), ref.gather(-1, targets[..., None])[..., 0])
    torch.testing.assert_close(entropy.detach(), -(ref.exp() * ref).sum(-1))
    logprobs.sum().backward()
    assert model.embed_tokens.weight.grad is not None
