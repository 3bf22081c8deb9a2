"""Per-token log-probabilities and entropies, without the (N, V) fp32 tensors of eager PyTorch.

    logprobs, entropy = logprobs_and_entropy(logits, targets, temperature)           # (N,), (N,)
    logprobs, entropy = linear_logprobs_and_entropy(hidden, lm_head_weight, targets)  # same, from (N, D)

are log softmax(logits / T)[target] and -sum p log p with p = softmax(logits / T), both
differentiable. The second never holds the full (N, V) logits: it multiplies `chunk_size` rows at a
time by the LM head and recomputes them in backward; sft.py and grpo.py use it.

The backend is Triton when the tensors are on CUDA or TRITON_INTERPRET=1 is set (the interpreter
runs the same kernels on CPU; the mode is fixed when kernels.triton_logprobs is first imported),
and a row-blocked torch fallback otherwise; `backend="torch"|"triton"` overrides that. fp64
inputs (only useful for gradcheck) always take the torch fallback.

- Inputs may be bf16, fp16 or fp32; the math is fp32; outputs are fp32; input gradients have the
  input dtype. The LM-head weight gradient is summed over row chunks in fp32.
- Entropy comes from the same pass at almost no cost, so there is no switch to turn it off: when
  it does not reach the loss, autograd hands backward a zero gradient for it.
- A row whose logits are all -inf (padding) gives logprob 0 and entropy 0 with a zero gradient.
  A -inf logit at the target of any other row gives logprob -inf: mask such positions before use.
"""
import math
import os

import torch
from torch._subclasses.fake_tensor import is_fake

from kernels import torch_logprobs

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs(x) -> bool:
    """Whether x takes the Triton kernels' path: a CUDA tensor, any under TRITON_INTERPRET=1, or a
    fake tensor (the memory plan's, which stands for a CUDA one: the kernels' wrappers then
    allocate what they would and launch nothing, as there is no data to launch on)."""
    return x.is_cuda or _interpreting() or is_fake(x)


class _TritonShapes:
    """For fake tensors (the memory plan's, which stand for CUDA ones): what the Triton kernels
    allocate, their outputs, and no work. The torch fallback's row blocks would both cost the
    plan minutes of fake ops and count fp32 temporaries the kernels never hold."""

    @staticmethod
    def forward_rows(logits, targets, temperature):
        return tuple(torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device) for _ in range(3))

    @staticmethod
    def backward_rows(logits, targets, lse, entropy, grad_logprobs, grad_entropy, temperature, out):
        return out


def _implementation(x, backend):
    """The module (torch_logprobs or triton_logprobs) whose forward_rows/backward_rows to use."""
    if is_fake(x) and backend is None:
        return _TritonShapes
    if backend is None:
        backend = "triton" if triton_runs(x) and x.dtype != torch.float64 else "torch"
    if backend == "torch":
        return torch_logprobs
    if backend == "triton":
        if x.dtype == torch.float64:
            raise ValueError("the Triton kernels compute in fp32; pass bf16/fp16/fp32 or backend='torch' for fp64")
        if not (x.is_cuda or _interpreting()):
            raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 in the environment "
                             "before kernels.triton_logprobs is imported to run on CPU; or use backend='torch'")
        from kernels import triton_logprobs  # imported on first use: triton reads TRITON_INTERPRET at import
        return triton_logprobs
    raise ValueError(f"backend must be 'torch', 'triton' or None (pick by device), got {backend!r}")


def _check_inputs(name, x, targets, temperature, vocab_size):
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, {'V' if name == 'logits' else 'D'}), got shape "
                         f"{tuple(x.shape)}: flatten (B, T, ...) to (B * T, ...) first")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name} must be bf16, fp16, fp32 or fp64, got {x.dtype}")
    if targets.shape != (x.shape[0],) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer of shape ({x.shape[0]},) to match {name}, got "
                         f"{targets.dtype} of shape {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # Checked here (one host sync) because the Triton kernel would silently read another row;
    # fake tensors (the memory plan's) have no values to check.
    if targets.numel() and not is_fake(targets) and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        bad = int(((targets < 0) | (targets >= vocab_size)).nonzero()[0])
        raise ValueError(f"targets[{bad}] = {int(targets[bad])} is outside [0, {vocab_size}): replace ignored "
                         f"positions (e.g. -100) by any valid id and drop them with the loss mask")


class _LogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, inplace_backward, impl):
        logprobs, entropy, lse = impl.forward_rows(logits, targets, temperature)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature, ctx.inplace_backward, ctx.impl = temperature, inplace_backward, impl
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        out = logits if ctx.inplace_backward else torch.empty_like(logits)
        ctx.impl.backward_rows(logits, targets, lse, entropy, grad_logprobs, grad_entropy,
                               ctx.temperature, out)
        return out, None, None, None, None


def logprobs_and_entropy(logits, targets, temperature=1.0, inplace_backward=False, backend=None):
    """logits (N, V), targets (N,) int -> (logprobs, entropy), each fp32 (N,).

    inplace_backward=True writes the gradient into the logits' memory instead of a new (N, V)
    buffer; only use it when nothing else reads those logits afterwards (in backward included).
    """
    _check_inputs("logits", logits, targets, temperature, logits.shape[-1])
    impl = _implementation(logits, backend)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _LogprobsEntropy.apply(logits, targets.long(), float(temperature), inplace_backward, impl)


def _row_chunks(N, chunk_size):
    return [(start, min(start + chunk_size, N)) for start in range(0, N, chunk_size)]


class _LinearLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, impl):
        per_chunk = [impl.forward_rows(hidden[start:end] @ weight.T, targets[start:end], temperature)
                     for start, end in _row_chunks(hidden.shape[0], chunk_size)]
        logprobs, entropy, lse = (torch.cat(parts) for parts in zip(*per_chunk))
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size, ctx.impl = temperature, chunk_size, impl
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        sum_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=sum_dtype, device=weight.device) if need_weight else None
        for start, end in _row_chunks(hidden.shape[0], ctx.chunk_size):
            rows = slice(start, end)
            logits = hidden[rows] @ weight.T  # recomputed, then overwritten by its own gradient
            ctx.impl.backward_rows(logits, targets[rows], lse[rows], entropy[rows], grad_logprobs[rows],
                                   grad_entropy[rows], ctx.temperature, out=logits)
            if need_hidden:
                grad_hidden[rows] = logits @ weight
            if need_weight and logits.dtype == sum_dtype:
                grad_weight.addmm_(logits.T, hidden[rows])
            elif need_weight:
                # bf16/fp16 product (fp32 accumulation inside the matmul), summed over chunks in fp32.
                grad_weight += logits.T @ hidden[rows]
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_logprobs_and_entropy(hidden, weight, targets, temperature=1.0, chunk_size=None, backend=None):
    """hidden (N, D), weight (V, D), targets (N,) int -> (logprobs, entropy), each fp32 (N,).

    Same result as logprobs_and_entropy(hidden @ weight.T, ...), differentiable w.r.t. hidden and
    weight (a weight tied to the embedding accumulates both gradients as usual). At most
    chunk_size rows of logits exist at a time; the default makes a chunk's logits about as large
    as `hidden`, so the extra memory stays a small multiple of what the caller already holds.
    """
    if weight.dim() != 2 or hidden.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"need hidden (N, D) and weight (V, D), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}: pass the LM head's weight, e.g. model.lm_head.weight")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}: cast one to the other")
    _check_inputs("hidden", hidden, targets, temperature, weight.shape[0])
    N, D = hidden.shape
    V = weight.shape[0]
    if chunk_size is None:
        chunk_size = max(1, math.ceil(N / math.ceil(V / D)))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (rows per chunk), got {chunk_size}")
    impl = _implementation(hidden, backend)
    return _LinearLogprobsEntropy.apply(hidden, weight, targets.long(), float(temperature), chunk_size, impl)
