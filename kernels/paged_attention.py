"""Triton decode attention over a paged KV cache: one query token per sequence, each sequence
reading only its own pages, up to its own length.

    out = paged_decode(q, k_pages, v_pages, block_table, kv_lens, max_len)   # (B, H, Dh)

q (B, H, Dh); k_pages, v_pages (n_pages, P, H_kv, Dh), one layer of kvcache.KVCache's pool;
block_table (B, pages per sequence): the pages holding positions 0, P, 2P, ... of each sequence;
kv_lens (B,): positions 0..kv_lens[b]-1 are attended; max_len, a host int >= every kv_lens[b],
fixes the launch grid, so that a CUDA graph records one launch per length bucket.

One program per (sequence, KV head, split): the query heads that share a KV head are the rows of
one tile, so each key is read once per KV head (not once per query head). A trip of its loop
reads BLOCK_N positions, each from the page its table names (so any page size works, the static
cache's one page per sequence included), as one (BLOCK_N, Dh) tile for tl.dot. A sequence's
positions are divided among SPLITS programs (flash-decoding), so that a batch of one long
sequence still fills the GPU; each writes its partial softmax state (running max m, sum l,
weighted values acc) and a torch reduction merges them:
    out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s,   M = max_s m_s.
A split past the end of its sequence runs no loop trip and leaves m = -inf, which weighs 0.

Scores and sums are fp32. Under TRITON_INTERPRET=1 (read at import) the kernel runs on CPU
tensors; the interpreter gets bf16 arithmetic wrong, so there every load is upcast to fp32.
"""
import math
import os

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NUM_WARPS = 4
# Positions per loop trip. The interpreter's cost is programs x trips, so it gets a block that
# still leaves several trips at the test lengths (to exercise the online merge).
BLOCK_N = 16 if INTERPRET else 64
# Programs a launch aims for: about two per SM of an H100/H200 (132 SMs).
TARGET_PROGRAMS = 264


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, acc_ptr, m_ptr, l_ptr,
                   stride_qb, stride_qh, stride_kp, stride_kn, stride_kh, stride_tb,
                   GROUP, HEAD_DIM, PAGE, blocks_per_split, scale,
                   BLOCK_N: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                   SPLITS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, GROUP_PAD)            # query heads kv_head * GROUP + rows
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    kv_len = tl.load(lens_ptr + b)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(kv_len, BLOCK_N))
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, BLOCK_D), tl.float32)
    for i in range(first, last):
        # BLOCK_N positions; each row looks up its own page, so any page size works
        positions = i * BLOCK_N + tl.arange(0, BLOCK_N)
        live = positions < kv_len
        page = tl.load(table_ptr + b * stride_tb + positions // PAGE, mask=live, other=0)
        offsets = (page * stride_kp + (positions % PAGE) * stride_kn)[:, None] + kv_head * stride_kh + dims[None, :]
        k = tl.load(k_ptr + offsets, mask=live[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(v_ptr + offsets, mask=live[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale   # (GROUP_PAD, BLOCK_N)
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: a trip's first position is always live
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    out = (b * tl.num_programs(1) * GROUP + heads) * SPLITS + split   # partials are (B, H, SPLITS, ...)
    tl.store(acc_ptr + out[:, None] * BLOCK_D + dims[None, :], acc, mask=row_ok[:, None])
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, l, mask=row_ok)


def splits_for(batch, kv_heads, n_blocks):
    """Programs per (sequence, KV head): enough for about TARGET_PROGRAMS in all, each with at
    least 4 blocks of positions to read; a power of two, so that few launch shapes occur."""
    want = max(1, min(TARGET_PROGRAMS // max(1, batch * kv_heads), n_blocks // 4))
    return 1 << (want.bit_length() - 1)


def paged_decode(q, k_pages, v_pages, block_table, kv_lens, max_len, scale=None):
    """Attention (B, H, Dh) of one query per sequence over its pages (see the module docstring)."""
    B, H, Dh = q.shape
    _, P, H_kv, _ = k_pages.shape
    if H % H_kv:
        raise ValueError(f"paged_decode needs H ({H}) a multiple of H_kv ({H_kv})")
    if k_pages.stride(-1) != 1 or v_pages.stride() != k_pages.stride() or q.stride(-1) != 1:
        raise ValueError("paged_decode needs the last dimension of q and of the pools contiguous, and "
                         "the key and value pools laid out alike")
    group = H // H_kv
    max_len = min(max_len, block_table.shape[1] * P)
    n_blocks = math.ceil(max_len / BLOCK_N)
    splits = splits_for(B, H_kv, n_blocks)
    block_d = triton.next_power_of_2(Dh)
    acc = torch.empty(B, H, splits, block_d, device=q.device, dtype=torch.float32)
    m = torch.empty(B, H, splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    fp32 = k_pages.dtype == torch.float32
    if not is_fake(q):  # the memory plan's fake tensors: this function's allocations, no launch
        _decode_kernel[(B, H_kv, splits)](
            q, k_pages, v_pages, block_table, kv_lens, acc, m, l,
            q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), block_table.stride(0),
            group, Dh, P, math.ceil(n_blocks / splits), Dh ** -0.5 if scale is None else scale,
            BLOCK_N=BLOCK_N, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, SPLITS=splits,
            UPCAST=INTERPRET, DOT_PRECISION="ieee" if fp32 else "tf32", num_warps=NUM_WARPS)
    weight = torch.exp(m - m.amax(-1, keepdim=True))                 # (B, H, splits); 0 where m = -inf
    out = (weight[..., None] * acc).sum(2) / (weight * l).sum(2)[..., None]
    return out[..., :Dh].to(q.dtype)
