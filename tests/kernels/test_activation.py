"""SiLU-and-mul against silu_and_mul_ref."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import silu_and_mul, silu_and_mul_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inter", [64, 1000, 2752])
def test_silu_and_mul_matches_reference(device: torch.device, dtype: torch.dtype, inter: int) -> None:
    # 2752 spans three 1024-wide column blocks, the last one partial.
    x = (3 * torch.randn(4, 2 * inter, generator=torch.Generator().manual_seed(inter))).to(device, dtype)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x))


def test_silu_and_mul_strided_rows(device: torch.device) -> None:
    x = torch.randn(6, 3 * 128, device=device)[:, :256]  # (6, 256) with a row stride of 384
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x))


def test_silu_and_mul_errors(device: torch.device) -> None:
    with pytest.raises(ValueError, match="even last dim"):
        silu_and_mul(torch.randn(2, 7, device=device))
    with pytest.raises(ValueError, match="2 dims"):
        silu_and_mul(torch.randn(2, 2, 8, device=device))
    with pytest.raises(ValueError, match="dtype"):
        silu_and_mul(torch.randn(2, 8, device=device).to(torch.int32))


@pytest.mark.gpu
def test_silu_and_mul_bf16_gpu(cuda_device: torch.device) -> None:
    x = torch.randn(64, 2 * 14336, device=cuda_device, dtype=torch.bfloat16)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x))
