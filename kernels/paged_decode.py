"""Paged decode attention (one query token per sequence) with split-KV, a.k.a. flash-decoding.

Reference: :func:`kernels.paged_attention.paged_attention_ref` with every q_len == 1.

Stage 1 grid (B, Hk, NUM_SPLITS): a program owns one KV head, all GROUP = Hq // Hk query heads
sharing it (so each K/V tile is read once) and one slice of the context::

    context of seq b:  [kv_start ........................................ seq_len)
                        | split 0      | split 1      | split 2      | ...
    each split writes   part_out[b, h, split] = softmax-weighted V over its slice (normalised)
                        part_lse[b, h, split] = log2-sum-exp of its scores (-inf when empty)

Stage 2 grid (B, Hk) merges the splits by their lse. With one split, stage 1 writes the output.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels._triton import check, launchable, tl, triton
from kernels.paged_attention import check_paged_args

MAX_SPLITS = 32
MIN_TOKENS_PER_SPLIT = 256


@triton.jit
def _decode_split_kernel(
    q_ptr,  # (B, Hq, D)
    kv_ptr,  # (num_blocks, 2, block_size, Hk, D)
    bt_ptr,  # (B, max_blocks) int32
    seq_lens_ptr,  # (B,) int32
    out_ptr,  # (B, Hq, D) when NUM_SPLITS == 1
    part_out_ptr,  # (B, Hq, NUM_SPLITS, D) float32
    part_lse_ptr,  # (B, Hq, NUM_SPLITS) float32
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_kv_block, stride_kv_kv, stride_kv_slot, stride_kv_head,
    stride_bt,
    scale_log2,  # softmax scale * log2(e): scores live in log2 units for exp2
    window,
    kv_scale,  # fp8 pools: the stored values times kv_scale are K and V
    num_q_heads,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # This split's slice [lo, hi) of the visible context, chunked in whole BLOCK_N tiles.
    seq_len = tl.load(seq_lens_ptr + b)
    kv_start = tl.maximum(seq_len - window, 0) if HAS_WINDOW else 0
    per_split = (seq_len - kv_start + NUM_SPLITS - 1) // NUM_SPLITS
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = kv_start + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)
    # The GROUP query heads of this KV head, padded to BLOCK_G rows for tl.dot: (BLOCK_G, BLOCK_D).
    g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    q_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        # Gather BLOCK_N tokens through the block table: token n is slot n % bs of page n // bs.
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        page = tl.load(bt_ptr + b * stride_bt + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        offs = page * stride_kv_block + (n % BLOCK_SIZE) * stride_kv_slot + kv_head * stride_kv_head
        kv_mask = n_mask[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(kv_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        if KV_FP8:  # dequantize fp8 pages to q's dtype
            k = (k.to(tl.float32) * kv_scale).to(q.dtype)
        # Scores (BLOCK_G, BLOCK_N); the first token of every tile is valid, so the max is finite.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Online softmax: rescale the running sum and accumulator to the new max.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(kv_ptr + offs[:, None] + stride_kv_kv + d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:
            v = (v.to(tl.float32) * kv_scale).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    # Normalise; an empty split (short sequence) leaves l_sum == 0 and reports lse = -inf.
    nonempty = l_sum > 0
    acc = acc / tl.where(nonempty, l_sum, 1.0)[:, None]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        row = (b * num_q_heads + heads) * NUM_SPLITS + split  # (BLOCK_G,)
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=q_mask)
        lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l_sum, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g < GROUP)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr,  # (B, Hq, NUM_SPLITS, D) float32
    part_lse_ptr,  # (B, Hq, NUM_SPLITS) float32
    out_ptr,  # (B, Hq, D)
    stride_ob, stride_oh,
    num_q_heads,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    # Grid (B, Hk): the GROUP query heads of one KV head, (BLOCK_G, BLOCK_D) rows of output.
    b = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    heads = tl.program_id(1) * GROUP + g
    d = tl.arange(0, BLOCK_D)
    mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    rows = (b * num_q_heads + heads) * NUM_SPLITS  # (BLOCK_G,) first split of each head
    # Merge the splits one by one, weights exp2(lse - running max); split 0 is never empty, so
    # the max is finite from the first step, and empty splits (lse = -inf) weigh 0.
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    w_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for split in range(NUM_SPLITS):
        lse = tl.load(part_lse_ptr + rows + split, mask=g < GROUP, other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        part = tl.load(part_out_ptr + (rows + split)[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
        acc = acc * alpha[:, None] + part * w[:, None]
        w_sum = w_sum * alpha + w
        m = m_new
    o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, (acc / w_sum[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Splits per sequence: enough (batch * Hk * splits) programs for ~2 waves over the SMs, but no
    split shorter than MIN_TOKENS_PER_SPLIT tokens; a power of two (each value compiles a kernel)."""
    wanted = math.ceil(2 * num_sms / max(1, batch * num_kv_heads))
    wanted = min(wanted, math.ceil(max_seq_len / MIN_TOKENS_PER_SPLIT), MAX_SPLITS)
    return 1 if wanted <= 1 else triton.next_power_of_2(wanted)


def paged_decode_attention(
    q: Tensor,
    kv_layer: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    kv_scale: float | None = None,
) -> Tensor:
    """Triton decode attention: q (B, Hq, D), one token per sequence -> new (B, Hq, D).

    kv_layer (num_blocks, 2, block_size, Hk, D), block_tables (B, max_blocks) int32, seq_lens (B,)
    int32 (>= 1, the query token included): as in :func:`paged_attention_ref`. num_splits, a power of
    two <= MAX_SPLITS, defaults to :func:`choose_num_splits`, fed max_seq_len or, without it, the
    sync-free bound max_blocks * block_size. A float8_e4m3fn kv_layer is read as page * kv_scale.
    Raises ValueError on shape/stride/dtype/device mismatch.
    """
    check_paged_args(q, kv_layer, block_tables, seq_lens, scale, sliding_window, kv_scale)
    split_kernel = launchable(_decode_split_kernel, q.device)
    reduce_kernel = launchable(_decode_reduce_kernel, q.device)
    batch, num_q_heads, head_dim = q.shape
    check(block_tables.shape[0] == batch, f"decode needs one query row per sequence: q has {batch} rows, "
          f"block_tables {block_tables.shape[0]}")  # fmt: skip
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    if num_splits is None:
        bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        num_splits = choose_num_splits(batch, num_kv_heads, bound, sms)
    check(1 <= num_splits <= MAX_SPLITS and num_splits & (num_splits - 1) == 0,
          f"num_splits must be a power of two in [1, {MAX_SPLITS}], got {num_splits}")  # fmt: skip
    out = torch.empty((batch, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    part_out = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    group = num_q_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    block_g = max(16, triton.next_power_of_2(group))
    split_kernel[(batch, num_kv_heads, num_splits)](
        q, kv_layer, block_tables, seq_lens, out, part_out, part_lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        block_tables.stride(0), scale * math.log2(math.e), sliding_window or 0, kv_scale or 1.0, num_q_heads,
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=64, NUM_SPLITS=num_splits, HAS_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", KV_FP8=kv_layer.dtype != q.dtype,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if num_splits > 1:
        reduce_kernel[(batch, num_kv_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1), num_q_heads,
            GROUP=group, BLOCK_G=triton.next_power_of_2(group), HEAD_DIM=head_dim, BLOCK_D=block_d,
            NUM_SPLITS=num_splits, num_warps=4,
        )  # fmt: skip
    return out
