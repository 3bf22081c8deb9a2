"""The Triton paged decode attention (kernels/paged_attention.py) against an fp64 reference, and
the sampler decoding through it.

The Triton cases run on a GPU, or on the CPU under TRITON_INTERPRET=1, which the last test sets in
a child pytest (the variable is read at import, so it never reaches the other test modules). That
child also runs tests/test_paged.py (but its sweep of budgets, which tests the scheduler and would
take the interpreter minutes), so there the sampler's greedy and sampled completions are checked
through the kernel against transformers and the static cache.
"""
import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"
triton_case = pytest.mark.skipif(not (INTERPRETING or HAS_CUDA), reason="no GPU: runs in the TRITON_INTERPRET=1 child")


def reference(q, k_pages, v_pages, block_table, kv_lens):
    """fp64 attention of each sequence's query over positions 0..kv_lens[b]-1 of its pages."""
    B, H, Dh = q.shape
    P, H_kv = k_pages.shape[1], k_pages.shape[2]
    out = torch.empty(B, H, Dh, dtype=torch.float64)
    for b in range(B):
        n = int(kv_lens[b])
        pos = torch.arange(n)
        rows = block_table[b, pos // P].cpu()
        k = k_pages.cpu()[rows, pos % P].double().repeat_interleave(H // H_kv, 1)  # (n, H, Dh)
        v = v_pages.cpu()[rows, pos % P].double().repeat_interleave(H // H_kv, 1)
        w = (torch.einsum("hd,nhd->hn", q[b].cpu().double(), k) * Dh ** -0.5).softmax(-1)
        out[b] = torch.einsum("hn,nhd->hd", w, v)
    return out


def random_case(B, H, H_kv, Dh, P, lens, dtype, seed=0):
    """A pool with pages handed out in shuffled order, the first pages of sequences 0 and 1 shared."""
    g = torch.Generator().manual_seed(seed)
    per_seq = max(-(-n // P) for n in lens)
    n_pages = B * per_seq + 1
    k_pages = torch.randn(n_pages, P, H_kv, Dh, generator=g).to(dtype)
    v_pages = torch.randn(n_pages, P, H_kv, Dh, generator=g).to(dtype)
    table = torch.randperm(n_pages - 1, generator=g)[:B * per_seq].view(B, per_seq)
    if B > 1:
        table[1, 0] = table[0, 0]
    q = torch.randn(B, H, Dh, generator=g).to(dtype)
    return [t.to(DEVICE) for t in (q, k_pages, v_pages, table, torch.tensor(lens))]


@triton_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, H, H_kv, Dh, P, lens", [
    (3, 4, 2, 16, 16, [1, 16, 17]),            # a page just begun, exactly full, one past it
    (2, 7, 1, 24, 4, [40, 9]),                 # 7 query heads per KV head, head_dim not a power of 2, pages of 4
    (1, 8, 2, 32, 16, [300]),                  # one long sequence: split over several programs
    (5, 6, 3, 16, 64, [64, 3, 130, 65, 1]),
])
def test_triton_paged_decode_matches_reference(B, H, H_kv, Dh, P, lens, dtype):
    from kernels import paged_attention
    q, k_pages, v_pages, table, kv_lens = random_case(B, H, H_kv, Dh, P, lens, dtype)
    out = paged_attention.paged_decode(q, k_pages, v_pages, table, kv_lens, max_len=max(lens) + 5)
    assert out.shape == (B, H, Dh) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.cpu().double(), reference(q, k_pages, v_pages, table, kv_lens), atol=tol, rtol=tol)


@triton_case
def test_triton_paged_decode_splits_long_sequences():
    from kernels import paged_attention
    B, H_kv, n = 1, 2, 300
    blocks = -(-n // paged_attention.BLOCK_N)
    assert paged_attention.splits_for(B, H_kv, blocks) > 1, "the long case above must exercise the merge of splits"
    assert paged_attention.splits_for(256, 4, blocks) == 1


@triton_case
def test_triton_generate_decodes_through_the_kernel(monkeypatch):
    """On a paged cache where the kernel runs, the model's decode step calls it (once per layer)."""
    from kernels import paged_attention
    from model import ModelConfig, Transformer
    from rollout import SamplingParams, generate

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)).to(DEVICE)
    calls = []
    real = paged_attention.paged_decode
    monkeypatch.setattr(paged_attention, "paged_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    generate(model, [[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=3), use_cuda_graph=False)
    assert len(calls) == 3 * 2


@pytest.mark.skipif(INTERPRETING, reason="the interpreter replaces the kernels with Python functions")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_paged_kernel_compiles_for_h100_without_a_gpu(dtype):
    """Real sm_90 code, built with the ptxas that ships with triton: a GPU-only compile error (a
    tl.dot shape, a type) shows up in CI."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import paged_attention

    ptr = f"*{dtype}"
    signature = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, table_ptr="*i64", lens_ptr="*i64", acc_ptr="*fp32",
                     m_ptr="*fp32", l_ptr="*fp32", stride_qb="i64", stride_qh="i64", stride_kp="i64",
                     stride_kn="i64", stride_kh="i64", stride_tb="i64", GROUP="i32", HEAD_DIM="i32", PAGE="i32",
                     blocks_per_split="i32", scale="fp32", BLOCK_N="constexpr", GROUP_PAD="constexpr",
                     BLOCK_D="constexpr", SPLITS="constexpr", UPCAST="constexpr", DOT_PRECISION="constexpr")
    constexprs = dict(BLOCK_N=paged_attention.BLOCK_N, GROUP_PAD=16, BLOCK_D=128, SPLITS=4, UPCAST=False,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    source = ASTSource(paged_attention._decode_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": paged_attention.NUM_WARPS})
    assert compiled.asm["cubin"]


@pytest.mark.skipif(INTERPRETING or HAS_CUDA, reason="this is the parent: the Triton cases already run here")
def test_interpreted_paged_kernel_and_sampler_in_a_child_process():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", __file__,
               os.path.join(root, "tests", "test_paged.py"), "-k", "not compiles and not child_process and not many_budgets"]
    child = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    report = child.stdout[-6000:] + child.stderr[-3000:]
    assert child.returncode == 0, f"paged attention under TRITON_INTERPRET=1 failed:\n{report}"
    assert " passed" in child.stdout and "skipped" not in child.stdout, f"cases did not all run:\n{report}"
