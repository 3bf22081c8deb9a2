"""kernels/ against eager torch.log_softmax + gather + entropy, values and gradients.

Every test runs on the torch fallback here. The Triton versions run on CUDA when there is a GPU;
on CPU test_interpreted_kernels_match_in_a_child_process reruns this file's Triton cases in a
child pytest with TRITON_INTERPRET=1, so the variable never reaches other test modules.
"""
import os
import subprocess
import sys
import types

import pytest
import torch

import kernels
from kernels import torch_logprobs

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (INTERPRETING or HAS_CUDA), reason="no GPU: runs in the TRITON_INTERPRET=1 child process"))]
# fp32 tolerance per the issue; bf16 inputs give bf16 gradients, so those compare at bf16 precision.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}
# At |z| ~ 1400 fp32 rounds z itself by ~1e-4, so p = exp(z - lse) carries ~1e-4 relative error.
LARGE_Z_TOL = {torch.float32: dict(rtol=1e-5, atol=2e-4), torch.bfloat16: TOL[torch.bfloat16]}


def device(backend):
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def reference(logits, targets, temperature):
    """Eager log_softmax + gather + entropy, in fp32 (fp64 for fp64)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    logprobs = log_p.gather(-1, targets[:, None]).squeeze(-1)
    # 0 * log 0 = 0 where a logit is -inf (masking log_p, not the product, keeps the gradient finite)
    entropy = -(log_p.exp() * log_p.masked_fill(torch.isneginf(log_p), 0.0)).sum(-1)
    return logprobs, entropy


def close(actual, expected, what, **tol):
    diff = (actual.double() - expected.double()).abs()
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: (
        f"{what}: max abs diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}\n{m}"))


def awkward_logits(N, V, dtype, dev, seed=0):
    """Spread-out logits, some rows shifted by +-1000 (large magnitude, same softmax)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * 8
    logits[::3] += 1000.0
    logits[1::3] -= 1000.0
    return logits.to(dtype).to(dev)


def loss_weights(N, dev, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, generator=g).to(dev), torch.randn(N, generator=g).to(dev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_and_entropy_match_log_softmax(backend, dtype):
    N, V, T = 48, 2500, 0.7  # V not a multiple of any block size
    dev = device(backend)
    logits = awkward_logits(N, V, dtype, dev).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2)).to(dev)
    w_logprob, w_entropy = loss_weights(N, dev)

    logprobs, entropy = kernels.logprobs_and_entropy(logits, targets, T, backend=backend)
    ref_logprobs, ref_entropy = reference(ref_logits, targets, T)
    (w_logprob * logprobs + w_entropy * entropy).sum().backward()
    (w_logprob * ref_logprobs + w_entropy * ref_entropy).sum().backward()

    assert logprobs.dtype == entropy.dtype == torch.float32 and logits.grad.dtype == dtype
    # At |z| ~ 1400 fp32 rounds z itself by ~1e-4, in the reference as much as here.
    close(logprobs, ref_logprobs, "logprobs", rtol=1e-5, atol=3e-4)
    close(entropy, ref_entropy, "entropy", rtol=1e-5, atol=3e-4)
    close(logits.grad, ref_logits.grad, "grad logits", **LARGE_Z_TOL[dtype])


@pytest.mark.parametrize("V", [151936, 152064])  # Qwen2.5's real vocabulary sizes
@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen_vocab_sizes_in_bf16(backend, V):
    N, T = 3, 0.6
    dev = device(backend)
    logits = (torch.randn(N, V, generator=torch.Generator().manual_seed(3)) * 5).bfloat16().to(dev)
    logits.requires_grad_()
    targets = torch.tensor([0, V - 1, V // 2]).to(dev)
    logprobs, entropy = kernels.logprobs_and_entropy(logits, targets, T, backend=backend)
    ref_logprobs, ref_entropy = reference(logits.detach(), targets, T)
    close(logprobs, ref_logprobs, "logprobs", rtol=1e-5, atol=1e-5)
    close(entropy, ref_entropy, "entropy", rtol=1e-5, atol=1e-5)
    assert (logprobs < 0).all(), "a log-probability must be negative"
    ref = logits.detach().clone().requires_grad_()
    logprobs.sum().backward()
    reference(ref, targets, T)[0].sum().backward()
    close(logits.grad, ref.grad, "grad logits", **TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_rows_give_zeros_and_partial_inf_rows_stay_exact(backend):
    N, V, T = 6, 1500, 1.3
    dev = device(backend)
    logits = awkward_logits(N, V, torch.float32, dev)
    logits[1] = float("-inf")  # a padding row
    logits[4] = float("-inf")
    logits[2, 700:] = float("-inf")  # masked vocabulary: finite answer, part of it in the last block
    logits[3, :1100] = float("-inf")  # first block all -inf
    logits.requires_grad_()
    targets = torch.tensor([5, 7, 3, 1200, 0, V - 1]).to(dev)
    logprobs, entropy = kernels.logprobs_and_entropy(logits, targets, T, backend=backend)
    w_logprob, w_entropy = loss_weights(N, dev)
    (w_logprob * logprobs + w_entropy * entropy).sum().backward()

    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()
    assert torch.isfinite(logits.grad).all(), "NaN/inf gradient from -inf logits"
    pad, real = [1, 4], [0, 2, 3, 5]
    assert (logprobs[pad] == 0).all() and (entropy[pad] == 0).all() and (logits.grad[pad] == 0).all()
    ref = logits.detach()[real].clone().requires_grad_()
    ref_logprobs, ref_entropy = reference(ref, targets[real], T)
    (w_logprob[real] * ref_logprobs + w_entropy[real] * ref_entropy).sum().backward()
    close(logprobs[real], ref_logprobs, "logprobs", rtol=1e-5, atol=3e-4)
    close(entropy[real], ref_entropy, "entropy", rtol=1e-5, atol=3e-4)
    close(logits.grad[real], ref.grad, "grad logits", **LARGE_Z_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_returns_the_gradient_in_the_logits_memory(backend):
    N, V, T = 8, 1300, 0.9
    dev = device(backend)
    base = awkward_logits(N, V, torch.float32, dev).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(4)).to(dev)
    logits = base * 1.0  # an intermediate nothing else needs, as logits from an LM head are
    logprobs, entropy = kernels.logprobs_and_entropy(logits, targets, T, inplace_backward=True, backend=backend)
    (grad,) = torch.autograd.grad((logprobs + 0.5 * entropy).sum(), logits)
    assert grad.data_ptr() == logits.data_ptr()
    ref = base.detach().clone().requires_grad_()
    ref_logprobs, ref_entropy = reference(ref, targets, T)
    (ref_logprobs + 0.5 * ref_entropy).sum().backward()
    close(grad, ref.grad, "in-place grad logits", **LARGE_Z_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_version_matches_matmul_then_log_softmax(backend, dtype):
    N, D, V, T = 40, 32, 1100, 1.3
    dev = device(backend)
    g = torch.Generator().manual_seed(5)
    hidden = (torch.randn(N, D, generator=g) * 2).to(dtype).to(dev).requires_grad_()
    weight = torch.randn(V, D, generator=g).to(dtype).to(dev).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(dev)
    w_logprob, w_entropy = loss_weights(N, dev)
    # chunk_size 16 leaves a short last chunk
    logprobs, entropy = kernels.linear_logprobs_and_entropy(hidden, weight, targets, T, chunk_size=16,
                                                            backend=backend)
    (w_logprob * logprobs + w_entropy * entropy).sum().backward()
    ref_hidden, ref_weight = (x.detach().clone().requires_grad_() for x in (hidden, weight))
    ref_logprobs, ref_entropy = reference(ref_hidden @ ref_weight.T, targets, T)
    (w_logprob * ref_logprobs + w_entropy * ref_entropy).sum().backward()

    assert hidden.grad.dtype == weight.grad.dtype == dtype
    close(logprobs, ref_logprobs, "logprobs", rtol=1e-5, atol=1e-4)
    close(entropy, ref_entropy, "entropy", rtol=1e-5, atol=1e-4)
    for name, ours, ref in [("hidden", hidden.grad, ref_hidden.grad), ("weight", weight.grad, ref_weight.grad)]:
        # Each entry sums bf16 products (V of them for hidden, N for weight, chunk sums rounded
        # to bf16 here): the error scales with the largest terms, not with a near-zero sum.
        tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2 * ref.abs().max().item())
        close(ours, ref, f"grad {name}", **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_lm_head_accumulates_embedding_and_head_gradients(backend):
    N, D, V = 12, 16, 1100
    dev = device(backend)
    g = torch.Generator().manual_seed(6)
    embedding = torch.randn(V, D, generator=g).to(dev).requires_grad_()
    ref_embedding = embedding.detach().clone().requires_grad_()
    input_ids = torch.randint(0, V, (N,), generator=g).to(dev)
    targets = torch.randint(0, V, (N,), generator=g).to(dev)
    hidden = torch.tanh(embedding[input_ids])
    logprobs, entropy = kernels.linear_logprobs_and_entropy(hidden, embedding, targets, backend=backend)
    (logprobs - 0.1 * entropy).sum().backward()
    ref_logprobs, ref_entropy = reference(torch.tanh(ref_embedding[input_ids]) @ ref_embedding.T, targets, 1.0)
    (ref_logprobs - 0.1 * ref_entropy).sum().backward()
    close(embedding.grad, ref_embedding.grad, "tied weight grad", rtol=1e-5, atol=1e-5)


def test_linear_version_holds_at_most_chunk_size_rows_of_logits():
    seen = []

    def forward_rows(logits, targets, temperature):
        seen.append(logits.shape[0])
        return torch_logprobs.forward_rows(logits, targets, temperature)

    def backward_rows(logits, *args, out):
        seen.append(logits.shape[0])
        return torch_logprobs.backward_rows(logits, *args, out=out)

    recording = types.SimpleNamespace(forward_rows=forward_rows, backward_rows=backward_rows)
    hidden = torch.randn(23, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    logprobs, _ = kernels._LinearLogprobsEntropy.apply(hidden, weight, targets, 1.0, 5, recording)
    logprobs.sum().backward()
    assert seen == [5, 5, 5, 5, 3] * 2


def test_gradcheck_float64_torch_fallback():
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(5, 37, generator=g, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, 37, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda x: kernels.logprobs_and_entropy(x, targets, 0.8), (logits,))
    hidden = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 37, (6,), generator=g)
    assert torch.autograd.gradcheck(
        lambda h, w: kernels.linear_logprobs_and_entropy(h, w, targets, 1.7, chunk_size=4), (hidden, weight))


def test_bad_inputs_raise_errors_that_name_the_fix():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"targets\[2\] = -100 is outside \[0, 10\)"):
        kernels.logprobs_and_entropy(logits, torch.tensor([1, 2, -100, 3]))
    with pytest.raises(ValueError, match="flatten"):
        kernels.logprobs_and_entropy(logits[None], torch.tensor([1, 2, 0, 3]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kernels.logprobs_and_entropy(logits, torch.tensor([1, 2, 0, 3]), temperature=0.0)
    with pytest.raises(ValueError, match="weight .V, D."):
        kernels.linear_logprobs_and_entropy(torch.randn(4, 3), torch.randn(10, 5), torch.tensor([1, 2, 0, 3]))
    with pytest.raises(ValueError, match="backend must be"):
        kernels.logprobs_and_entropy(logits, torch.tensor([1, 2, 0, 3]), backend="cuda")
    if not INTERPRETING:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            kernels.logprobs_and_entropy(logits, torch.tensor([1, 2, 0, 3]), backend="triton")


@pytest.mark.skipif(INTERPRETING, reason="the interpreter replaces the kernels with Python functions")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_h100_without_a_gpu(dtype):
    """The interpreter does not type-check like the compiler does: build real sm_90 code with the
    ptxas that ships with triton, so a GPU-only compile error shows up in CI."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import triton_logprobs

    ptr = f"*{dtype}"
    fwd = dict(logits_ptr=ptr, targets_ptr="*i64", logprobs_ptr="*fp32", entropy_ptr="*fp32", lse_ptr="*fp32",
               V="i32", stride_row="i64", inv_temperature="fp32", BLOCK_V="constexpr")
    bwd = dict(logits_ptr=ptr, targets_ptr="*i64", lse_ptr="*fp32", entropy_ptr="*fp32", grad_logprobs_ptr="*fp32",
               grad_entropy_ptr="*fp32", grad_ptr=ptr, V="i32", stride_row="i64", grad_stride_row="i64",
               inv_temperature="fp32", BLOCK_V="constexpr")
    for kernel, signature in [(triton_logprobs._forward_kernel, fwd), (triton_logprobs._backward_kernel, bwd)]:
        source = ASTSource(kernel, signature=signature, constexprs={"BLOCK_V": triton_logprobs.BLOCK_V})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": triton_logprobs.NUM_WARPS})
        assert compiled.asm["cubin"], f"no cubin for {kernel.fn.__name__}"


@pytest.mark.skipif(INTERPRETING or HAS_CUDA, reason="this is the parent: Triton cases already run here")
def test_interpreted_kernels_match_in_a_child_process():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton"]
    child = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    report = child.stdout[-6000:] + child.stderr[-3000:]
    assert child.returncode == 0, f"Triton kernels under TRITON_INTERPRET=1 failed:\n{report}"
    assert " passed" in child.stdout and "skipped" not in child.stdout, f"Triton cases did not all run:\n{report}"
