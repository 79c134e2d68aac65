"""Attention over the paged KV cache: decode, chunked prefill, prefix hits, speculative verification.

Layout (one layer)::

    kv_layer      (num_blocks, 2, block_size, Hk, D)   [:, 0] = K, [:, 1] = V
    block_tables  (B, max_blocks) int32                row b lists the blocks of sequence b
    query_start_loc (B+1,) int32                       q rows of b: [qsl[b], qsl[b+1])
    seq_lens      (B,) int32                           KV tokens of b, its new tokens included

    seq b:   block_tables[b] = [7, 2, 9, ...]
             key position p lives in kv_layer[block_tables[b, p // bs], :, p % bs]
             query row i sits at position seq_lens[b] - q_len_b + i and sees keys [0, pos]
             (and only pos - key_pos < sliding_window when a window is set).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import FLOAT_DTYPES, check, check_tensor


def _attend_same_qlen(
    q: Tensor,
    kv_layer: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int | None,
    kv_scale: float | None = None,
) -> Tensor:
    """q (n, L_q, Hq, D) for n sequences sharing one q_len -> (n, L_q, Hq, D), one gather + one SDPA.

    kv_scale: a float8_e4m3fn pool holds value / kv_scale; other pools ignore it."""
    n, q_len, _, _ = q.shape
    block_size = kv_layer.shape[2]
    num_blocks = (int(seq_lens.max()) + block_size - 1) // block_size
    # Unused block-table entries may hold anything: point them at block 0 (masked out below).
    cols = torch.arange(num_blocks, device=q.device)
    used = cols[None, :] < ((seq_lens[:, None] + block_size - 1) // block_size)
    table = torch.where(used, block_tables[:, :num_blocks].long(), 0)  # (n, num_blocks)
    kv = kv_layer[table]  # (n, num_blocks, 2, bs, Hk, D)
    k = kv[:, :, 0].flatten(1, 2).transpose(1, 2).float()  # (n, Hk, L, D)
    v = kv[:, :, 1].flatten(1, 2).transpose(1, 2).float()  # (n, Hk, L, D)
    if kv_layer.dtype == torch.float8_e4m3fn and kv_scale is not None:
        k, v = k * kv_scale, v * kv_scale
    q_pos = seq_lens[:, None].long() - q_len + torch.arange(q_len, device=q.device)  # (n, L_q)
    k_pos = torch.arange(k.shape[2], device=q.device)  # (L,)
    delta = q_pos[:, :, None] - k_pos[None, None, :]  # (n, L_q, L)
    mask = delta >= 0
    if sliding_window is not None:
        mask &= delta < sliding_window
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=True
    )  # (n, Hq, L_q, D)
    return out.transpose(1, 2).to(q.dtype)


def paged_attention_ref(
    q: Tensor,
    kv_layer: Tensor,
    block_tables: Tensor,
    query_start_loc: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    kv_scale: float | None = None,
) -> Tensor:
    """PyTorch reference (and the engine's CPU path): q (T, Hq, D) -> (T, Hq, D), same dtype.

    Causal attention of each sequence's query rows over its paged context (see module doc);
    GQA query head h reads KV head ``h // (Hq // Hk)``; softmax in float32.
    Sequences with q_len == 1 are batched into one gather + one SDPA, and so are longer queries
    sharing a q_len. Syncs with the device to read query_start_loc and seq_lens.
    Raises ValueError when a sequence has q_len < 1 or seq_len < q_len, or sliding_window < 1.
    A float8_e4m3fn kv_layer (kernels/kv_store.py) is read as ``float(page) * kv_scale``.
    """
    if kv_layer.dtype == torch.float8_e4m3fn and (kv_scale is None or kv_scale <= 0):
        raise ValueError(f"an fp8 KV cache needs kv_scale > 0, got {kv_scale}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [starts[b + 1] - starts[b] for b in range(len(lens))]
    for b, (q_len, seq_len) in enumerate(zip(q_lens, lens, strict=True)):
        if q_len < 1 or seq_len < q_len:
            raise ValueError(
                f"sequence {b}: need 1 <= q_len <= seq_len, got q_len={q_len}, seq_len={seq_len}"
            )
    out = torch.empty_like(q)
    decode = [b for b, q_len in enumerate(q_lens) if q_len == 1]
    if decode:
        idx = torch.tensor(decode, device=q.device)
        rows = query_start_loc[idx].long()  # (n,) the one query row of each decode sequence
        out[rows] = _attend_same_qlen(
            q[rows][:, None], kv_layer, block_tables[idx], seq_lens[idx], scale, sliding_window, kv_scale
        )[:, 0]
    # Longer queries: one gather + SDPA per distinct q_len (speculative verification gives many
    # sequences the same k + 1), so a batch of equal-length extends costs one call, not one each.
    by_len: dict[int, list[int]] = {}
    for b, q_len in enumerate(q_lens):
        if q_len > 1:
            by_len.setdefault(q_len, []).append(b)
    for q_len, group in by_len.items():
        idx = torch.tensor(group, device=q.device)
        rows = query_start_loc[idx].long()[:, None] + torch.arange(q_len, device=q.device)  # (n, q_len)
        out[rows] = _attend_same_qlen(
            q[rows], kv_layer, block_tables[idx], seq_lens[idx], scale, sliding_window, kv_scale
        )  # (n, q_len, Hq, D)
    return out


def check_paged_args(
    q: Tensor,
    kv_layer: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int | None,
    kv_scale: float | None = None,
) -> None:
    """Launcher checks shared by the decode and extend kernels; raises ValueError on any mismatch.

    Values inside block_tables / seq_lens are not checked (that would sync with the device).
    kv_layer is in q's dtype, or float8_e4m3fn with a kv_scale > 0 (ignored for other pools).
    """
    device = q.device
    check_tensor("q", q, 3, FLOAT_DTYPES, device)
    check_tensor("kv_layer", kv_layer, 5, (q.dtype, torch.float8_e4m3fn), device)
    check(kv_layer.dtype != torch.float8_e4m3fn or (kv_scale is not None and kv_scale > 0),
          f"an fp8 KV cache needs kv_scale > 0, got {kv_scale}")  # fmt: skip
    check_tensor("block_tables", block_tables, 2, (torch.int32,), device)
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,), device)
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    _, two, _, num_kv_heads, kv_head_dim = kv_layer.shape
    check(two == 2, f"kv_layer must be (num_blocks, 2, block_size, Hk, D), got {tuple(kv_layer.shape)}")
    check(kv_head_dim == head_dim, f"kv_layer head dim {kv_head_dim} != q head dim {head_dim}")
    check(head_dim >= 16, f"head_dim must be >= 16 for tl.dot, got {head_dim}")
    check(num_kv_heads > 0 and num_q_heads % num_kv_heads == 0,
          f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")  # fmt: skip
    batch = block_tables.shape[0]
    check(
        seq_lens.shape == (batch,),
        f"seq_lens must be ({batch},) like block_tables rows, got {tuple(seq_lens.shape)}",
    )
    check(scale > 0, f"scale must be > 0, got {scale}")
    check(
        sliding_window is None or sliding_window >= 1,
        f"sliding_window must be >= 1 or None, got {sliding_window}",
    )
