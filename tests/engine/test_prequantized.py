"""Pre-quantized checkpoints through the engine: detected from config.json, projections kept quantized
on the device, and the model computing what the checkpoint's dequantized weights compute (its twin,
tests/quant_checkpoints.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM
from engine.quant import QuantLinear, linear_weight_bytes, projection_modules
from engine.quant.group_linear import GroupQuantLinear
from tests.quant_checkpoints import FORMATS, write_quantized
from training.quant_quality import prompt_logits

TOKENS = [5, 17, 300, 42, 7, 99, 512, 3, 64, 128, 256, 11]


@pytest.fixture(scope="module")
def dense(tiny_model) -> Path:
    return tiny_model("llama", hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2)


def runner(model: Path, **kw):
    return LLM(model, device="cpu", num_kv_blocks=8, **{"dtype": "float32", **kw}).engine.runner


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_quantized_checkpoint_computes_what_its_dequantized_twin_does(dense: Path, tmp_path: Path, fmt: str) -> None:
    quant, twin = write_quantized(dense, tmp_path, fmt)
    q, ref = runner(quant), runner(twin)
    mods = [m for _, m in projection_modules(q.model)]
    assert all(isinstance(m, QuantLinear) for m in mods)
    expect = "Fp8Linear" if fmt == "fp8" else "GroupQuantLinear"
    assert {type(m).__name__ for m in mods} == {expect}
    if fmt == "gptq-act-order":
        assert all(m.perm is not None for m in mods if isinstance(m, GroupQuantLinear))
    assert linear_weight_bytes(q.model) < 0.6 * linear_weight_bytes(ref.model)
    torch.testing.assert_close(prompt_logits(q, TOKENS), prompt_logits(ref, TOKENS), atol=2e-4, rtol=2e-4)


def test_qkv_bias_fuses_with_the_quantized_shards(tiny_model, tmp_path: Path) -> None:
    qwen2 = tiny_model("qwen2", hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2)
    quant, twin = write_quantized(qwen2, tmp_path, "gptq-act-order")
    q, ref = runner(quant), runner(twin)
    assert q.model.layers[0].self_attn.qkv_proj.bias is not None
    torch.testing.assert_close(prompt_logits(q, TOKENS), prompt_logits(ref, TOKENS), atol=2e-4, rtol=2e-4)


def test_bfloat16_uses_torchs_packed_int4_kernel_and_triton_matches_torch(dense: Path, tmp_path: Path) -> None:
    quant, twin = write_quantized(dense, tmp_path, "gptq-act-order")
    bf16 = runner(quant, dtype="bfloat16")
    assert {m.kernel for _, m in projection_modules(bf16.model)} == {"packed"}
    ref = runner(twin, dtype="bfloat16")
    # bf16 activations: the two paths round differently (torch's layout keeps bf16 scales); logits O(1)
    torch.testing.assert_close(prompt_logits(bf16, TOKENS), prompt_logits(ref, TOKENS), atol=0.1, rtol=0.05)
    tri = runner(quant, attention_backend="triton")
    assert {m.kernel for _, m in projection_modules(tri.model)} == {"triton"}
    torch.testing.assert_close(prompt_logits(tri, TOKENS), prompt_logits(runner(quant), TOKENS), atol=2e-4, rtol=2e-4)


def test_an_old_autogptq_checkpoint_with_quantize_config_json(dense: Path, tmp_path: Path) -> None:
    import json

    quant, twin = write_quantized(dense, tmp_path, "gptq")
    cfg = json.loads((quant / "config.json").read_text())
    (quant / "quantize_config.json").write_text(json.dumps(cfg.pop("quantization_config")))
    (quant / "config.json").write_text(json.dumps(cfg))
    torch.testing.assert_close(prompt_logits(runner(quant), TOKENS), prompt_logits(runner(twin), TOKENS),
                               atol=2e-4, rtol=2e-4)  # fmt: skip


def test_bad_combinations_are_refused_naming_the_problem(dense: Path, tmp_path: Path) -> None:
    quant, _ = write_quantized(dense, tmp_path, "awq")
    with pytest.raises(ValueError, match="already quantized \\(awq\\)"):
        runner(quant, quantization="int4")
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(quant / "model.safetensors").items() if "layers.1.self_attn.k_proj" not in k}
    save_file(tensors, quant / "model.safetensors")
    with pytest.raises(ValueError, match="layers.1.self_attn.k_proj"):
        runner(quant)
