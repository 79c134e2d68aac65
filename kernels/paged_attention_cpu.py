"""Paged attention on CPU that reads the KV pool in place: a C++ kernel built on first use.

:func:`paged_attention_cpu` has the signature and the answer of
:func:`kernels.paged_attention.paged_attention_ref` (its reference, which documents the layout), but
never gathers pages: each work item walks one sequence's block table and reads the pages where they
lie, with an online softmax across them (``paged_attention_cpu.cpp``)::

    kv_layer (num_blocks, 2, bs, Hk, D)         item (sequence b, KV heads, a tile of query rows)
      block 7 [K rows | V rows] <--- table[b, 0]     S = Q . K_page^T   (rows x bs), masked on
      block 2 [K rows | V rows] <--- table[b, 1]     m, l = running max, sum       the diagonal
      block 9 ...                                    O = O * exp(m_old - m) + exp(S - m) . V_page

A decode (or any query of up to 192 / Hq positions) is one item holding all its heads, so each page
is read whole, once; a prefill chunk is tiles of 192 query rows per KV head. Items go to the torch
intra-op threads largest first.

Building: kernels/cpu_build.py compiles the source with the system C++ compiler once per machine,
about 5 s, into ``$TANDEM_CACHE_DIR/kernels`` (else ``$XDG_CACHE_HOME/tandem/kernels``, else
``~/.cache/tandem/kernels``); every later process only loads it. Where there is no compiler, or it
fails, :func:`load_kernel` logs why once and returns None, and ``select_ops`` keeps the reference:
the choice is made once, when the engine picks its kernels, never per call.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kernels import cpu_build
from kernels._triton import FLOAT_DTYPES, check, check_tensor
from kernels.paged_attention import paged_attention_ref

SOURCE = Path(__file__).with_name("paged_attention_cpu.cpp")
_KV_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e4m3fn: 3}
_I64, _INT, _FLOAT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_ARGTYPES: list[Any] = [
    _PTR, _I64, _I64,  # q (float32), its token and head strides
    _PTR, _INT, _I64, _I64, _I64, _I64,  # kv_layer, its dtype code, block / K-V / slot / head strides
    _PTR, _I64, _PTR, _PTR,  # block_tables, its row stride, query_start_loc, seq_lens
    _PTR,  # out (T, Hq, D) float32, contiguous
    _I64, _I64, _I64, _I64, _I64, _I64,  # B, T, Hq, Hk, D, block_size
    _I64, _I64, _I64,  # num_blocks, block_tables' columns, sliding window (0: none)
    _FLOAT, _FLOAT,  # scale, kv_scale
]  # fmt: skip


@functools.cache
def load_kernel() -> Callable[..., int] | None:
    """The compiled kernel's entry point, built if needed (kernels/cpu_build.py); None (logged once,
    with the reason) when there is no C++ compiler or the build or load fails."""
    lib = cpu_build.load_library(SOURCE, "the CPU attention kernel", "the gathering reference")
    if lib is None:
        return None
    return cpu_build.entry_points(lib, SOURCE, {"paged_attention": _ARGTYPES})["paged_attention"]


def paged_attention_cpu(
    q: Tensor,
    kv_layer: Tensor,
    block_tables: Tensor,
    query_start_loc: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    kv_scale: float | None = None,
) -> Tensor:
    """:func:`paged_attention_ref`'s answer without gathering: q (T, Hq, D) -> (T, Hq, D), same dtype.

    kv_layer (num_blocks, 2, bs, Hk, D) in q's dtype or float8_e4m3fn (read as page * kv_scale),
    any strides with a unit last one; block_tables (B, max_blocks), query_start_loc (B+1,) and
    seq_lens (B,) int32 on the CPU. A head_dim that is not a multiple of 8 goes to the reference.
    Computes in float32. Raises ValueError as the reference does (q_len < 1 or seq_len < q_len,
    sliding_window < 1, an fp8 pool without kv_scale > 0), on mismatched shapes, dtypes or devices,
    and RuntimeError when the kernel could not be built (see :func:`load_kernel`).
    """
    if not _plainly_valid(q, kv_layer, block_tables, query_start_loc, seq_lens, sliding_window, kv_scale):
        _check_args(q, kv_layer, block_tables, query_start_loc, seq_lens, sliding_window, kv_scale)
    t, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    batch = seq_lens.shape[0]
    if head_dim % 8:
        return paged_attention_ref(q, kv_layer, block_tables, query_start_loc, seq_lens, scale, sliding_window,
                                   kv_scale)  # fmt: skip
    kernel = load_kernel()
    if kernel is None:
        raise RuntimeError("the CPU attention kernel is unavailable (see the log); use paged_attention_ref")
    qf = q.float() if q.dtype != torch.float32 else q  # (T, Hq, D), unit last stride
    out = torch.empty(t, num_q_heads, head_dim, dtype=torch.float32)
    tables = block_tables.contiguous()
    qsl, lens = query_start_loc.contiguous(), seq_lens.contiguous()
    sb, sk, ss, sh, _ = kv_layer.stride()
    rc = kernel(qf.data_ptr(), qf.stride(0), qf.stride(1), kv_layer.data_ptr(), _KV_TYPES[kv_layer.dtype], sb, sk,
                ss, sh, tables.data_ptr(), tables.stride(0), qsl.data_ptr(), lens.data_ptr(), out.data_ptr(), batch,
                t, num_q_heads, num_kv_heads, head_dim, block_size, kv_layer.shape[0], tables.shape[1],
                sliding_window or 0, scale, kv_scale if kv_layer.dtype == torch.float8_e4m3fn else 1.0)  # fmt: skip
    if rc < 0:
        raise ValueError(_error(rc, query_start_loc, seq_lens, t, block_size, kv_layer.shape[0]))
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def _plainly_valid(q: Tensor, kv_layer: Tensor, block_tables: Tensor, query_start_loc: Tensor, seq_lens: Tensor,
                   sliding_window: int | None, kv_scale: float | None) -> bool:
    """True only where :func:`_check_args` passes, in plain comparisons that build no message (this runs
    every call); False also where only its stricter strides fail, and then the full checks run."""
    qn, kn, tn = q.shape, kv_layer.shape, block_tables.shape
    if len(qn) != 3 or len(kn) != 5 or len(tn) != 2 or query_start_loc.dim() != 1 or seq_lens.dim() != 1:
        return False
    batch = seq_lens.shape[0]
    return (q.dtype in FLOAT_DTYPES and q.is_cpu and kv_layer.is_cpu and q.stride()[2] == 1
            and (kv_layer.dtype == q.dtype or (kv_layer.dtype == torch.float8_e4m3fn and kv_scale is not None
                                               and kv_scale > 0))
            and kv_layer.stride()[4] == 1 and (sliding_window is None or sliding_window >= 1)
            and block_tables.dtype == torch.int32 and block_tables.is_cpu and block_tables.stride()[1] == 1
            and query_start_loc.dtype == torch.int32 and query_start_loc.is_cpu and query_start_loc.stride() == (1,)
            and seq_lens.dtype == torch.int32 and seq_lens.is_cpu and seq_lens.stride() == (1,)
            and kn[1] == 2 and kn[4] == qn[2] and qn[1] % kn[3] == 0
            and tn[0] == batch and query_start_loc.shape[0] == batch + 1)  # fmt: skip


def _check_args(q: Tensor, kv_layer: Tensor, block_tables: Tensor, query_start_loc: Tensor, seq_lens: Tensor,
                sliding_window: int | None, kv_scale: float | None) -> None:
    """Raise ValueError naming the first thing wrong with :func:`paged_attention_cpu`'s arguments, if any."""
    cpu = torch.device("cpu")
    check_tensor("q", q, 3, FLOAT_DTYPES, cpu)
    check_tensor("kv_layer", kv_layer, 5, (q.dtype, torch.float8_e4m3fn), cpu)
    check(kv_layer.dtype != torch.float8_e4m3fn or (kv_scale is not None and kv_scale > 0),
          f"an fp8 KV cache needs kv_scale > 0, got {kv_scale}")  # fmt: skip
    check(sliding_window is None or sliding_window >= 1, f"sliding_window must be >= 1 or None, got {sliding_window}")
    check_tensor("block_tables", block_tables, 2, (torch.int32,), cpu)
    check_tensor("query_start_loc", query_start_loc, 1, (torch.int32,), cpu)
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,), cpu)
    _, num_q_heads, head_dim = q.shape
    _, two, block_size, num_kv_heads, kv_head_dim = kv_layer.shape
    batch = seq_lens.shape[0]
    check(two == 2 and kv_head_dim == head_dim,
          f"kv_layer must be (num_blocks, 2, block_size, Hk, {head_dim}), got {tuple(kv_layer.shape)}")  # fmt: skip
    check(num_q_heads % num_kv_heads == 0,
          f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")  # fmt: skip
    check(block_tables.shape[0] == batch and query_start_loc.shape == (batch + 1,),
          f"block_tables ({tuple(block_tables.shape)}) and query_start_loc ({tuple(query_start_loc.shape)}) "
          f"must have {batch} rows and {batch + 1} entries, like seq_lens")  # fmt: skip


def _error(rc: int, query_start_loc: Tensor, seq_lens: Tensor, t: int, block_size: int, num_blocks: int) -> str:
    """The message for the kernel's refusal ``rc`` (see the return codes in paged_attention_cpu.cpp)."""
    batch = seq_lens.shape[0]
    b = -1 - rc if rc >= -batch else -1 - batch - rc
    lo, hi, seq_len = int(query_start_loc[b]), int(query_start_loc[b + 1]), int(seq_lens[b])
    if rc >= -batch:
        return (f"sequence {b}: need 1 <= q_len <= seq_len and query rows inside q's {t}, got rows [{lo}, {hi}), "
                f"seq_len={seq_len}")
    return (f"sequence {b}: its {-(-seq_len // block_size)} blocks must be in block_tables and name blocks "
            f"below {num_blocks}")
