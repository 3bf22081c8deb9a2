"""Torch fallback with the same two functions as triton_logprobs.py, for CPU.

It works on blocks of rows so that its fp32 temporaries stay ~ROW_BLOCK_ELEMENTS floats
whatever N is; eager log_softmax + gather + entropy holds several fp32 copies of all (N, V).
Math is in fp32, or in fp64 for fp64 inputs (so torch.autograd.gradcheck can check it).
"""
import torch

ROW_BLOCK_ELEMENTS = 2**22  # floats per block of rows: 16 MB in fp32


def _row_blocks(N, V):
    rows = max(1, ROW_BLOCK_ELEMENTS // max(V, 1))
    return [(start, min(start + rows, N)) for start in range(0, N, rows)]


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _log_p(z, lse):
    """log softmax(z) given its lse; an all -inf row's lse is replaced by 0 so that it gives
    log_p = -inf (p = 0) instead of NaN."""
    return z - torch.where(torch.isneginf(lse), 0.0, lse)[:, None]


def forward_rows(logits, targets, temperature):
    """logits (N, V), targets (N,) -> (logprobs, entropy, lse), each (N,) in fp32 (fp64 for fp64)."""
    N, V = logits.shape
    dtype = _compute_dtype(logits)
    logprobs, entropy, lse = (torch.empty(N, dtype=dtype, device=logits.device) for _ in range(3))
    for start, end in _row_blocks(N, V):
        z = logits[start:end].to(dtype) / temperature
        lse_block = torch.logsumexp(z, dim=-1)  # -inf for an all -inf row
        log_p = _log_p(z, lse_block)
        p = log_p.exp()
        valid = ~torch.isneginf(lse_block)
        target_log_p = log_p.gather(1, targets[start:end, None]).squeeze(1)
        logprobs[start:end] = torch.where(valid, target_log_p, 0.0)
        entropy[start:end] = -torch.where(p > 0, p * log_p, 0.0).sum(-1)
        lse[start:end] = lse_block
    return logprobs, entropy, lse


def backward_rows(logits, targets, lse, entropy, grad_logprobs, grad_entropy, temperature, out):
    """Write d(loss)/d(logits) into out (N, V); out may be logits itself."""
    N, V = logits.shape
    for start, end in _row_blocks(N, V):
        rows = slice(start, end)
        valid = ~torch.isneginf(lse[rows])
        # Padding rows have constant outputs, so their gradient is zero.
        g_logprob = torch.where(valid, grad_logprobs[rows], 0.0)[:, None]
        g_entropy = torch.where(valid, grad_entropy[rows], 0.0)[:, None]
        log_p = _log_p(logits[rows].to(lse.dtype) / temperature, lse[rows])
        p = log_p.exp()
        # d logprob/dz = onehot - p;  d entropy/dz = -p * (log p + entropy); p == 0 -> 0, not 0 * -inf
        grad_z = -torch.where(p > 0, p * (g_logprob + g_entropy * (log_p + entropy[rows, None])), 0.0)
        grad_z.scatter_add_(1, targets[rows, None], g_logprob)
        out[rows] = grad_z / temperature
    return out
