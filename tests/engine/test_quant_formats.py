"""Pre-quantized formats -> Tandem's layouts, each compared with a dequantization of the format itself:
GPTQ and AWQ written here from their packing code's rules (auto-gptq and autoawq need CUDA builds),
compressed-tensors as its own library wrote it (tests/fixtures, made by make_compressed_tensors_fixture.py),
FP8 by the formula, GGUF through the gguf library's writer, reader and dequantize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.quant.formats import awq, compressed, fp8, gguf, gptq
from engine.quant.formats.packing import AWQ_ORDER, pack_int32, unpack_int32
from engine.quant.prequantized import dequantize, detect, fuse
from engine.quant.schemes import Fp8BlockWeight, Fp8Weight
from kernels.wna16_gemm import GroupWeight, dequantize_group

FIXTURE = Path(__file__).parents[1] / "fixtures" / "compressed_tensors_0.20.1.safetensors"
EXACT = dict(atol=0.0, rtol=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gptq_pack_rows(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's QuantLinear.pack for qweight: (K, N) -> (K * bits / 32, N), row i*per + j at bits*j."""
    per = 32 // bits
    k, n = intweight.shape
    out = torch.zeros(k // per, n, dtype=torch.int64)
    for j in range(per):
        out |= intweight[j::per].to(torch.int64) << (bits * j)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_matches_its_formula(bits: int, act_order: bool, fmt: str) -> None:
    n, k, group = 24, 256, 64
    q = torch.randint(0, 2**bits, (k, n), generator=gen())
    zeros = torch.randint(1, 2**bits, (k // group, n), generator=gen(1))  # stored as zero - 1 in "gptq"
    scales = (torch.rand(k // group, n, generator=gen(2)) / 100).half()
    if act_order:  # GPTQ's desc_act: the i-th column in activation order is in group i // G
        order = torch.randperm(k, generator=gen(3))
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // group).to(torch.int32)
    else:
        g_idx = (torch.arange(k) // group).to(torch.int32)
    stored_zeros = zeros - 1 if fmt == "gptq" else zeros
    tensors = {"qweight": gptq_pack_rows(q, bits), "qzeros": pack_int32(stored_zeros, bits), "scales": scales,
               "g_idx": g_idx}
    w = gptq.convert({"bits": bits, "group_size": group, "desc_act": act_order, "checkpoint_format": fmt}, tensors)
    assert (w.perm is not None) == act_order and w.bits == bits
    expect = scales.float()[g_idx.long()] * (q.float() - zeros.float()[g_idx.long()])  # (K, N)
    torch.testing.assert_close(dequantize_group(w), expect.t(), **EXACT)


def test_gptq_refuses_what_it_cannot_serve() -> None:
    with pytest.raises(ValueError, match="3 bits"):
        detect({"quantization_config": {"quant_method": "gptq", "bits": 3}})
    with pytest.raises(ValueError, match="bitsandbytes"):
        detect({"quantization_config": {"quant_method": "bitsandbytes"}})
    codes = torch.zeros(2, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="not a GPTQ act-order"):
        gptq.sort_groups(codes, torch.tensor([0] * 40 + [1] * 24), 32)


def test_awq_unpacks_its_interleaved_nibbles() -> None:
    n, k, group = 32, 256, 128
    q = torch.randint(0, 16, (k, n), generator=gen())
    z = torch.randint(0, 16, (k // group, n), generator=gen(1))
    s = (torch.rand(k // group, n, generator=gen(2)) / 100).half()

    def awq_pack(v: torch.Tensor) -> torch.Tensor:  # AutoAWQ's WQLinear_GEMM.from_linear packing
        out = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
        for col in range(v.shape[1] // 8):
            for i in range(8):
                out[:, col] |= v[:, col * 8 + AWQ_ORDER[i]].to(torch.int64) << (i * 4)
        return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)

    w = awq.convert({"bits": 4, "group_size": group, "zero_point": True, "version": "gemm"},
                    {"qweight": awq_pack(q), "qzeros": awq_pack(z), "scales": s})
    expect = (q.float() - z.float().repeat_interleave(group, 0)) * s.float().repeat_interleave(group, 0)
    torch.testing.assert_close(dequantize_group(w), expect.t(), **EXACT)
    assert torch.equal(unpack_int32(awq_pack(q), 4, AWQ_ORDER), q.to(torch.int32))
    with pytest.raises(ValueError, match="gemv"):
        detect({"quantization_config": {"quant_method": "awq", "bits": 4, "version": "gemv"}})


@pytest.mark.parametrize("case", ["w4g32asym", "w4g64sym", "w8chsym", "w8g32asym"])
def test_compressed_tensors_as_its_library_wrote_them(case: str) -> None:
    stored = {k.split(".", 1)[1]: v for k, v in load_file(FIXTURE).items() if k.startswith(case + ".")}
    bits = int(case[1])
    strategy = "channel" if "ch" in case else "group"
    weights = {"num_bits": bits, "type": "int", "symmetric": case.endswith("sym") and not case.endswith("asym"),
               "strategy": strategy, "group_size": int(case.split("g")[1][:2]) if strategy == "group" else None}
    cfg = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
           "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    dense = stored.pop("dense")
    w = detect({"quantization_config": cfg}).convert("model.layers.0.mlp.down_proj", stored)  # type: ignore[union-attr]
    assert isinstance(w, GroupWeight) and w.bits == bits
    # The library dequantizes in the scale's dtype (bfloat16), we in float32: equal to bf16 rounding.
    torch.testing.assert_close(dequantize_group(w).bfloat16().float(), dense, **EXACT)


def test_compressed_tensors_targets_ignore_and_act_order() -> None:
    cfg = {"format": "pack-quantized", "ignore": ["lm_head", "re:.*layers\\.1\\..*"],
           "config_groups": {"a": {"targets": ["re:.*down_proj$"], "weights": {"num_bits": 8}},
                             "b": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group",
                                                                      "group_size": 32}}}}
    assert compressed.scheme_for(cfg, "model.layers.0.mlp.down_proj")[0]["num_bits"] == 8  # type: ignore[index]
    assert compressed.scheme_for(cfg, "model.layers.0.mlp.up_proj")[0]["num_bits"] == 4  # type: ignore[index]
    assert compressed.scheme_for(cfg, "model.layers.1.mlp.up_proj") is None
    assert compressed.scheme_for(cfg, "lm_head") is None
    n, k = 8, 64
    q = torch.randint(-8, 8, (n, k), generator=gen())
    g_idx = torch.randperm(k, generator=gen(1)) % 2  # 32 columns in each group, in any order
    scale = torch.rand(n, 2, generator=gen(2))
    t = {"weight_packed": pack_int32(q + 8, 4), "weight_scale": scale, "weight_shape": torch.tensor([n, k]),
         "weight_g_idx": g_idx.to(torch.int32)}
    w = compressed.convert(cfg, "model.layers.0.mlp.up_proj", t)
    assert isinstance(w, GroupWeight) and w.perm is not None
    torch.testing.assert_close(dequantize_group(w), q.float() * scale[:, g_idx], **EXACT)


def test_fp8_scales_per_tensor_channel_and_block() -> None:
    w = (torch.randn(256, 192, generator=gen()) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    per_tensor = fp8.convert({}, {"weight": w, "weight_scale": torch.tensor(0.01), "input_scale": torch.tensor(1.0)})
    per_row = fp8.convert({}, {"weight": w, "weight_scale": torch.linspace(0.01, 0.02, 256)[:, None]})
    block = fp8.convert({"weight_block_size": [128, 128]}, {"weight": w, "weight_scale_inv": torch.rand(2, 2)})
    assert isinstance(per_tensor, Fp8Weight) and isinstance(per_row, Fp8Weight) and isinstance(block, Fp8BlockWeight)
    torch.testing.assert_close(dequantize(per_tensor), w.float() * 0.01, **EXACT)
    torch.testing.assert_close(dequantize(per_row), w.float() * torch.linspace(0.01, 0.02, 256)[:, None], **EXACT)
    tiles = block.scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:, :192]
    torch.testing.assert_close(dequantize(block), w.float() * tiles, **EXACT)
    fused = fuse([per_tensor, per_row], "qkv")  # per-tensor scales become per-row: the shards stack
    assert isinstance(fused, Fp8Weight) and fused.qweight.shape == (512, 192)


def test_shards_of_different_layouts_fuse_dense() -> None:
    a = GroupWeight(torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 1), torch.full((4, 1), 8, dtype=torch.uint8),
                    64, 4)
    b = a._replace(group_size=32, scales=torch.ones(4, 2), zeros=torch.full((4, 2), 8, dtype=torch.uint8))
    fused = fuse([a, b], "qkv")
    assert isinstance(fused, torch.Tensor) and fused.shape == (8, 64) and bool((fused == -8).all())
    same = fuse([a, a], "qkv")
    assert isinstance(same, GroupWeight) and same.qweight.shape == (8, 32)


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, int]]) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for name, (raw, qtype) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=GGMLQuantizationType(qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_k_blocks(rng: np.random.Generator, rows: int, blocks: int, nbytes: int, halves: list[int]) -> np.ndarray:
    """Random K-quant blocks whose f16 fields (at byte offsets ``halves``) are finite and small."""
    raw = rng.integers(0, 256, (rows, blocks, nbytes), dtype=np.uint8)
    for off in halves:
        raw[..., off : off + 2] = (rng.random((rows, blocks, 1)) / 64).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, blocks * nbytes)


def test_gguf_tensors_kept_quantized_match_gguf_dequantize(tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader
    from gguf.quants import dequantize as gguf_dequantize
    from gguf.quants import quantize as gguf_quantize

    rng = np.random.default_rng(0)
    dense = rng.standard_normal((16, 512)).astype(np.float32) / 10
    tensors = {f"t.{t.name}": (gguf_quantize(dense, t), int(t)) for t in (Q.Q4_0, Q.Q4_1, Q.Q8_0)}
    tensors["t.Q4_K"] = (random_k_blocks(rng, 16, 2, 144, [0, 2]), int(Q.Q4_K))
    tensors["t.Q6_K"] = (random_k_blocks(rng, 16, 2, 210, [208]), int(Q.Q6_K))
    write_gguf(tmp_path / "m.gguf", tensors)
    for t in GGUFReader(str(tmp_path / "m.gguf")).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        w = gguf.convert_tensor(t.data, int(t.tensor_type), shape)  # type: ignore[arg-type]
        expect = torch.from_numpy(gguf_dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32))
        torch.testing.assert_close(dequantize_group(w), expect, **EXACT, msg=t.name)
        assert w.bits == (4 if "Q4" in t.name else 8)
    swapped = gguf.permute_rows(w, torch.arange(16).flip(0))
    torch.testing.assert_close(dequantize_group(swapped), expect.flip(0), **EXACT)
    with pytest.raises(ValueError, match="type 13 is not kept quantized"):
        gguf.convert_tensor(np.zeros(176, np.uint8), int(Q.Q5_K), (1, 256))


def test_compressed_tensors_int_and_float_quantized_weights() -> None:
    from engine.quant.group_linear import as_int8

    cfg = {"quant_method": "compressed-tensors", "format": "int-quantized",
           "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                                                                      "strategy": "channel"}}}}  # fmt: skip
    q = torch.randint(-128, 128, (16, 64), generator=gen(), dtype=torch.int8)
    scale = torch.rand(16, 1, generator=gen(1))
    w = detect({"quantization_config": cfg}).convert("model.layers.0.mlp.up_proj", {"weight": q, "weight_scale": scale})  # type: ignore[union-attr]
    assert isinstance(w, GroupWeight)
    torch.testing.assert_close(dequantize_group(w), q.float() * scale, **EXACT)
    int8 = as_int8(w)  # W8A8-int8 and W8A16 channel weights run on Tandem's own int8 kernels
    assert int8 is not None and torch.equal(int8.qweight, q)
    cfg["format"] = "float-quantized"
    cfg["config_groups"]["g"]["weights"] = {"num_bits": 8, "type": "float", "strategy": "channel"}  # type: ignore[index]
    f8 = (torch.randn(16, 64, generator=gen(2)) * 50).to(torch.float8_e4m3fn)
    got = detect({"quantization_config": cfg}).convert("model.layers.0.mlp.up_proj",  # type: ignore[union-attr]
                                                       {"weight": f8, "weight_scale": scale, "input_scale": scale[0]})
    assert isinstance(got, Fp8Weight)
    torch.testing.assert_close(dequantize(got), f8.float() * scale, **EXACT)


def test_a_gguf_tensor_becomes_a_layer_on_each_cpu_kernel(tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize as gguf_dequantize

    from engine.quant.loader import build_linear

    rng = np.random.default_rng(1)
    raw = random_k_blocks(rng, 32, 2, 144, [0, 2])  # Q4_K: float offsets, groups of 32
    dense = torch.from_numpy(gguf_dequantize(raw, Q.Q4_K).reshape(32, 512).astype(np.float32))
    w = gguf.convert_tensor(raw, int(Q.Q4_K), (32, 512))
    x = torch.randn(3, 512, generator=gen())
    f32 = build_linear(w, None, "torch", torch.device("cpu"), torch.float32)
    assert f32.kernel == "dequant"  # type: ignore[union-attr]
    torch.testing.assert_close(f32(x), x @ dense.t(), atol=1e-4, rtol=1e-4)
    bf16 = build_linear(w, None, "torch", torch.device("cpu"), torch.bfloat16)
    assert bf16.kernel == "packed"  # type: ignore[union-attr]
    # torch's layout holds scale and zero term in bf16 (8 bits of mantissa): ~1% of each group's range
    torch.testing.assert_close(bf16(x.bfloat16()).float(), x @ dense.t(), atol=0.1, rtol=0.05)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_8_bit_grouped_weight_runs_the_grouped_int8_cpu_kernel(dtype: torch.dtype) -> None:
    # GPTQ / compressed-tensors 8-bit: groups of 32, their own zero points, float16 scales
    from engine.quant.loader import build_linear
    from kernels.int8_group_gemm_cpu import load_kernel

    if load_kernel() is None:
        pytest.skip("no C++ compiler here: 8-bit grouped weights keep the dequantizing reference")
    q = torch.randint(0, 256, (40, 96), generator=gen(2), dtype=torch.uint8)
    scales = (torch.rand(40, 3, generator=gen(3)) / 100).half()
    w = GroupWeight(q, scales, torch.randint(0, 256, (40, 3), generator=gen(4), dtype=torch.uint8), 32, 8)
    bias = torch.randn(40, generator=gen(5)).to(dtype)
    lin = build_linear(w, bias, "torch", torch.device("cpu"), dtype)
    assert lin.kernel == "cpu_int8" and lin.qweight.dtype == torch.uint8  # type: ignore[union-attr]
    x = torch.randn(2, 3, 96, generator=gen(6)).to(dtype)  # (batch, tokens, K)
    dense = dequantize_group(w)  # (N, K) float32
    want = x.float() @ dense.t() + bias.float()
    # float32: the same weights summed in another order; bfloat16: the output rounded to 8 bits
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.01)
    torch.testing.assert_close(lin(x).float(), want, **tol)
    lin.scales = lin.scales * 2  # a replaced buffer: the kernel's prepared arguments follow it
    torch.testing.assert_close(lin(x).float(), 2 * (want - bias.float()) + bias.float(), **tol)
    offsets = build_linear(w._replace(zeros=w.zeros.float()), None, "torch", torch.device("cpu"), dtype)
    assert offsets.kernel == "dequant"  # type: ignore[union-attr]  # float offsets: not this kernel's
