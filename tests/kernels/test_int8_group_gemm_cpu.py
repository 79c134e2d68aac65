"""The grouped int8 CPU kernel (kernels/int8_group_gemm_cpu.cpp) against wna16_ref: random shapes
through both paths (decode M <= 4, scratch tiles above), N and K off the tiles, groups of 16..128 and
groups not dividing K, every scale dtype, zero points 32 / 128 / random, strided and half-precision x,
one and two threads, and its refusals."""

from __future__ import annotations

import pytest
import torch

from kernels.int8_group_gemm_cpu import int8_group_gemm_cpu, load_kernel, supports
from kernels.wna16_gemm import GroupWeight, wna16_ref


@pytest.fixture(autouse=True)
def kernel() -> None:
    if load_kernel() is None:
        pytest.skip("no C++ compiler here: the engine keeps the dense or dequantizing fallback (see the log)")


def weight(n: int, k: int, group: int, zero: int | None, scale_dtype: torch.dtype, seed: int) -> GroupWeight:
    """Random codes; zero points all ``zero`` (GGUF Q8_0: 128, Q6_K: 32) or random (None)."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    q = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 1e-3).to(scale_dtype)
    zeros = (torch.full((n, groups), zero, dtype=torch.uint8) if zero is not None
             else torch.randint(0, 256, (n, groups), generator=gen, dtype=torch.uint8))  # fmt: skip
    return GroupWeight(q, scales, zeros, group, 8)


ATOL = 1e-4  # see test_matches_reference

# (M, N, K, G): decode rows (1-4) and scratch tiles (5+); N off the 16-row tiles and 4-row blocks,
# K off 8 and off the group; groups not dividing K (the last one short)
CASES = [
    (1, 37, 96, 32), (2, 19, 64, 16), (3, 50, 200, 64), (4, 13, 256, 128), (1, 7, 100, 16),
    (5, 33, 200, 64), (7, 41, 136, 16), (16, 30, 576, 32), (48, 66, 160, 96), (64, 17, 130, 128),
    (70, 21, 77, 8), (4, 9, 300, 48), (1, 1, 8, 8),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[f"m{m}-n{n}-k{k}-g{g}" for m, n, k, g in CASES])
@pytest.mark.parametrize("zero", [128, 32, None], ids=["z128", "z32", "zrandom"])
def test_matches_reference(threads: int, case: tuple[int, int, int, int], zero: int | None) -> None:
    m, n, k, g = case
    w = weight(n, k, g, zero, torch.float32, seed=m * 1000 + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    # the same float32 weights as the reference; only the summation order differs (and the decode
    # path multiplies each group's partial sum by its scale instead of every weight). Outputs are
    # sums of up to 576 terms of size ~1 (|out| up to ~60), so a different order can move a result
    # by ~K * 2^-24 * |term| ~ 1e-4 absolute where terms cancel; a layout bug is off by O(1)
    torch.testing.assert_close(int8_group_gemm_cpu(x, w), wna16_ref(x, w), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 9])
def test_scale_dtypes(scale_dtype: torch.dtype, m: int) -> None:
    w = weight(40, 192, 32, None, scale_dtype, seed=3)
    x = torch.randn(m, 192)
    torch.testing.assert_close(int8_group_gemm_cpu(x, w), wna16_ref(x, w), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("m", [1, 3, 20])
def test_strided_x_leading_dims_and_bias(threads: int, m: int) -> None:
    w = weight(24, 128, 16, 128, torch.float32, seed=5)
    wide = torch.randn(2, m, 3 * 128)
    x = wide[..., ::3]  # (2, m, 128), column stride 3
    assert not x.is_contiguous()
    xt = torch.randn(128, 2 * m).t()  # (2m, 128), row stride 1
    bias = torch.randn(24)
    torch.testing.assert_close(int8_group_gemm_cpu(x, w, bias), wna16_ref(x, w, bias), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(int8_group_gemm_cpu(xt, w), wna16_ref(xt, w), atol=ATOL, rtol=1e-5)
    assert int8_group_gemm_cpu(x[:, :0], w).shape == (2, 0, 24)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_x(dtype: torch.dtype) -> None:
    w = weight(33, 160, 32, 128, torch.float32, seed=7)
    x = torch.randn(6, 160).to(dtype)
    got = int8_group_gemm_cpu(x, w)
    assert got.dtype == dtype
    # both compute in float32 from the same rounded x; the kernel rounds its float32 sum once, the
    # reference multiplies in x's dtype (torch accumulates in float32), so they may differ by an ulp
    want = wna16_ref(x.float(), w).to(dtype)
    tol = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_refusals() -> None:
    w = weight(8, 64, 16, 128, torch.float32, seed=1)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 64\), got \(2, 63\)"):
        int8_group_gemm_cpu(x[:, :63], w)
    with pytest.raises(ValueError, match="x dtype"):
        int8_group_gemm_cpu(x.double(), w)
    with pytest.raises(ValueError, match=r"bias must be \(8,\)"):
        int8_group_gemm_cpu(x, w, torch.zeros(9))
    with pytest.raises(ValueError, match="takes bits=8, got 4"):
        int8_group_gemm_cpu(x, w._replace(bits=4))
    with pytest.raises(ValueError, match="no perm"):
        int8_group_gemm_cpu(x, w._replace(perm=torch.arange(64, dtype=torch.int32)))
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 8, got 12"):
        int8_group_gemm_cpu(x, w._replace(group_size=12))
    with pytest.raises(ValueError, match="zeros dtype"):
        int8_group_gemm_cpu(x, w._replace(zeros=w.zeros.float()))
    with pytest.raises(ValueError, match=r"scales and zeros must be \(8, 4\), got \(8, 3\)"):
        int8_group_gemm_cpu(x, w._replace(scales=w.scales[:, :3], zeros=w.zeros[:, :3]))
    with pytest.raises(ValueError, match="qweight"):
        int8_group_gemm_cpu(x, w._replace(qweight=w.qweight.t().contiguous().t()))  # column-major


def test_supports_names_what_it_takes() -> None:
    w = weight(8, 64, 16, 128, torch.float32, seed=1)
    assert supports(w)
    assert not supports(w._replace(zeros=w.zeros.float()))  # GGUF Q4_1 / Q4_K float offsets
    assert not supports(w._replace(perm=torch.arange(64, dtype=torch.int32)))
    assert not supports(w._replace(group_size=12))
    assert not supports(w._replace(bits=4))
