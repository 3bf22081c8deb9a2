"""The CUDA code paths, checked on the CPU in the form CUDA gives them: the fused attention
kernels' output layout, NCCL's device map, attention over packed documents against the dense
reference, the KV budget, the bf16 reference model and the hook-free rollout module."""

import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

import distributed as D
import model as model_module
import plan
import rollout
import scheduler
import kvcache
from kvcache import KVCache
from model import ModelConfig, Transformer, build_mask, document_lengths, packed_attention
from grpo import GRPOConfig
from rollout import SamplingParams
from sft import SFTConfig

CPU = D.Context(rank=0, world_size=1, device=torch.device("cpu"))  # a plain process

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
CUDA_BUILD = torch.backends.cuda.is_built()
NEEDS_CUDA_BUILD = "fake CUDA tensors need a torch built with CUDA (the GPU check runs this)"


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(TINY).eval()


def assert_close(ours, ref, what, atol=1e-5):
    diff = (ours - ref).abs()
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0,
                               msg=f"{what}: max diff {diff.max():.2e}, mean {diff.mean():.2e}")


def fused_kernel_layout(sdpa):
    """SDPA whose output has the memory layout of CUDA's fused kernels: (B, H, T, Dh) as a
    transpose of (B, T, H, Dh) memory (CPU's kernels return it contiguous)."""
    def attention(*args, **kwargs):
        return sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)
    return attention


def test_prefill_decode_and_forward_take_the_fused_kernels_output_layout(monkeypatch):
    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (2, 12))
    with torch.no_grad():
        ref_full, ref_last = model(ids), model(ids)[:, -1]
        monkeypatch.setattr(F, "scaled_dot_product_attention",
                            fused_kernel_layout(F.scaled_dot_product_attention))
        assert_close(model(ids), ref_full, "forward")
        cache = KVCache(TINY, 3, 32)
        for slot, row in ((2, 0), (0, 1)):  # prefill one slot at a time, as scheduler.prefill does
            model.prefill(ids[row:row + 1, :11], torch.arange(11)[None], cache, cache_slots=torch.tensor([slot]))
        out = model.decode(ids[[1, 1, 0], 11:], torch.full((3, 1), 11), cache, kv_len=16)[:, 0]
        assert_close(out[0], ref_last[1], "decode, slot 0")
        assert_close(out[2], ref_last[0], "decode, slot 2")


def efficient_attention_meta(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
    """SDPA through the meta function of CUDA's memory-efficient kernel (expanding GQA and the
    boolean mask as SDPA's CUDA dispatch does), so fake tensors get that kernel's strides."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    bias = None
    if attn_mask is not None:
        bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~attn_mask, float("-inf")).expand(*q.shape[:3], k.shape[2])
    efficient = torch.ops.aten._scaled_dot_product_efficient_attention
    return efficient(q, k, v, bias, False, is_causal=is_causal)[0]


@pytest.mark.skipif(not CUDA_BUILD, reason=NEEDS_CUDA_BUILD)
def test_prefill_and_decode_on_fake_cuda_tensors(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", efficient_attention_meta)
    with torch.device("meta"):
        model = Transformer(TINY).to(torch.bfloat16)
    cuda = torch.device("cuda")
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device=cuda)
        model.inv_freq = torch.empty(model.inv_freq.shape, device=cuda)
        cache = kvcache.new_cache(model, 3, 32, page_size=4, n_pages=12)
        pages = cache.take(3)
        scheduler.prefill(model, cache, [([1] * 9, pages, 0)])
        # a second prompt that shares the first's 2 full pages prefills only past them (prefix sharing)
        shared = cache.share(pages[:2]) + cache.take(2)
        scheduler.prefill(model, cache, [([1] * 8 + [2] * 5, shared, 8), ([3] * 6, cache.take(2), 0)])
        cache.set_table(1, cache.share(pages))
        cache.sync()
        state = torch.zeros(4, 3, dtype=torch.long, device=cuda)
        next_ids, logprobs = rollout.decode(model, cache, state, SamplingParams(), 16)
        assert next_ids.shape == logprobs.shape == (3,) and next_ids.device.type == "cuda"
        assert model(torch.zeros(2, 7, dtype=torch.long, device=cuda)).shape == (2, 7, TINY.vocab_size)


@pytest.mark.skipif(not CUDA_BUILD, reason=NEEDS_CUDA_BUILD)
def test_tensor_parallel_prefill_and_decode_on_fake_cuda_tensors(monkeypatch, nccl_device_map):
    # Rank 0 of 8 in TP groups of 2, as under NCCL: the DTensor layout, the KV cache of 1/2 of the
    # KV heads, a prefill and a decode step whose all-reduces and all-gathers take CUDA tensors.
    import tp
    from torch.distributed.device_mesh import init_device_mesh
    monkeypatch.setattr(F, "scaled_dot_product_attention", efficient_attention_meta)
    mesh = init_device_mesh("cuda", (4, 2), mesh_dim_names=("dp", "tp"))["tp"]
    cuda = torch.device("cuda")
    with FakeTensorMode(allow_non_fake_inputs=True):
        decoder = tp.build(TINY, mesh, torch.bfloat16, cuda)
        assert decoder.layers[0].self_attn.k_proj.weight.to_local().shape[0] == TINY.num_key_value_heads // 2 * TINY.head_dim
        cache = kvcache.new_cache(decoder, 3, 32, page_size=4, n_pages=12)
        assert cache.k.shape[3] == TINY.num_key_value_heads // 2 and cache.k.device.type == "cuda"
        pages = cache.take(3)
        scheduler.prefill(decoder, cache, [([1] * 9, pages, 0)])
        scheduler.prefill(decoder, cache, [([1] * 8 + [2] * 5, cache.share(pages[:2]) + cache.take(2), 8)])
        cache.sync()
        state = torch.zeros(4, 3, dtype=torch.long, device=cuda)
        next_ids, logprobs = rollout.decode(decoder, cache, state, SamplingParams(), 16)
        assert next_ids.shape == logprobs.shape == (3,) and next_ids.device.type == "cuda"


@pytest.fixture
def nccl_device_map():
    """A process group with NCCL's device map (CUDA tensors only), this process as rank 0 of 8."""
    dist.init_process_group("cuda:fake", store=FakeStore(), rank=0, world_size=8)
    yield
    dist.destroy_process_group()


def test_comm_device_is_the_backends(nccl_device_map):
    assert D.comm_device().type == "cuda"
    with pytest.raises(RuntimeError, match="cpu"):
        dist.all_reduce(torch.ones(1))  # what NCCL says to a host tensor


@pytest.mark.skipif(not CUDA_BUILD, reason=NEEDS_CUDA_BUILD)
def test_collectives_take_host_tensors_under_nccls_device_map(nccl_device_map):
    with FakeTensorMode(allow_non_fake_inputs=True):
        for reduce in (D.all_reduce_sum, D.all_reduce_max, D.all_reduce_mean):
            out = reduce(torch.tensor([1.0, 2.0]))
            assert out.device.type == "cpu" and out.shape == (2,), reduce.__name__


def test_no_collective_outside_distributed_py():
    # Every collective goes through distributed.py, which sends it on the backend's device.
    pattern = re.compile(r"\bdist\.(all_reduce|all_gather|broadcast|reduce_scatter|reduce|gather|scatter)\b")
    offenders = [f"{path.name}:{n}" for path in ROOT.glob("*.py") if path.name != "distributed.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, f"collectives outside distributed.py: {offenders}"


def test_init_passes_the_timeout(monkeypatch):
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(D, "init_device_mesh", lambda *a: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    D.init(timeout_min=90)
    assert seen["timeout"] == datetime.timedelta(minutes=90)
    # NCCL's own default, 10 minutes, is shorter than ranks' rollouts can differ
    assert GRPOConfig().dist_timeout_min > 10 and SFTConfig().dist_timeout_min > 10


@pytest.mark.parametrize("doc_lens", [[7, 11, 5], [1, 20, 1, 1], [23]])
def test_packed_attention_equals_the_dense_reference(doc_lens):
    g = torch.Generator().manual_seed(0)
    N, H, H_kv, Dh = sum(doc_lens), 4, 2, 16
    q, k, v = (torch.randn(N, h, Dh, generator=g) for h in (H, H_kv, H_kv))
    positions = torch.cat([torch.arange(n) for n in doc_lens])[None]
    mask = build_mask(None, positions)  # (1, 1, N, N): causal within each document
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
    ours = packed_attention(q, k, v, doc_lens, "sdpa")
    assert_close(ours, ref[0].transpose(0, 1), f"documents {doc_lens}")


def test_packed_rows_forward_and_backward_equal_the_dense_mask_path():
    model = tiny_model().train()
    docs = [9, 4, 14, 1]
    ids = torch.randint(0, TINY.vocab_size, (1, sum(docs)))
    positions = torch.cat([torch.arange(n) for n in docs])[None]
    assert document_lengths(positions) == docs
    results = []
    for dense in (True, False):  # an all-ones attention_mask takes the dense (T, T) mask path
        model.zero_grad()
        logits = model(ids, position_ids=positions, attention_mask=torch.ones_like(ids) if dense else None,
                       doc_lens=None if dense else docs)
        logits.logsumexp(-1).sum().backward()
        results.append((logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert_close(results[1][0], results[0][0], "logits")
    assert_close(results[1][1], results[0][1], "gradients", atol=1e-4)


def peak_bytes(fn):
    tracker = MemTracker()
    with tracker:
        out = fn()
    return out, sum(s["Total"] for s in tracker.get_tracker_snapshot("peak").values())


def test_packed_row_forward_never_holds_a_tokens_by_tokens_tensor():
    # Two documents of 2,048 tokens: one (T, T) fp32 score matrix per head would be 64 MiB, and a
    # boolean (T, T) mask 16 MiB; the whole forward here must stay below the mask alone.
    model, T = tiny_model(), 4096
    ids = torch.zeros(1, T, dtype=torch.long)
    positions = torch.cat([torch.arange(T // 2)] * 2)[None]
    with torch.no_grad():
        _, peak = peak_bytes(lambda: model(ids, position_ids=positions, hidden_only=True))
    assert peak < T * T, f"peak {peak / 2**20:.1f} MiB in a packed-row forward of {T} tokens"


@pytest.mark.skipif(model_module.varlen_attn is None, reason="torch.nn.attention.varlen needs torch >= 2.10")
def test_varlen_attention_on_fake_tensors_never_holds_a_tokens_by_tokens_tensor():
    N, H, H_kv, Dh = 8192, 4, 2, 64
    with FakeTensorMode():  # varlen runs on CUDA; here its fake kernel gives shapes and memory
        q, k, v = (torch.randn(N, h, Dh) for h in (H, H_kv, H_kv))
        out, peak = peak_bytes(lambda: packed_attention(q, k, v, [4096, 4096], "varlen"))
    assert out.shape == (N, H, Dh)
    assert peak < N * N, f"peak {peak / 2**20:.0f} MiB"


def test_the_default_kv_budget_is_what_is_free_less_10_percent():
    assert kvcache.kv_budget(free_bytes=50 * 2**30, total_bytes=80 * 2**30) == 42 * 2**30  # 5% + 5% of 80
    assert kvcache.kv_budget(free_bytes=2 * 2**30, total_bytes=80 * 2**30) == 0


def test_gpu_reference_is_bf16_and_resharded_after_forward():
    with plan.fake_world(plan.Plan(8, 80, 1, 1)) as ctx:
        policy = D.load_model(None, ctx, bf16=True, config=TINY)
        reference = D.load_model(None, ctx, bf16=True, config=TINY, frozen=True)
        assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in policy.parameters()} == {torch.float32}
        assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
        ids = torch.zeros(1, 8, dtype=torch.long)
        with torch.no_grad():
            policy(ids), reference(ids)
        # the trained root stays gathered for its backward; the reference's goes back to shards
        assert not isinstance(policy.embed_tokens.weight, DTensor)
        assert isinstance(reference.embed_tokens.weight, DTensor)
    assert not dist.is_initialized()


def test_clip_and_step_norm_equals_torchs():
    grads = []
    for ours in (True, False):
        model = tiny_model().train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        ids = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
        model(ids).sum().backward()
        if ours:
            norm = float(D.clip_and_step(model, optimizer, 0.5, CPU))
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
            optimizer.step()
        grads.append((norm, torch.cat([p.detach().flatten() for p in model.parameters()])))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert_close(grads[0][1], grads[1][1], "weights after a clipped step")


def test_rollout_decodes_through_a_module_without_fsdp_hooks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # two CPU ranks, gloo
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          str(ROOT / "tests" / "rollout_worker.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("ok") == 2, res.stdout
