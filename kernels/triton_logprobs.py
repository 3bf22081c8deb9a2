"""Triton kernels: per-row log-prob of the target and entropy of softmax(logits / T).

Forward, one program per row, one pass over the vocabulary with an online (streaming)
log-sum-exp: it keeps the running max m, s = sum exp(z - m) and a = sum exp(z - m) * (z - m),
so that
    lse     = m + log s
    entropy = lse - E_p[z] = log s - a / s
Keeping a relative to the running max (not sum p * z) avoids cancelling two large numbers
when the logits are large. Only lse and the entropy are saved for backward (N floats each).

Backward, one program per (row, vocabulary block), recomputes p = exp(z - lse) from the logits:
    d logprob / dz_j = [j == target] - p_j
    d entropy / dz_j = -p_j * (log p_j + entropy)
and divides by T for the gradient w.r.t. the logits. It may write into the logits buffer.

A row whose logits are all -inf (padding) gets logprob 0, entropy 0, lse -inf, and a zero gradient.

Under TRITON_INTERPRET=1 (read when this module is imported) the same kernels run on CPU
tensors; the interpreter gets bf16 arithmetic wrong, so every load is upcast to fp32 first.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter's cost is programs x loop trips, so it gets a block that still leaves several
# trips at the test shapes (V ~ 1000-3000) to exercise the online merge; GPUs stream 4096-wide blocks.
BLOCK_V = 1024 if INTERPRET else 4096
NUM_WARPS = 8


@triton.jit
def _forward_kernel(logits_ptr, targets_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
                    V, stride_row, inv_temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: N * V passes 2**31 at real sizes
    row_ptr = logits_ptr + row * stride_row
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
        z = tl.where(in_row, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While everything seen is -inf, shift by 0 instead of by -inf (which would give NaN).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - m_ref)
        shift = tl.where(m == float("-inf"), 0.0, m - m_ref)
        e = tl.exp(z - m_ref)
        a = scale * (a + shift * s) + tl.sum(e * tl.where(e > 0, z - m_ref, 0.0), axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = m_new
    # An all -inf row ends with m = -inf, s = 0, a = 0; computing it as m = 0, s = 1 keeps every
    # value below finite (entropy comes out 0) and lse is stored as -inf to mark the row.
    valid = s > 0
    m = tl.where(valid, m, 0.0)
    s = tl.where(valid, s, 1.0)
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    z_target = tl.load(row_ptr + target).to(tl.float32) * inv_temperature
    tl.store(logprobs_ptr + row, tl.where(valid, z_target - lse, 0.0))
    tl.store(entropy_ptr + row, tl.log(s) - a / s)
    tl.store(lse_ptr + row, tl.where(valid, lse, float("-inf")))


@triton.jit
def _backward_kernel(logits_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr,
                     grad_entropy_ptr, grad_ptr, V, stride_row, grad_stride_row, inv_temperature,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < V
    lse = tl.load(lse_ptr + row)
    valid = lse > float("-inf")
    lse = tl.where(valid, lse, 0.0)
    entropy = tl.load(entropy_ptr + row)
    # Padding rows have constant outputs, so their gradient is zero.
    g_logprob = tl.where(valid, tl.load(grad_logprobs_ptr + row), 0.0)
    g_entropy = tl.where(valid, tl.load(grad_entropy_ptr + row), 0.0)
    target = tl.load(targets_ptr + row)
    z = tl.load(logits_ptr + row * stride_row + cols, mask=in_row, other=float("-inf"))
    z = tl.where(in_row, z.to(tl.float32) * inv_temperature, float("-inf"))
    log_p = z - lse
    p = tl.exp(log_p)
    log_p = tl.where(p > 0, log_p, 0.0)  # where p == 0 (z == -inf) the term is 0, not 0 * -inf
    grad_z = -p * (g_logprob + g_entropy * (log_p + entropy))
    grad_z = tl.where(cols == target, grad_z + g_logprob, grad_z)
    grad = grad_z * inv_temperature
    tl.store(grad_ptr + row * grad_stride_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def forward_rows(logits, targets, temperature):
    """logits (N, V) with unit column stride, targets (N,) -> fp32 (logprobs, entropy, lse), each (N,)."""
    N, V = logits.shape
    logprobs, entropy, lse = (torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(3))
    if N:
        _forward_kernel[(N,)](logits, targets, logprobs, entropy, lse, V, logits.stride(0),
                              1.0 / temperature, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return logprobs, entropy, lse


def backward_rows(logits, targets, lse, entropy, grad_logprobs, grad_entropy, temperature, out):
    """Write d(loss)/d(logits) into out (N, V); out may be logits itself (each program reads its
    block before writing it, and no program reads another's block)."""
    N, V = logits.shape
    if N:
        grid = (N, triton.cdiv(V, BLOCK_V))
        _backward_kernel[grid](logits, targets, lse, entropy, grad_logprobs.contiguous(),
                               grad_entropy.contiguous(), out, V, logits.stride(0), out.stride(0),
                               1.0 / temperature, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return out
