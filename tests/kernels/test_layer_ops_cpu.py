"""The C++ CPU layer kernels (kernels/layer_ops_cpu.cpp) against their PyTorch references: every dtype
the engine runs on CPU, odd sizes (one token, widths that are no multiple of the 8-lane vectors),
strided views of a fused qkv output, GQA, fp8 pools, one and two threads, and the references' errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.activation import silu_and_mul_ref
from kernels.kv_store import FP8_KV_DTYPE, store_kv_ref
from kernels.layer_ops_cpu import (
    argmax_rows,
    load_kernels,
    rms_norm_cpu,
    rotary_cpu,
    silu_and_mul_cpu,
    store_kv_cpu,
)
from kernels.ops import CPU_OPS, TORCH_OPS, cpu_ops, select_ops
from kernels.paged_attention_cpu import load_kernel
from kernels.rmsnorm import rms_norm_ref
from kernels.rotary import build_cos_sin_cache, rotary_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6


@pytest.fixture(autouse=True)
def kernels() -> None:
    if load_kernels() is None:
        pytest.skip("no C++ compiler here: the engine uses the references (see the log)")


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_ops_bundle() -> None:
    assert cpu_ops() == (CPU_OPS if load_kernel() is not None else TORCH_OPS._replace(**{
        f: getattr(CPU_OPS, f) for f in ("rms_norm", "rotary", "silu_and_mul", "store_kv")}))  # fmt: skip
    assert select_ops("auto", "cpu") == cpu_ops()
    assert select_ops("torch", "cpu") is TORCH_OPS  # the reference path stays pure


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 32), (5, 7), (37, 45), (3, 576), (2, 1)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype: torch.dtype, tokens: int, hidden: int, with_residual: bool) -> None:
    x = randn(tokens, hidden, seed=hidden).to(dtype)
    weight = (1 + 0.1 * randn(hidden, seed=1)).to(dtype)
    residual = randn(tokens, hidden, seed=2).to(dtype) if with_residual else None
    got, want = rms_norm_cpu(x, weight, EPS, residual), rms_norm_ref(x, weight, EPS, residual)
    if residual is None:
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
        got, want = (got,), (want,)
    assert torch.equal(got[-1], want[-1]) or residual is None  # the new residual stream, exactly
    # the sum of squares is added in another order than torch's reduction: float32 differs in the last
    # bits; a half-precision result then rounds the same but for rare 1-ulp cases
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(got[0], want[0], **tol)


def test_rms_norm_threads_and_views(threads: int) -> None:
    qkv = randn(300, (4 + 2 * 2) * 64)
    rows = qkv[:, : 4 * 64].reshape(300 * 4, 64)  # Qwen3's q-norm rows (a copy: q is strided)
    strided = qkv[:, 64:128]  # rows with a row stride of 8 * 64
    weight = randn(64, seed=3)
    for x in (rows, strided):
        torch.testing.assert_close(rms_norm_cpu(x, weight, EPS), rms_norm_ref(x, weight, EPS), atol=1e-6, rtol=1e-6)
    out, res = rms_norm_cpu(strided, weight, EPS, strided * 2)
    assert torch.equal(res, strided * 3)


def test_rms_norm_falls_back_on_what_it_does_not_take() -> None:
    x, w = randn(4, 8), randn(8)
    torch.testing.assert_close(rms_norm_cpu(x.double(), w.double(), EPS), rms_norm_ref(x.double(), w.double(), EPS))
    torch.testing.assert_close(rms_norm_cpu(x.t(), w[:4], EPS), rms_norm_ref(x.t(), w[:4], EPS))  # strided columns
    with pytest.raises(RuntimeError):  # the reference's broadcasting error
        rms_norm_cpu(x, randn(5), EPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hq,hk,d", [(1, 2, 2, 16), (3, 6, 2, 64), (37, 9, 3, 64), (5, 4, 1, 10), (2, 1, 1, 2)])
def test_rotary_exact(dtype: torch.dtype, tokens: int, hq: int, hk: int, d: int, threads: int) -> None:
    qkv = randn(tokens, (hq + 2 * hk) * d, seed=d).to(dtype)  # q and k: strided views of a fused qkv
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    cache = build_cos_sin_cache(d, 4096, 10000.0, None)
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(tokens))
    got, want = rotary_cpu(positions, q, k, cache), rotary_ref(positions, q, k, cache)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # the same roundings, no FMA
    assert got[0].is_contiguous() and got[1].is_contiguous()


def test_rotary_many_tokens_and_errors(threads: int) -> None:
    q, k = randn(3000, 4, 32), randn(3000, 2, 32, seed=1)
    cache = build_cos_sin_cache(32, 100, 10000.0, None)
    positions = torch.arange(3000) % 100
    got, want = rotary_cpu(positions, q, k, cache), rotary_ref(positions, q, k, cache)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(IndexError, match="position 100 is outside"):
        rotary_cpu(torch.tensor([0, 100]), q[:2], k[:2], cache)
    half_cache = cache.half()  # a cache the kernel does not take: the reference's answer
    assert torch.equal(rotary_cpu(positions, q, k, half_cache)[0], rotary_ref(positions, q, k, half_cache)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 1), (5, 7), (3, 8), (37, 64), (2, 1000)])
def test_silu_and_mul(dtype: torch.dtype, tokens: int, inter: int) -> None:
    x = randn(tokens, 2 * inter, seed=inter, scale=4.0).to(dtype)
    got, want = silu_and_mul_cpu(x), silu_and_mul_ref(x)
    # exp is a ~1 ulp polynomial, torch's vectorised exp another one: float32 may differ in the last bits,
    # half precision in a rare rounding
    tol = {"atol": 1e-6, "rtol": 3e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tol)


def test_silu_and_mul_extremes_and_views(threads: int) -> None:
    gate = torch.tensor([-200.0, -89.0, -87.5, -20.0, -0.0, 0.0, 1e-30, 20.0, 87.5, 89.0, 200.0, float("inf"),
                         float("-inf"), float("nan"), 3.0, -3.0])  # fmt: skip
    x = torch.cat([gate, torch.full_like(gate, 2.0)])[None, :]
    torch.testing.assert_close(silu_and_mul_cpu(x), silu_and_mul_ref(x), equal_nan=True, atol=1e-30, rtol=3e-6)
    wide = randn(3000, 2 * 96)
    torch.testing.assert_close(silu_and_mul_cpu(wide), silu_and_mul_ref(wide), atol=1e-6, rtol=3e-6)
    strided = randn(40, 3 * 96)[:, : 2 * 96]
    torch.testing.assert_close(silu_and_mul_cpu(strided), silu_and_mul_ref(strided), atol=1e-6, rtol=3e-6)


def _pool(dtype: torch.dtype, layout: str, num_blocks: int = 9, bs: int = 4, hk: int = 2, d: int = 16) -> torch.Tensor:
    if layout == "engine":  # layer 1 of a 2-layer pool
        return torch.zeros(2, num_blocks, 2, bs, hk, d, dtype=dtype)[1]
    return torch.zeros(num_blocks, bs, 2, hk, d, dtype=dtype).transpose(1, 2)  # slot-major memory


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["engine", "slot_major"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_store_kv_exact(dtype: torch.dtype, layout: str, tokens: int, threads: int) -> None:
    qkv = randn(tokens, 3 * 2 * 16, seed=tokens).to(dtype)
    k, v = qkv[:, 32:64].view(tokens, 2, 16), qkv[:, 64:].view(tokens, 2, 16)
    slots = torch.randperm(36, generator=torch.Generator().manual_seed(1))[:tokens]
    if tokens > 1:
        slots[1] = -1  # padding: not stored
    got, want = _pool(dtype, layout), _pool(dtype, layout)
    store_kv_cpu(k, v, got, slots)
    store_kv_ref(k, v, want, slots)
    assert torch.equal(got, want)


@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_scale", [1.0, 0.25])
def test_store_kv_fp8(src: torch.dtype, kv_scale: float) -> None:
    k, v = randn(11, 2, 16, scale=60.0).to(src), randn(11, 2, 16, seed=1, scale=3.0).to(src)
    k[0, 0, :3] = torch.tensor([1000.0, -1000.0, float("nan")])  # saturates; NaN stays NaN
    slots = torch.arange(11) * 3
    got, want = _pool(FP8_KV_DTYPE, "engine"), _pool(FP8_KV_DTYPE, "engine")
    store_kv_cpu(k, v, got, slots, kv_scale)
    store_kv_ref(k, v, want, slots, kv_scale)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    with pytest.raises(ValueError, match="kv_scale > 0"):
        store_kv_cpu(k, v, got, slots)


def test_store_kv_errors_write_nothing() -> None:
    k = randn(3, 2, 16)
    pool = _pool(torch.float32, "engine")
    with pytest.raises(IndexError, match="slot 36 is outside the pool's 36 slots"):
        store_kv_cpu(k, k, pool, torch.tensor([0, 36, 1]))
    assert not pool.any()
    with pytest.raises((IndexError, RuntimeError)):  # v of another rank: the reference's own error
        store_kv_cpu(k, k[:, 0], pool, torch.tensor([0, 5, 1]))
    mixed = _pool(torch.float16, "engine")  # k in another dtype than the pool: the reference's cast
    store_kv_cpu(k, k, mixed, torch.tensor([0, 5, 1]))
    want = _pool(torch.float16, "engine")
    store_kv_ref(k, k, want, torch.tensor([0, 5, 1]))
    assert torch.equal(mixed, want)


@pytest.mark.parametrize("cols", [1, 7, 8, 9, 512, 50257])
def test_argmax_matches_torch(cols: int, threads: int) -> None:
    x = randn(67, cols, seed=cols)
    x[1] = 0.5  # all tied: the first
    x[2] = float("-inf")
    x[3, cols // 2 :] = float("inf")
    x[4, -1] = float("nan")
    x[5, cols // 3] = float("nan")
    x[5, -1] = float("nan")  # two NaNs: the first
    x[6, : cols // 2] = float("-inf")
    x[7, cols - 1] = x[7].max() + 1  # in the tail past the last full vector
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    padded = randn(33, cols + 5, seed=1)[:, :cols]  # rows with a longer stride (a padded vocabulary)
    assert torch.equal(argmax_rows(padded), padded.argmax(dim=-1))


def test_argmax_falls_back() -> None:
    x = randn(4, 9)
    for other in (x.half(), x.double(), x.t(), x[0], x[:0]):
        assert torch.equal(argmax_rows(other), other.argmax(dim=-1))
    with pytest.raises(IndexError, match="non-zero size"):  # torch's own error for an empty vocabulary
        argmax_rows(x[:, :0])


def test_bench_layer_ops_ab_runs(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    cmd = [sys.executable, "-m", "bench.layer_ops_ab", "--batch", "8", "--rounds", "1", "--reps", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["max_logit_diff"] <= 1e-5 and report["forward"]["new_ms"] > 0 and report["sample"]["old_ms"] > 0
