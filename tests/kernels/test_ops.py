"""select_ops: backend choice, its errors, attention dispatch, and one layer through both backends."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch

from kernels import rms_norm_ref, silu_and_mul_ref
from kernels.layer_ops_cpu import load_kernels
from kernels.ops import CPU_OPS, TORCH_OPS, TRITON_OPS, Ops, cpu_ops, select_ops
from kernels.paged_attention import paged_attention_ref
from kernels.paged_attention_cpu import load_kernel
from kernels.rotary import build_cos_sin_cache


def test_backend_choice(device: torch.device) -> None:
    assert select_ops() == cpu_ops()
    assert select_ops("torch") is TORCH_OPS
    assert select_ops("auto", "cpu").rms_norm is (CPU_OPS.rms_norm if load_kernels() is not None else rms_norm_ref)
    assert select_ops("auto", "cpu").paged_attention is (
        CPU_OPS.paged_attention if load_kernel() is not None else TORCH_OPS.paged_attention)
    assert select_ops("torch", device).silu_and_mul is silu_and_mul_ref
    assert select_ops("triton", device) is TRITON_OPS
    if device.type == "cuda":
        assert select_ops("auto", device) is TRITON_OPS


def test_backend_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        select_ops("cuda")
    with pytest.raises(ValueError, match="not meta"):
        select_ops("triton", "meta")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="requires TRITON_INTERPRET=1"):
        select_ops("triton", "cpu")


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [1, 40, 1]])
@pytest.mark.parametrize("hint", [False, True])
def test_paged_attention_dispatch(
    make_paged: Callable[..., Any], device: torch.device, q_lens: list[int], hint: bool
) -> None:
    # All q_len == 1 goes to the decode kernel (T == B), anything else to the extend kernel.
    b = make_paged(q_lens, [70, 40, 5], 2, 4, 64, 16, torch.float32, device)
    args = (b.q, b.kv_layer, b.block_tables, b.query_start_loc, b.seq_lens, 0.125, 32)
    hints = {"max_query_len": max(q_lens), "max_seq_len": 70} if hint else {}
    out = select_ops("triton", device).paged_attention(*args, **hints)
    torch.testing.assert_close(out, paged_attention_ref(*args))
    torch.testing.assert_close(
        select_ops("torch").paged_attention(*args, **hints), paged_attention_ref(*args)
    )


class Step(NamedTuple):
    """The engine-side metadata of one forward step of a single sequence."""

    positions: torch.Tensor  # (T,) int64
    slots: torch.Tensor  # (T,) int64
    block_tables: torch.Tensor  # (1, max_blocks) int32
    query_start_loc: torch.Tensor  # (2,) int32
    seq_lens: torch.Tensor  # (1,) int32


def layer_step(
    ops: Ops, w: dict[str, torch.Tensor], x: torch.Tensor, kv: torch.Tensor, cache: torch.Tensor, step: Step
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Qwen3-style decoder layer (4 query heads, 2 KV heads, head_dim 64) on a paged cache."""
    t = x.shape[0]
    qkv = ops.rms_norm(x, w["ln1"], 1e-6) @ w["qkv"]  # (T, (4 + 2 + 2) * 64)
    q = ops.rms_norm(qkv[:, :256].reshape(t * 4, 64), w["qn"], 1e-6).view(t, 4, 64)
    k = ops.rms_norm(qkv[:, 256:384].reshape(t * 2, 64), w["kn"], 1e-6).view(t, 2, 64)
    v = qkv[:, 384:].view(t, 2, 64)
    q, k = ops.rotary(step.positions, q, k, cache)
    ops.store_kv(k, v, kv, step.slots)
    attn = ops.paged_attention(q, kv, step.block_tables, step.query_start_loc, step.seq_lens, 0.125)
    h, residual = ops.rms_norm(attn.reshape(t, 256) @ w["o"], w["ln2"], 1e-6, x)
    return ops.silu_and_mul(h @ w["up"]) @ w["down"], residual


def test_layer_through_both_backends(device: torch.device) -> None:
    # A 9-token prompt in chunks of 6 and 3 (the second over a cached prefix), then two decode
    # steps: every op of both backends on the same inputs must agree.
    gen = torch.Generator().manual_seed(0)
    shapes = {"ln1": (128,), "qkv": (128, 512), "qn": (64,), "kn": (64,), "o": (256, 128), "ln2": (128,),
              "up": (128, 512), "down": (256, 128)}  # fmt: skip
    weights = {
        name: (torch.randn(*s, generator=gen) / math.sqrt(s[0])).to(device) for name, s in shapes.items()
    }
    cache = build_cos_sin_cache(64, 64, 10000.0, None, device=device)
    table = torch.tensor([[3, 0, 5]], dtype=torch.int32, device=device)  # block size 4, shuffled
    kvs = {name: torch.zeros(6, 2, 4, 2, 64, device=device) for name in ("torch", "triton")}
    tokens = torch.randn(11, 128, generator=gen).to(device)
    for lo, hi in ((0, 6), (6, 9), (9, 10), (10, 11)):
        positions = torch.arange(lo, hi, device=device)
        step = Step(
            positions=positions,
            slots=(table[0, positions // 4] * 4 + positions % 4).long(),
            block_tables=table,
            query_start_loc=torch.tensor([0, hi - lo], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([hi], dtype=torch.int32, device=device),
        )
        out_torch = layer_step(select_ops("torch"), weights, tokens[lo:hi], kvs["torch"], cache, step)
        out_triton = layer_step(
            select_ops("triton", device), weights, tokens[lo:hi], kvs["triton"], cache, step
        )
        torch.testing.assert_close(out_triton, out_torch)
        torch.testing.assert_close(kvs["triton"], kvs["torch"])
