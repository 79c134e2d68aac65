"""The CPU paged-attention kernel (kernels/paged_attention_cpu.cpp) against paged_attention_ref:
random block tables, ragged lengths, prefill + decode + verification mixes, GQA, sliding windows,
every pool dtype and layout, one and two threads, and its refusals."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kernels import cpu_build, ops, paged_attention_cpu
from kernels.kv_store import quantize_kv
from kernels.paged_attention import paged_attention_ref
from kernels.paged_attention_cpu import load_kernel
from kernels.paged_attention_cpu import paged_attention_cpu as attention

CPU = torch.device("cpu")
SCALE = 0.125
# decodes of ragged contexts; verification rows (2..17, one a whole context); prefill chunks with and
# without cached context; a chunk long enough (> 192 rows / Hq positions) to be tiled per KV head
MIXES = {
    "decode": ([1] * 7, [1, 2, 15, 16, 17, 100, 333]),
    "verify": ([3, 5, 17, 2], [3, 40, 90, 2]),
    "prefill": ([64, 37], [64, 137]),
    "mixed": ([1, 40, 1, 5, 150, 1], [77, 40, 9, 5, 400, 1]),
}


@pytest.fixture(autouse=True)
def kernel() -> None:
    if load_kernel() is None:
        pytest.skip("no C++ compiler here: the engine uses the reference (see the log)")


def both(b: Any, window: int | None = None, kv_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    args = (b.q, b.kv_layer, b.block_tables, b.query_start_loc, b.seq_lens, SCALE, window, kv_scale)
    return attention(*args), paged_attention_ref(*args)


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("window", [None, 1, 7, 50])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_matches_reference(make_paged: Callable[..., Any], threads: int, mix: str, window: int | None,
                           group: int) -> None:
    q_lens, seq_lens = MIXES[mix]
    b = make_paged(q_lens, seq_lens, 3, group, 64, 16, torch.float32, CPU, seed=group)
    got, want = both(b, window)
    # float32 throughout; only the summation order differs (pages one at a time, online softmax)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim,block_size",
                         [(128, 16), (32, 8), (64, 32), (64, 4), (64, 1), (24, 16), (16, 16), (16, 4)])
@pytest.mark.parametrize("layout", ["engine", "slot_major"])
def test_shapes_and_layouts(make_paged: Callable[..., Any], head_dim: int, block_size: int, layout: str) -> None:
    # 128 and 64 are unrolled, 32, 24 and 16 take the generic loops; blocks of 16 and 32 transpose their
    # pages for long query tiles, smaller ones do not; slot_major pools are strided views
    q_lens, seq_lens = MIXES["mixed"]
    b = make_paged(q_lens, seq_lens, 2, 3, head_dim, block_size, torch.float32, CPU, kv_layout=layout)
    got, want = both(b, 20)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_head_dim_not_a_multiple_of_8_goes_to_the_reference(make_paged: Callable[..., Any]) -> None:
    b = make_paged([1, 3], [9, 20], 2, 2, 20, 8, torch.float32, CPU)
    got, want = both(b)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pools(make_paged: Callable[..., Any], dtype: torch.dtype) -> None:
    q_lens, seq_lens = MIXES["mixed"]
    b = make_paged(q_lens, seq_lens, 2, 3, 64, 16, dtype, CPU)
    got, want = both(b, 33)
    # both read the same half-precision pages and compute in float32; the answers round to the
    # pool's dtype, where the different summation order can land one unit of the last place apart
    tol = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("kv_scale", [1.0, 0.25])
def test_fp8_pool(make_paged: Callable[..., Any], threads: int, kv_scale: float) -> None:
    q_lens, seq_lens = MIXES["mixed"]
    b = make_paged(q_lens, seq_lens, 2, 3, 64, 16, torch.float32, CPU)
    b = b._replace(kv_layer=quantize_kv(b.kv_layer, kv_scale))
    got, want = both(b, None, kv_scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # float32 after the exact fp8 decode
    dense = b._replace(kv_layer=b.kv_layer.float() * kv_scale)
    torch.testing.assert_close(got, both(dense)[1], atol=1e-5, rtol=1e-5)


def test_never_reads_outside_the_context(make_paged: Callable[..., Any]) -> None:
    # NaN in every slot no sequence owns (the rest of each last page, unused blocks): no NaN comes out
    q_lens, seq_lens = MIXES["mixed"]
    b = make_paged(q_lens, seq_lens, 2, 3, 64, 16, torch.float32, CPU)
    poisoned = torch.full_like(b.kv_layer, float("nan"))
    bs = b.kv_layer.shape[2]
    for i, seq_len in enumerate(seq_lens):
        for p in range(seq_len):
            block = b.block_tables[i, p // bs]
            poisoned[block, :, p % bs] = b.kv_layer[block, :, p % bs]
    got = attention(b.q, poisoned, b.block_tables, b.query_start_loc, b.seq_lens, SCALE, 9)
    torch.testing.assert_close(got, both(b, 9)[1], atol=1e-5, rtol=1e-5)


def test_refusals(make_paged: Callable[..., Any]) -> None:
    b = make_paged([1, 3], [9, 20], 2, 2, 64, 8, torch.float32, CPU)
    args = (b.q, b.kv_layer, b.block_tables)
    with pytest.raises(ValueError, match="sequence 1: need 1 <= q_len <= seq_len"):
        attention(*args, b.query_start_loc, torch.tensor([9, 2], dtype=torch.int32), SCALE)
    with pytest.raises(ValueError, match="sequence 0: need 1 <= q_len"):
        attention(*args, torch.tensor([0, 0, 4], dtype=torch.int32), b.seq_lens, SCALE)
    with pytest.raises(ValueError, match="sequence 1: its 4 blocks must be in block_tables and name blocks below"):
        attention(*args, b.query_start_loc, torch.tensor([9, 25], dtype=torch.int32), SCALE)  # the spare column
    tables = b.block_tables.clone()
    tables[0, 1] = -1
    with pytest.raises(ValueError, match="sequence 0: its 2 blocks"):
        attention(b.q, b.kv_layer, tables, b.query_start_loc, b.seq_lens, SCALE)
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        attention(*args, b.query_start_loc, b.seq_lens, SCALE, 0)
    with pytest.raises(ValueError, match="kv_scale > 0"):
        attention(b.q, quantize_kv(b.kv_layer, 1.0), b.block_tables, b.query_start_loc, b.seq_lens, SCALE)
    with pytest.raises(ValueError, match="kv_layer dtype"):
        attention(b.q, b.kv_layer.double(), b.block_tables, b.query_start_loc, b.seq_lens, SCALE)


def test_select_ops_uses_it_on_cpu_and_the_reference_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ops.select_ops("auto", "cpu").paged_attention is ops.cpu_paged_attention
    assert ops.select_ops("torch", "cpu") is ops.TORCH_OPS  # the references alone
    monkeypatch.setattr(ops, "load_kernel", lambda: None)
    without = ops.select_ops("auto", "cpu")
    assert without.paged_attention is ops.TORCH_OPS.paged_attention
    assert without.rms_norm is (ops.CPU_OPS.rms_norm if ops.load_kernels() is not None else ops.TORCH_OPS.rms_norm)
    monkeypatch.setattr(ops, "load_kernels", lambda: None)  # no compiler at all: the references alone
    assert ops.select_ops("auto", "cpu") == ops.TORCH_OPS


def test_build_is_cached_and_failures_are_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    cxx = cpu_build.compiler()
    assert cxx is not None
    source = paged_attention_cpu.SOURCE
    lib = cpu_build.build(source, cxx, cpu_build.cache_dir())  # built by the fixture's load
    mtime = lib.stat().st_mtime_ns
    assert cpu_build.build(source, cxx, cpu_build.cache_dir()) == lib
    assert lib.stat().st_mtime_ns == mtime  # found, not rebuilt
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(paged_attention_cpu, "SOURCE", bad)
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    paged_attention_cpu.load_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="kernels.cpu_build"):
            assert paged_attention_cpu.load_kernel() is None
            assert "building the CPU attention kernel failed" in caplog.text
            assert list((tmp_path / "cache" / "kernels").iterdir()) == []  # no temporary file left behind
            monkeypatch.setattr(cpu_build, "compiler", lambda: None)
            paged_attention_cpu.load_kernel.cache_clear()
            assert paged_attention_cpu.load_kernel() is None
            assert "no C++ compiler" in caplog.text
    finally:
        paged_attention_cpu.load_kernel.cache_clear()
