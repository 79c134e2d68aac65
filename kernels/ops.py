"""Backend selection: one ``Ops`` bundle of kernel callables: Triton, the CPU bundle, or the references.

The engine asks once, ``ops = select_ops(backend, device)``, and calls ``ops.rms_norm(...)`` etc.;
no module-level switch exists, so two engines in one process may use different backends.
On CPU, "auto" is CPU_OPS: C++ kernels built on first use by the system C++ compiler, paged
attention reading pages in place (kernels/paged_attention_cpu.py) and the layer's small ops in one
pass each (kernels/layer_ops_cpu.py); each library that could not be built (logged once) leaves its
ops to the PyTorch references. "torch" is the references alone: the reference path on any device.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from kernels._triton import HAS_TRITON, is_interpreted
from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.kv_store import store_kv, store_kv_ref
from kernels.layer_ops_cpu import load_kernels, rms_norm_cpu, rotary_cpu, silu_and_mul_cpu, store_kv_cpu
from kernels.paged_attention import paged_attention_ref
from kernels.paged_attention_cpu import load_kernel, paged_attention_cpu
from kernels.paged_decode import paged_decode_attention
from kernels.paged_extend import paged_extend_attention
from kernels.rmsnorm import _rms_norm_kernel, rms_norm, rms_norm_ref
from kernels.rotary import rotary, rotary_ref

BACKENDS = ("auto", "torch", "triton")


class Ops(NamedTuple):
    """The hot-path kernels of one backend; each has its reference's signature (see kernels/*.py).

    ``paged_attention(q, kv_layer, block_tables, query_start_loc, seq_lens, scale,
    sliding_window=None, *, max_query_len=None, max_seq_len=None, kv_scale=None)``: the two length
    hints let the Triton path size its grids without reading device memory; the torch path ignores
    them. ``kv_scale`` (also a keyword of ``store_kv``) is the scale of a float8_e4m3fn pool.
    """

    rms_norm: Callable[..., Tensor | tuple[Tensor, Tensor]]
    rotary: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    silu_and_mul: Callable[[Tensor], Tensor]
    store_kv: Callable[..., None]
    paged_attention: Callable[..., Tensor]


def torch_paged_attention(
    q: Tensor,
    kv_layer: Tensor,
    block_tables: Tensor,
    query_start_loc: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    kv_scale: float | None = None,
) -> Tensor:
    """:func:`paged_attention_ref` accepting (and ignoring) the Triton path's grid hints."""
    return paged_attention_ref(
        q, kv_layer, block_tables, query_start_loc, seq_lens, scale, sliding_window, kv_scale
    )


def cpu_paged_attention(
    q: Tensor,
    kv_layer: Tensor,
    block_tables: Tensor,
    query_start_loc: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    kv_scale: float | None = None,
) -> Tensor:
    """:func:`paged_attention_cpu` (no page gathering) accepting (and ignoring) the grid hints."""
    return paged_attention_cpu(
        q, kv_layer, block_tables, query_start_loc, seq_lens, scale, sliding_window, kv_scale
    )


def triton_paged_attention(
    q: Tensor,
    kv_layer: Tensor,
    block_tables: Tensor,
    query_start_loc: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    kv_scale: float | None = None,
) -> Tensor:
    """Decode kernel when every q_len is 1, else the extend kernel; never syncs with the device.

    Every q_len >= 1 and they sum to T, so "all q_len == 1" is exactly T == B (or the hint says so).
    """
    if max_query_len == 1 or (max_query_len is None and q.shape[0] == block_tables.shape[0]):
        return paged_decode_attention(
            q, kv_layer, block_tables, seq_lens, scale, sliding_window, max_seq_len=max_seq_len, kv_scale=kv_scale
        )
    return paged_extend_attention(
        q, kv_layer, block_tables, query_start_loc, seq_lens, scale, sliding_window, max_query_len, kv_scale
    )


TORCH_OPS = Ops(rms_norm_ref, rotary_ref, silu_and_mul_ref, store_kv_ref, torch_paged_attention)
TRITON_OPS = Ops(rms_norm, rotary, silu_and_mul, store_kv, triton_paged_attention)
CPU_OPS = Ops(rms_norm_cpu, rotary_cpu, silu_and_mul_cpu, store_kv_cpu, cpu_paged_attention)


def cpu_ops() -> Ops:
    """CPU_OPS, less what could not be built: those ops are the references (each failure logged once,
    by the cached loaders)."""
    ops = TORCH_OPS
    if load_kernel() is not None:
        ops = ops._replace(paged_attention=CPU_OPS.paged_attention)
    if load_kernels() is not None:
        ops = ops._replace(rms_norm=CPU_OPS.rms_norm, rotary=CPU_OPS.rotary, silu_and_mul=CPU_OPS.silu_and_mul,
                           store_kv=CPU_OPS.store_kv)  # fmt: skip
    return CPU_OPS if ops == CPU_OPS else ops  # the constant itself: callers may test identity


def select_ops(backend: str = "auto", device: torch.device | str = "cpu") -> Ops:
    """The kernels for ``device``: backend "auto", "torch" or "triton".

    "auto": Triton on CUDA; on CPU, :func:`cpu_ops` (CPU_OPS where both C++ libraries were built).
    "torch": the PyTorch references alone, on any device.

    "triton" on CPU runs every kernel through the Triton interpreter (slow: for tests), which needs
    TRITON_INTERPRET=1 in the environment before triton is first imported. Raises ValueError for an unknown backend,
    a missing triton package, a device other than CPU/CUDA, or Triton on CPU without that opt-in.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    dev = torch.device(device)
    if backend == "auto" and dev.type == "cpu":
        return cpu_ops()
    if backend == "torch" or (backend == "auto" and (dev.type != "cuda" or not HAS_TRITON)):
        return TORCH_OPS
    if not HAS_TRITON:
        raise ValueError("backend 'triton' needs the triton package, which is not installed")
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET", "").lower() not in ("1", "true", "on", "yes"):
        raise ValueError(
            "backend 'triton' on CPU runs the Triton interpreter and requires TRITON_INTERPRET=1 "
            "in the environment (or use backend 'torch' / 'auto' on CPU)"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"backend 'triton' runs on CUDA (or CPU through the interpreter), not {dev.type}")
    interpreted = is_interpreted(_rms_norm_kernel)
    if dev.type == "cpu" and not interpreted:
        raise ValueError("TRITON_INTERPRET=1 is set, but triton was imported before it was: set it first")
    if dev.type == "cuda" and interpreted:
        raise ValueError("triton was imported under TRITON_INTERPRET=1, which cannot drive CUDA tensors")
    return TRITON_OPS
