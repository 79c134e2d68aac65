"""Post-training quantization at load time and the fp8 KV cache: formats, bytes on the device,
generation, block counts and quality against the unquantized model (tiny random checkpoints, CPU)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import nn

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.quant import QuantLinear, linear_weight_bytes, projection_modules
from engine.quant.schemes import (
    dequantize_fp8,
    dequantize_int4,
    dequantize_int8,
    group_size_for,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
)  # fmt: skip
from kernels.quant_gemm import unpack_int4
from kvtransfer import KVLayout
from training.quant_quality import agreement, prompt_logits

# Projections per layer of the model below (hidden 128, 4 heads of 32 / 2 KV heads, intermediate 256):
# qkv (256, 128), o (128, 128), gate_up (512, 128), down (128, 256): 147456 weights, 1024 rows, 2 layers.
WEIGHTS, ROWS, LAYERS = 147456, 1024, 2
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model("llama", hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2)


def load(model: Path, **kwargs) -> LLM:
    return LLM(model, device="cpu", num_kv_blocks=kwargs.pop("num_kv_blocks", 48), **{"dtype": "float32", **kwargs})


def sequences(n: int = 3, length: int = 48, vocab: int = 1024) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def test_config_rejects_unknown_options_listing_the_choices() -> None:
    with pytest.raises(ValueError, match="int8, int4, fp8"):
        EngineConfig(model="m", quantization="int3")
    with pytest.raises(ValueError, match="auto, fp8"):
        EngineConfig(model="m", kv_cache_dtype="float16")


def test_schemes_round_trip_within_half_a_step() -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero row must not divide by zero
    q8 = quantize_int8(w)
    assert q8.qweight.dtype == torch.int8 and (dequantize_int8(q8) - w).abs().le(q8.scale[:, None] / 2 + 1e-6).all()
    q4 = quantize_int4(w, 128)
    assert q4.qweight.shape == (64, 128) and q4.scales.shape == q4.zeros.shape == (64, 2)
    step = q4.scales.repeat_interleave(128, dim=1)  # (N, K): the scale of each weight's group
    assert (dequantize_int4(q4) - w).abs().le(step / 2 + 1e-6).all()
    assert torch.equal(unpack_int4(pack_int4(torch.arange(16).repeat(4, 2))), torch.arange(16).repeat(4, 2).byte())
    q_fp8 = quantize_fp8(w)
    assert (dequantize_fp8(q_fp8) - w).abs().le(w.abs() * 2**-4 + q_fp8.scale[:, None] * 2**-9).all()
    assert not torch.isnan(dequantize_fp8(q_fp8)).any()
    assert [group_size_for(k) for k in (4096, 192, 64, 40)] == [128, 64, 64, None]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_linear_weight_bytes_on_the_device(model: Path, dtype: str) -> None:
    dense = linear_weight_bytes(load(model, dtype=dtype).engine.runner.model)
    assert dense == LAYERS * WEIGHTS * 2
    got: dict[str, int] = {}
    for scheme in ("int8", "int4", "fp8"):
        m = load(model, dtype=dtype, quantization=scheme).engine.runner.model
        got[scheme] = linear_weight_bytes(m)
        projections = [mod for _, mod in projection_modules(m)]
        assert all(isinstance(p, QuantLinear) for p in projections)
        assert all(b.device.type == "cpu" for p in projections for b in p.buffers())
        assert type(m.lm_head) is nn.Linear and m.lm_head.weight.dtype == m.embed_tokens.weight.dtype  # unquantized
    # int8 and fp8: 1 byte a weight + a float32 scale a row (bfloat16 for torch's packed int8 kernel);
    # int4: half a byte + per 128-group a scale and zero point: (fp16 scale, uint8 zero) in our layout,
    # (bf16 scale, bf16 zero) in torch's CPU one.
    packed = dtype == "bfloat16"
    assert got["fp8"] == LAYERS * (WEIGHTS + 4 * ROWS)
    assert got["int8"] == LAYERS * (WEIGHTS + (2 if packed else 4) * ROWS)
    group_bytes = 4 if packed else 3
    assert got["int4"] == LAYERS * (WEIGHTS // 2 + WEIGHTS // 128 * group_bytes)
    ratios = {k: v / dense for k, v in got.items()}
    assert 0.50 < ratios["int8"] < 0.52 and 0.50 < ratios["fp8"] < 0.52  # ~50%: 1/2 + 2/K of scales
    assert 0.25 < ratios["int4"] < 0.27  # ~25% + 1.2-1.6% of scales and zero points


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_greedy_generation_and_quality_per_scheme(model: Path, scheme: str) -> None:
    ref = load(model)
    llm = load(model, quantization=scheme)
    outs = llm.generate(sequences(2, 20), GREEDY)
    assert [len(o.token_ids) for o in outs] == [12, 12]
    assert llm.generate(sequences(2, 20), GREEDY)[1].token_ids == outs[1].token_ids  # deterministic
    assert llm.engine.block_manager.num_free_blocks == 48
    quality = agreement(ref.engine.runner, llm.engine.runner, sequences())
    # Measured on this model (top-1, mean KL in nats): int8 1.00 / 2e-4, fp8 0.92 / 3e-3, int4 0.72 / 0.05;
    # bench/quant_quality.py has the full table. The floors leave room for other random draws.
    floor = {"int8": (0.93, 2e-3), "fp8": (0.85, 2e-2), "int4": (0.6, 0.2)}[scheme]
    assert quality.top1 >= floor[0] and quality.mean_kl <= floor[1], quality


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_triton_gemms_in_the_model_match_the_torch_path(model: Path, scheme: str) -> None:
    torch_path = load(model, quantization=scheme).engine.runner
    triton_path = load(model, quantization=scheme, attention_backend="triton").engine.runner
    assert {m.kernel for _, m in projection_modules(triton_path.model)} == {"triton"}
    assert {m.kernel for _, m in projection_modules(torch_path.model)} == {"dequant"}  # float32 on CPU
    tokens = sequences(1, 24)[0]
    torch.testing.assert_close(prompt_logits(triton_path, tokens), prompt_logits(torch_path, tokens),
                               atol=1e-3, rtol=1e-3)  # float32; kernels sum in another order


def test_fp8_kv_cache_doubles_blocks_and_keeps_quality(model: Path) -> None:
    budget = 1 / 1024  # GiB (1 MiB)
    half = load(model, dtype="float16", kv_cache_memory_gib=budget, num_kv_blocks=None).engine.runner
    fp8 = load(model, dtype="float16", kv_cache_memory_gib=budget, num_kv_blocks=None, kv_cache_dtype="fp8")
    runner = fp8.engine.runner
    assert runner.kv.dtype == torch.float8_e4m3fn and runner.page_bytes * 2 == half.page_bytes
    assert runner.num_blocks == 2 * half.num_blocks  # 1 byte a value instead of 2: twice the tokens
    full = load(model, kv_cache_memory_gib=budget, num_kv_blocks=None).engine.runner
    assert runner.num_blocks == 4 * full.num_blocks  # and four times float32's
    assert KVLayout.for_pool(runner.kv, "m").dtype == "float8_e4m3fn"  # what the KV handshake compares
    assert len(fp8.generate(sequences(1, 20), GREEDY)[0].token_ids) == 12
    quality = agreement(load(model).engine.runner, load(model, kv_cache_dtype="fp8").engine.runner, sequences())
    assert quality.top1 >= 0.9 and quality.mean_kl < 5e-3, quality
