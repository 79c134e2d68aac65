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

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import FLOAT_DTYPES, check, check_tensor

_PADDED_Q_LEN = 32  # queries up to this long share padded calls (verification: 1 + k <= 17)
# Padded K bytes one batched call gathers. Sequences are grouped by context length under this cap:
# a gather small enough to stay in cache until SDPA reads it costs a fraction of one that spills to
# memory (a 64 x 400-token decode batch, 8 x 64 fp32 heads: 33 ms per layer grouped, 257 ms as one call).
_GROUP_BYTES = 1 << 20


@dataclass(frozen=True)
class _Group:
    """Sequences attended in one gather + SDPA (n of them, queries padded to W rows, contexts to L)."""

    rows: Tensor  # (n, W) int64 query rows, right-aligned: a shorter query's pad rows repeat its first
    real: Tensor | None  # (n, W) bool, False on pad rows; None when no row pads
    table: Tensor  # (n, num_blocks) int64 block ids, unused entries pointed at block 0 (masked)
    max_len: int  # L: the longest context of the group
    mask: Tensor | None  # (n, 1, G*W, L) bool: which keys each query row sees; None: all of them


def _plan(
    query_start_loc: Tensor, seq_lens: Tensor, block_tables: Tensor, block_size: int, token_bytes: int,
    group: int, sliding_window: int | None,
) -> list[_Group]:
    """Group the batch's sequences and build their indices and masks (the same for every layer)."""
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [starts[b + 1] - starts[b] for b in range(len(lens))]
    for b, (q_len, seq_len) in enumerate(zip(q_lens, lens, strict=True)):
        if q_len < 1 or seq_len < q_len:
            raise ValueError(f"sequence {b}: need 1 <= q_len <= seq_len, got q_len={q_len}, seq_len={seq_len}")
    kinds: dict[int, list[int]] = {}  # 1: decodes, 0: short queries, n > 32: queries of n rows
    for b, q_len in enumerate(q_lens):
        kinds.setdefault(q_len if q_len == 1 or q_len > _PADDED_Q_LEN else 0, []).append(b)
    dev = seq_lens.device
    plan = []
    for members in kinds.values():
        for run in _groups(members, lens, token_bytes):
            n, width, max_len = len(run), max(q_lens[b] for b in run), max(lens[b] for b in run)
            idx = torch.tensor(run, device=dev)
            q_len_t = torch.tensor([q_lens[b] for b in run], device=dev)  # (n,)
            sl = seq_lens[idx].long()  # (n,)
            offset = torch.arange(width, device=dev)[None, :] - (width - q_len_t[:, None])  # (n, W)
            rows = query_start_loc[idx].long()[:, None] + offset.clamp(min=0)  # (n, W)
            padded = any(q_lens[b] != width for b in run)
            num_blocks = (max_len + block_size - 1) // block_size
            used = torch.arange(num_blocks, device=dev)[None, :] < ((sl[:, None] + block_size - 1) // block_size)
            table = torch.where(used, block_tables[idx, :num_blocks].long(), 0)  # (n, num_blocks)
            mask = None
            if width > 1 or sliding_window is not None or any(lens[b] != max_len for b in run):
                q_pos = sl[:, None] - width + torch.arange(width, device=dev)  # (n, W)
                k_pos = torch.arange(max_len, device=dev)  # (L,)
                delta = q_pos[:, :, None] - k_pos[None, None, :]  # (n, W, L)
                mask = delta >= 0
                if sliding_window is not None:
                    mask &= delta < sliding_window
                if padded:  # pad rows see key 0 alone, so no softmax row is empty
                    mask = torch.where((offset < 0)[:, :, None], k_pos[None, None, :] == 0, mask)
                mask = mask[:, None, None].expand(n, 1, group, width, max_len).reshape(n, 1, group * width, max_len)
            plan.append(_Group(rows, offset >= 0 if padded else None, table, max_len, mask))
    return plan


class _PlanCache:
    """The last batch's plan: every layer of a forward passes the same index tensors, so the grouping
    is built once per forward. A hit needs equal contents (copies are kept: a few small tensors)."""

    def __init__(self) -> None:
        self._params: tuple | None = None
        self._tensors: tuple[Tensor, ...] = ()
        self._plan: list[_Group] = []

    def get(self, tensors: tuple[Tensor, ...], params: tuple, build: Callable[[], list[_Group]]) -> list[_Group]:
        hit = params == self._params and all(
            a.shape == b.shape and a.device == b.device and torch.equal(a, b)
            for a, b in zip(tensors, self._tensors, strict=True)
        )
        if not hit:
            self._plan = build()
            self._params, self._tensors = params, tuple(t.clone() for t in tensors)
        return self._plan


_plans = threading.local()  # engines on different threads (prefill and decode in one process) plan apart


def _attend_group(q: Tensor, kv_layer: Tensor, g: _Group, scale: float, kv_scale: float | None) -> Tensor:
    """Attention of one group: q (n, W, Hq, D) -> (n, W, Hq, D); pad rows come out as junk.

    kv_scale: a float8_e4m3fn pool holds value / kv_scale; other pools ignore it.
    """
    n, width, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    group = num_q_heads // num_kv_heads
    length = g.table.shape[1] * block_size
    # K and V gathered apart, each one contiguous copy; (n, Hk, L, D) are views of them. index_select
    # copies whole pages at memory speed (advanced indexing, kv[table], is ~6x slower on CPU).
    blocks = g.table.view(-1)
    k = kv_layer[:, 0].index_select(0, blocks).view(n, length, num_kv_heads, head_dim)[:, : g.max_len].transpose(1, 2)
    v = kv_layer[:, 1].index_select(0, blocks).view(n, length, num_kv_heads, head_dim)[:, : g.max_len].transpose(1, 2)
    if kv_layer.dtype != torch.float32:
        k, v = k.float(), v.float()
        if kv_layer.dtype == torch.float8_e4m3fn and kv_scale is not None:
            k, v = k * kv_scale, v * kv_scale
    # GQA without copying K/V: the G query heads of KV head h become G x W query rows of h
    qg = q.float().view(n, width, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    qg = qg.reshape(n, num_kv_heads, group * width, head_dim)  # (n, Hk, G*W, D)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=g.mask, scale=scale)  # (n, Hk, G*W, D)
    out = out.view(n, num_kv_heads, group, width, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(n, width, num_q_heads, head_dim).to(q.dtype)


def _groups(members: list[int], lens: list[int], token_bytes: int) -> list[list[int]]:
    """`members` sorted by context length and cut into runs whose padded K stays under _GROUP_BYTES."""
    runs: list[list[int]] = [[]]
    for b in sorted(members, key=lens.__getitem__):
        if runs[-1] and (len(runs[-1]) + 1) * lens[b] * token_bytes > _GROUP_BYTES:
            runs.append([])
        runs[-1].append(b)
    return runs if runs[0] else []


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
    Sequences are batched into few gathers + SDPA calls: decodes (q_len 1) together, queries of
    2..32 rows together (padded: speculative verification), longer ones by equal q_len; within each
    kind, sorted by context length into groups whose gathered K fits in cache (`_GROUP_BYTES`).
    The grouping is built once for the layers of one forward (same index tensors, unchanged).
    Syncs with the device to read query_start_loc and seq_lens.
    Raises ValueError when a sequence has q_len < 1 or seq_len < q_len, or sliding_window < 1.
    A float8_e4m3fn kv_layer (kernels/kv_store.py) is read as ``float(page) * kv_scale``.
    """
    if kv_layer.dtype == torch.float8_e4m3fn and (kv_scale is None or kv_scale <= 0):
        raise ValueError(f"an fp8 KV cache needs kv_scale > 0, got {kv_scale}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    block_size, num_kv_heads, head_dim = kv_layer.shape[2:]
    params = (block_size, num_kv_heads * head_dim * 4, q.shape[1] // num_kv_heads, sliding_window)
    if not hasattr(_plans, "cache"):
        _plans.cache = _PlanCache()
    plan = _plans.cache.get((query_start_loc, seq_lens, block_tables), params,
                            lambda: _plan(query_start_loc, seq_lens, block_tables, *params))
    out = torch.empty_like(q)
    for g in plan:
        rows = g.rows.view(-1)
        res = _attend_group(q.index_select(0, rows).view(*g.rows.shape, *q.shape[1:]), kv_layer, g, scale,
                            kv_scale)  # (n, W, Hq, D)
        if g.real is None:
            out.index_copy_(0, rows, res.reshape(-1, *res.shape[2:]))
        else:
            out[g.rows[g.real]] = res[g.real]
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
