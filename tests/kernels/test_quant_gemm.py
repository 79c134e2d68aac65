"""Quantized GEMMs against their dequantize-then-matmul references: the Triton W8A16 / W4A16 kernels
(interpreted on CPU), torch's packed CPU kernels, and the fp8 paths."""

from __future__ import annotations

import pytest
import torch

from engine.quant.schemes import quantize_fp8, quantize_int4, quantize_int8
from kernels.quant_cpu import fp8_ref, fp8_scaled_mm, int4_pack_for_cpu, int4_packed_mm, int8_packed_mm
from kernels.quant_gemm import (
    DECODE_MAX_M,
    PREFILL_MIN_M,
    GemmConfig,
    choose_config,
    w4a16_gemm,
    w4a16_ref,
    w8a16_gemm,
    w8a16_ref,
)  # fmt: skip

# fp16 activations: the kernel rounds dequantized weight tiles to fp16 and sums in fp32 like the
# reference, but in a different order and, for int8, with the scale applied after the sum instead
# of to each fp16 weight; outputs are O(1), so a few fp16 ulps (1e-3 each) apart.
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}
SHAPES = [(1, 96, 384), (16, 96, 384), (33, 200, 256), (130, 64, 512)]  # (M, N, K): decode, mid, prefill


def weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5


def act(m: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"m{m}n{n}k{k}" for m, n, k in SHAPES])
def test_w8a16_matches_reference(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    m, n, k = shape
    q = quantize_int8(weights(n, k))
    qw, scale, x = q.qweight.to(device), q.scale.to(device), act(m, k, dtype, device)
    out = w8a16_gemm(x, qw, scale)
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out, w8a16_ref(x, qw, scale), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"m{m}n{n}k{k}" for m, n, k in SHAPES])
def test_w4a16_matches_reference(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    m, n, k = shape
    q = quantize_int4(weights(n, k), 128)
    qw, s, z = q.qweight.to(device), q.scales.to(device, dtype), q.zeros.to(device)
    x = act(m, k, dtype, device)
    out = w4a16_gemm(x, qw, s, z, 128)
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out, w4a16_ref(x, qw, s, z, 128), **TOL[dtype])


@pytest.mark.parametrize("group", [32, 64])
def test_w4a16_small_groups_bias_and_leading_dims(device: torch.device, group: int) -> None:
    q = quantize_int4(weights(48, 256), group)
    qw, s, z = q.qweight.to(device), q.scales.to(device), q.zeros.to(device)
    x = act(6, 256, torch.float32, device).reshape(2, 3, 256)
    bias = torch.randn(48).to(device)
    out = w4a16_gemm(x, qw, s, z, group, bias)
    assert out.shape == (2, 3, 48)
    torch.testing.assert_close(out, w4a16_ref(x, qw, s, z, group, bias), **TOL[torch.float32])


@pytest.mark.parametrize("split_k", [1, 3, 4])
def test_split_k_partials_sum_to_the_same_result(device: torch.device, split_k: int) -> None:
    m, n, k = 3, 80, 1024
    x = act(m, k, torch.float32, device)
    q8, q4 = quantize_int8(weights(n, k)), quantize_int4(weights(n, k), 128)
    cfg = GemmConfig(block_m=16, block_n=32, block_k=128, split_k=split_k)
    torch.testing.assert_close(w8a16_gemm(x, q8.qweight.to(device), q8.scale.to(device), config=cfg),
                               w8a16_ref(x, q8.qweight.to(device), q8.scale.to(device)), **TOL[torch.float32])
    args = (q4.qweight.to(device), q4.scales.to(device), q4.zeros.to(device), 128)
    torch.testing.assert_close(w4a16_gemm(x, *args, config=cfg), w4a16_ref(x, *args), **TOL[torch.float32])


def test_w8a16_odd_k_masks_the_tail(device: torch.device) -> None:
    q = quantize_int8(weights(40, 200))
    x = act(5, 200, torch.float32, device)
    qw, s = q.qweight.to(device), q.scale.to(device)
    torch.testing.assert_close(w8a16_gemm(x, qw, s), w8a16_ref(x, qw, s), **TOL[torch.float32])


def test_configs_differ_for_decode_and_prefill() -> None:
    decode = choose_config(1, 4096, 4096, 128)
    prefill = choose_config(512, 4096, 4096, 128)
    assert decode.block_m == 16 and decode.split_k > 1  # 64 column tiles would leave SMs idle
    assert prefill.block_m == 128 and prefill.split_k == 1
    assert choose_config(DECODE_MAX_M + 1, 64, 256).block_m < choose_config(PREFILL_MIN_M, 64, 256).block_m
    assert choose_config(1, 64, 4096, 32).block_k == 32  # a tile never straddles two int4 groups
    assert choose_config(1, 28672, 4096, 128).split_k == 1  # enough column tiles already


def test_launchers_reject_bad_arguments(device: torch.device) -> None:
    q4 = quantize_int4(weights(32, 256), 128)
    x = act(2, 256, torch.float32, device)
    with pytest.raises(ValueError, match="group_size"):
        w4a16_gemm(x, q4.qweight.to(device), q4.scales.to(device), q4.zeros.to(device), 96)
    with pytest.raises(ValueError, match="scales and zeros"):
        w4a16_gemm(x, q4.qweight.to(device), q4.scales.to(device)[:, :1], q4.zeros.to(device), 128)
    q8 = quantize_int8(weights(32, 256))
    with pytest.raises(ValueError, match="x must be"):
        w8a16_gemm(x[:, :128], q8.qweight.to(device), q8.scale.to(device))
    with pytest.raises(ValueError, match="qweight dtype"):
        w8a16_gemm(x, q8.qweight.to(device).float(), q8.scale.to(device))


# ---------------------------------------------------------------- torch's CPU kernels, fp8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 16, 70])
def test_cpu_packed_ops_match_reference(dtype: torch.dtype, m: int) -> None:
    n, k = 64, 256
    x = act(m, k, dtype, torch.device("cpu"))
    q8 = quantize_int8(weights(n, k))
    ref8 = w8a16_ref(x.float(), q8.qweight, q8.scale)
    # bfloat16: the reference rounds weights to bf16, the packed kernel does not (~2^-8 relative).
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else TOL[torch.float32]
    torch.testing.assert_close(int8_packed_mm(x, q8.qweight, q8.scale.to(dtype)).float(), ref8, **tol)
    q4 = quantize_int4(weights(n, k), 128)
    packed = int4_pack_for_cpu(q4.qweight, q4.scales, q4.zeros, dtype)
    ref4 = w4a16_ref(x.float(), q4.qweight, q4.scales, q4.zeros, 128)
    torch.testing.assert_close(int4_packed_mm(x, packed, 128).float(), ref4, **tol)


def test_cpu_int4_layout_needs_16_rows() -> None:
    q4 = quantize_int4(weights(24, 128), 128)
    with pytest.raises(ValueError, match="N % 16"):
        int4_pack_for_cpu(q4.qweight, q4.scales, q4.zeros, torch.bfloat16)


def test_fp8_reference_is_dequantize_then_matmul() -> None:
    w = weights(32, 128)
    q = quantize_fp8(w)
    x = act(4, 128, torch.float32, torch.device("cpu"))
    want = x @ (q.qweight.float() * q.scale[:, None]).T
    torch.testing.assert_close(fp8_ref(x, q.qweight, q.scale), want)
    # e4m3 keeps 3 mantissa bits: each weight within 2^-4 relative, so outputs within a few percent
    assert (fp8_ref(x, q.qweight, q.scale) - x @ w.T).abs().max() < 0.1 * (x @ w.T).abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 256])
def test_fp8_scaled_mm_matches_reference_on_hopper(cuda_device: torch.device, m: int) -> None:
    if torch.cuda.get_device_capability(cuda_device) < (8, 9):
        pytest.skip("fp8 tensor cores need compute capability >= 8.9")
    q = quantize_fp8(weights(256, 512).to(cuda_device))
    x = act(m, 512, torch.bfloat16, cuda_device)
    # W8A8: the activations are quantized to e4m3 too (per token), ~2^-4 relative per element: an output
    # near zero can miss by more than 0.1 (one of 65,536 did on an H200, by 0.115), the whole by a few %.
    got, want = fp8_scaled_mm(x, q.qweight, q.scale).float(), fp8_ref(x, q.qweight, q.scale).float()
    torch.testing.assert_close(got, want, atol=0.25, rtol=0.1)
    assert (got - want).norm() < 0.05 * want.norm()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 512])
def test_bf16_quant_gemms_on_gpu(cuda_device: torch.device, m: int) -> None:
    n, k = 512, 1024
    x = act(m, k, torch.bfloat16, cuda_device)
    q8 = quantize_int8(weights(n, k).to(cuda_device))
    torch.testing.assert_close(w8a16_gemm(x, q8.qweight, q8.scale), w8a16_ref(x, q8.qweight, q8.scale),
                               atol=5e-2, rtol=5e-2)  # bf16: 8 mantissa bits
    q4 = quantize_int4(weights(n, k).to(cuda_device), 128)
    args = (q4.qweight, q4.scales.bfloat16(), q4.zeros, 128)
    torch.testing.assert_close(w4a16_gemm(x, *args), w4a16_ref(x, *args), atol=5e-2, rtol=5e-2)
