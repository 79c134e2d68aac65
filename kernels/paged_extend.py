"""Paged extend attention: a chunk of new query tokens per sequence over its cached prefix plus
itself, causal, with an optional sliding window. Serves chunked prefill, prefix-cache hits and
speculative verification (and plain decode rows mixed into the same batch).

Reference: :func:`kernels.paged_attention.paged_attention_ref`.

Grid (cdiv(max_q_len, TOKENS), B, Hk). A program owns TOKENS query tokens of one sequence and
all GROUP query heads of one KV head, flattened into BLOCK_M = TOKENS * GROUP (padded) rows, so
each K/V tile is read once per KV head::

    row r -> token tok0 + r // GROUP, query head kv_head * GROUP + r % GROUP
    keys scanned: [max(0, first_pos - window + 1), last_pos + 1), masked per row to
                  key_pos <= pos (causal) and pos - key_pos < window
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels._triton import check, check_tensor, launchable, tl, triton
from kernels.paged_attention import check_paged_args


@triton.jit
def _extend_kernel(
    q_ptr,  # (T, Hq, D)
    kv_ptr,  # (num_blocks, 2, block_size, Hk, D)
    bt_ptr,  # (B, max_blocks) int32
    qsl_ptr,  # (B+1,) int32
    seq_lens_ptr,  # (B,) int32
    out_ptr,  # (T, Hq, D)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv_block, stride_kv_kv, stride_kv_slot, stride_kv_head,
    stride_bt,
    scale_log2,  # softmax scale * log2(e): scores live in log2 units for exp2
    window,
    kv_scale,  # fp8 pools: the stored values times kv_scale are K and V
    GROUP: tl.constexpr, TOKENS: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
):  # fmt: skip
    tok0 = tl.program_id(0) * TOKENS
    b = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2)
    # This sequence's query rows; programs past its q_len have nothing to do.
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if tok0 >= q_len:
        return
    prefix = tl.load(seq_lens_ptr + b) - q_len
    # Rows: (token, head) pairs, their absolute positions and the (BLOCK_M, BLOCK_D) query tile.
    r = tl.arange(0, BLOCK_M)
    tok = tok0 + r // GROUP
    heads = kv_head * GROUP + r % GROUP
    row_mask = (r < TOKENS * GROUP) & (tok < q_len)
    pos = prefix + tok  # (BLOCK_M,)
    d = tl.arange(0, BLOCK_D)
    q_mask = row_mask[:, None] & (d[None, :] < HEAD_DIM)
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0
    )
    # Key range this block of tokens can see.
    hi = prefix + tl.minimum(q_len, tok0 + TOKENS)
    lo = tl.maximum(prefix + tok0 - window + 1, 0) if HAS_WINDOW else 0
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        # Gather BLOCK_N keys/values through the block table (token n: page n // bs, slot n % bs).
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        page = tl.load(bt_ptr + b * stride_bt + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        offs = page * stride_kv_block + (n % BLOCK_SIZE) * stride_kv_slot + kv_head * stride_kv_head
        kv_mask = n_mask[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(kv_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        if KV_FP8:  # dequantize fp8 pages to q's dtype
            k = (k.to(tl.float32) * kv_scale).to(q.dtype)
        # Scores (BLOCK_M, BLOCK_N), masked causally (and to the window) per row.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        delta = pos[:, None] - n[None, :]
        visible = (delta >= 0) & n_mask[None, :]
        if HAS_WINDOW:
            visible &= delta < window
        s = tl.where(visible, s, float("-inf"))
        # Online softmax; a row with no visible key yet keeps m = -inf, so exponentiate against 0.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(kv_ptr + offs[:, None] + stride_kv_kv + d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:
            v = (v.to(tl.float32) * kv_scale).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    # Normalise (padding rows have l_sum == 0 and are not stored).
    acc = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    o_ptrs = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_extend_attention(
    q: Tensor,
    kv_layer: Tensor,
    block_tables: Tensor,
    query_start_loc: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    max_query_len: int | None = None,
    kv_scale: float | None = None,
) -> Tensor:
    """Triton extend attention, same contract as :func:`paged_attention_ref` -> new (T, Hq, D).

    max_query_len sizes the grid; without it the sync-free bound T - B + 1 is used (every
    sequence has q_len >= 1), and programs past a sequence's q_len exit at once. Values inside
    query_start_loc / seq_lens are not checked. Raises ValueError on shape/stride/dtype/device mismatch.
    """
    check_paged_args(q, kv_layer, block_tables, seq_lens, scale, sliding_window, kv_scale)
    kern = launchable(_extend_kernel, q.device)
    check_tensor("query_start_loc", query_start_loc, 1, (torch.int32,), q.device)
    num_tokens, num_q_heads, head_dim = q.shape
    batch = block_tables.shape[0]
    check(query_start_loc.shape == (batch + 1,),
          f"query_start_loc must be ({batch + 1},), got {tuple(query_start_loc.shape)}")  # fmt: skip
    check(max_query_len is None or max_query_len >= 1, f"max_query_len must be >= 1, got {max_query_len}")
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0 or num_tokens == 0:
        return out
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    group = num_q_heads // num_kv_heads
    block_m = max(64, triton.next_power_of_2(group))
    tokens = block_m // group
    grid_tokens = max_query_len if max_query_len is not None else num_tokens - batch + 1
    kern[(triton.cdiv(grid_tokens, tokens), batch, num_kv_heads)](
        q, kv_layer, block_tables, query_start_loc, seq_lens, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        block_tables.stride(0), scale * math.log2(math.e), sliding_window or 0, kv_scale or 1.0,
        GROUP=group, TOKENS=tokens, BLOCK_M=block_m, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size, BLOCK_N=64,
        HAS_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", KV_FP8=kv_layer.dtype != q.dtype,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
