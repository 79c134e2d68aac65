"""The grouped W4A16 / W8A16 kernel (kernels/wna16_gemm.py, interpreted on CPU) against its reference,
and the reference against a dequantization written out here from the formula."""

from __future__ import annotations

import pytest
import torch

from kernels.gemm_tiles import GemmConfig
from kernels.quant_cpu import int4_pack_for_cpu, int4_packed_mm
from kernels.wna16_gemm import GroupWeight, dequantize_group, pack_int4, wna16_gemm, wna16_ref

# As tests/kernels/test_quant_gemm.py: fp16 tiles are summed in another order than the reference's.
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}


def group_weight(n: int, k: int, group: int, bits: int, offsets: bool = False, act_order: bool = False,
                 seed: int = 0) -> GroupWeight:  # fmt: skip
    """Random codes, scales ~ 1 / (2**bits sqrt(K)) so outputs are O(1), zero points or offsets."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=g) + 0.5) / (2**bits * k**0.5)
    if offsets:
        zeros = -torch.rand(n, groups, generator=g) * scales * 2**bits
    else:
        zeros = torch.randint(0, 2**bits, (n, groups), generator=g, dtype=torch.uint8)
    perm = torch.randperm(k, generator=g).to(torch.int32) if act_order else None
    return GroupWeight(pack_int4(q) if bits == 4 else q, scales.half(), zeros, group, bits, perm)


def to(w: GroupWeight, device: torch.device) -> GroupWeight:
    return GroupWeight(*(f.to(device) if isinstance(f, torch.Tensor) else f for f in w))


def test_reference_dequantizes_as_the_formula_says() -> None:
    w = group_weight(8, 96, 32, 4, act_order=True)
    q = torch.stack((w.qweight & 15, w.qweight >> 4), -1).reshape(8, 96).float()
    dense = torch.empty(8, 96)
    for n in range(8):
        for k in range(96):  # stored column k is x's column perm[k] and belongs to group k // 32
            s, z = w.scales[n, k // 32].float(), w.zeros[n, k // 32].float()
            dense[n, int(w.perm[k])] = (q[n, k] - z) * s
    torch.testing.assert_close(dequantize_group(w), dense, atol=0, rtol=0)
    off = group_weight(4, 64, 16, 8, offsets=True)
    expect = off.qweight.float() * off.scales.float().repeat_interleave(16, 1) + off.zeros.repeat_interleave(16, 1)
    torch.testing.assert_close(dequantize_group(off), expect, atol=0, rtol=0)


CASES = [  # (M, N, K, group, bits, offsets, act_order)
    (1, 96, 256, 128, 4, False, False),
    (5, 64, 576, 128, 4, False, False),  # K = 576: the last group holds 64 columns, tiles of 64
    (3, 48, 256, 32, 4, True, False),  # GGUF Q4_1 / Q4_K: float offsets
    (17, 80, 384, 128, 4, False, True),  # GPTQ act-order
    (2, 64, 256, 32, 8, False, False),  # Q8_0
    (33, 40, 256, 16, 8, False, False),  # Q6_K's groups of 16
    (4, 64, 320, 320, 8, False, True),  # one group per row (channel), 8-bit act-order
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[f"m{c[0]}n{c[1]}k{c[2]}g{c[3]}b{c[4]}{'o' * c[5]}{'p' * c[6]}"
                                            for c in CASES])  # fmt: skip
def test_kernel_matches_reference(device: torch.device, dtype: torch.dtype, case: tuple) -> None:
    m, n, k, group, bits, offsets, act_order = case
    w = to(group_weight(n, k, group, bits, offsets, act_order), device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    out = wna16_gemm(x, w)
    assert out.shape == (m, n) and out.dtype == dtype
    torch.testing.assert_close(out, wna16_ref(x, w), **TOL[dtype])


def test_split_k_bias_and_leading_dims(device: torch.device) -> None:
    w = to(group_weight(48, 512, 64, 4, act_order=True), device)
    x = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(2)).to(device)
    bias = torch.randn(48).to(device)
    out = wna16_gemm(x, w, bias, GemmConfig(16, 32, 64, split_k=4))
    assert out.shape == (2, 3, 48)
    torch.testing.assert_close(out, wna16_ref(x, w, bias), **TOL[torch.float32])


def test_launcher_rejects_what_the_kernel_cannot_tile(device: torch.device) -> None:
    x = torch.randn(2, 96, device=device)
    with pytest.raises(ValueError, match="power-of-two tile"):
        wna16_gemm(x, to(group_weight(16, 96, 24, 8), device))  # gcd 24: tiles of 8 columns
    w = to(group_weight(16, 256, 32, 4), device)
    with pytest.raises(ValueError, match="scales and zeros"):
        wna16_gemm(torch.randn(2, 256, device=device), w._replace(scales=w.scales[:, :3]))
    with pytest.raises(ValueError, match="perm"):
        wna16_gemm(torch.randn(2, 256, device=device), w._replace(perm=torch.arange(128, dtype=torch.int32)))


@pytest.mark.parametrize("offsets", [False, True])
def test_torch_cpu_int4_layout_takes_zero_points_and_offsets(offsets: bool) -> None:
    w = group_weight(32, 256, 64, 4, offsets=offsets)
    w = w._replace(scales=w.scales.float())  # the bf16 packed layout rounds scales; compare in float32
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3))
    cpu = int4_pack_for_cpu(w.qweight, w.scales, w.zeros, torch.float32)
    torch.testing.assert_close(int4_packed_mm(x, cpu, 64), wna16_ref(x, w), atol=1e-4, rtol=1e-4)
