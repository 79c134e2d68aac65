"""GGUF files load as the Hugging Face checkpoint they were converted from: same config, same tokenizer
and chat template, same weights (llama.cpp's q/k permutation undone), so the same logits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from engine import LLM
from engine.checkpoint import CheckpointError, checkpoint_fingerprint, load_hf_config
from engine.config import ModelConfig
from engine.gguf_file import read_gguf
from engine.sampling.params import SamplingParams
from engine.tokenizer import Tokenizer
from engine.weights import iter_gguf, iter_safetensors
from kernels.int8_group_gemm_cpu import load_kernel as load_int8_kernel
from tests.engine.gguf_export import export_gguf
from tests.hf_reference import prompt_logits, random_prompts

TEXTS = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)", "  spaces\tand\ttabs\n\n",
         "naïve café — ünïcödé 日本語 🙂", "x = [1, 22, 333, 4444]; print(x)  # done"]


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """arch -> (HF checkpoint, its F32 GGUF)."""
    out = {}
    for arch in ("llama", "qwen2", "qwen3"):
        hf = tiny_model(arch)
        out[arch] = (hf, export_gguf(hf, tmp_path_factory.mktemp("gguf") / f"tiny-{arch}.gguf"))
    return out


def test_the_header_reads_as_the_gguf_library_reads_it(exported) -> None:
    _, path = exported["qwen3"]
    ours, ref = read_gguf(path), gguf.GGUFReader(path)
    assert set(ours.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.offset == t.data_offset and info.type == t.tensor_type
        assert info.shape == tuple(int(d) for d in reversed(t.shape))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f32_gguf_gives_the_logits_of_the_original(exported, arch: str) -> None:
    hf, path = exported[arch]
    a, b = load_hf_config(hf), load_hf_config(path)
    assert ModelConfig.from_hf(a) == ModelConfig.from_hf(b)
    hf_weights = dict(iter_safetensors(hf))
    gguf_weights = dict(iter_gguf(path))
    assert gguf_weights.keys() == hf_weights.keys()
    for name, w in hf_weights.items():  # bit for bit: the permutation is undone exactly
        assert torch.equal(gguf_weights[name], w.float()), name
    kw = dict(dtype="float32", device="cpu", block_size=8, num_kv_blocks=64)
    prompts = random_prompts(ModelConfig.from_hf(a).vocab_size, [5, 17], seed=4)
    torch.testing.assert_close(prompt_logits(LLM(path, **kw).engine, prompts), prompt_logits(LLM(hf, **kw).engine, prompts),
                               rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_tokenizer_and_chat_template_come_from_the_file(exported, arch: str) -> None:
    hf, path = exported[arch]
    ours, ref = Tokenizer.from_dir(path), Tokenizer.from_dir(hf)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
        ids = ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids)
    assert ours.eos_token_ids == ref.eos_token_ids and ours.bos_token_id == ref.bos_token_id
    assert ours.all_special_ids == ref.all_special_ids
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "more"}]
    assert ours.apply_chat_template(chat) == ref.apply_chat_template(chat)


def test_quantized_tensors_are_dequantized_by_gguf(tiny_model, tmp_path: Path) -> None:
    hf = tiny_model("llama")
    path = export_gguf(hf, tmp_path / "q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    assert load_hf_config(path)["torch_dtype"] == "float16"
    weights = dict(iter_gguf(path))
    q = gguf.GGMLQuantizationType.Q8_0
    for name, w in iter_safetensors(hf):
        w32 = w.float().numpy()
        # rows are quantized independently, so quantizing the permuted rows and unpermuting commutes
        want = gguf.quants.dequantize(gguf.quants.quantize(w32, q), q) if w32.ndim == 2 else w32
        np.testing.assert_array_equal(weights[name].numpy(), want, err_msg=name)
    outs = LLM(path, dtype="float32", device="cpu", num_kv_blocks=64).generate(
        [[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(outs[0].token_ids) == 4


def test_fingerprint_and_errors(exported, tmp_path: Path) -> None:
    _, path = exported["llama"]
    assert checkpoint_fingerprint(path) == checkpoint_fingerprint(path)
    assert checkpoint_fingerprint(path) != checkpoint_fingerprint(exported["qwen2"][1])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_hf_config(bad)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf_config(cut)


def k_blocks(seed: int) -> Callable[[str, np.ndarray], tuple[np.ndarray, gguf.GGMLQuantizationType] | None]:
    """Random Q4_K blocks for q/k/o/gate/up and Q6_K for v/down (llama.cpp's Q4_K_M mixes the two this
    way): gguf cannot quantize to the K-quants, and a kept-vs-dequantized comparison needs no original."""
    rng = np.random.default_rng(seed)
    q = gguf.GGMLQuantizationType

    def make(name: str, w: np.ndarray) -> tuple[np.ndarray, gguf.GGMLQuantizationType] | None:
        if "_proj" not in name:
            return None
        kind, nbytes, halves = (q.Q6_K, 210, [208]) if ("v_proj" in name or "down_proj" in name) else (q.Q4_K, 144, [0, 2])
        rows, blocks = w.shape[0], w.shape[1] // 256
        raw = rng.integers(0, 256, (rows, blocks, nbytes), dtype=np.uint8)
        for off in halves:  # small finite f16 super-block scales
            raw[..., off : off + 2] = (rng.random((rows, blocks, 1)) / 4096).astype(np.float16).view(np.uint8)
        return raw.reshape(rows, blocks * nbytes), kind

    return make


def kinds(llm: LLM) -> set[str]:
    from engine.quant import projection_modules

    return {f"{type(m).__name__}/{getattr(m, 'kernel', 'dense')}" for _, m in projection_modules(llm.engine.runner.model)}


def weight_bytes(llm: LLM) -> int:
    from engine.quant import linear_weight_bytes

    return linear_weight_bytes(llm.engine.runner.model)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "K"])
def test_a_quantized_gguf_keeps_its_projections_quantized(tiny_model, tmp_path: Path, qtype: str) -> None:
    hf = tiny_model("llama", hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2)
    kind = gguf.GGMLQuantizationType.Q4_0 if qtype == "K" else gguf.GGMLQuantizationType[qtype]
    path = export_gguf(hf, tmp_path / f"{qtype}.gguf", qtype=kind, blocks=k_blocks(0) if qtype == "K" else None)
    kw = dict(dtype="float32", device="cpu", block_size=8, num_kv_blocks=64)
    kept, exact = LLM(path, **kw), LLM(path, gguf_dequantize=True, **kw)
    assert kinds(exact) == {"Linear/dense"}
    prompts = random_prompts(1024, [5, 17], seed=4)
    got, want = prompt_logits(kept.engine, prompts), prompt_logits(exact.engine, prompts)
    int8 = "GroupQuantLinear/cpu_int8" if load_int8_kernel() is not None else "Linear/dense"
    if qtype == "Q8_0":  # the grouped int8 C++ kernel: the same float32 weights, summed in another order
        assert kinds(kept) == {int8}
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        return
    # 4-bit: torch's packed kernel, x rounded to bfloat16 on the way in (8 bits of mantissa, as llama.cpp
    # rounds x to 8-bit integers on CPU): logits move by ~1% of their spread, the argmax holds
    # K: Q6_K's v and down are 8-bit (the grouped int8 kernel); qkv keeps one module per shard
    want_kinds = {"GroupQuantLinear/packed"} | ({"ConcatLinear/dense", int8} if qtype == "K" else set())
    assert kinds(kept) == want_kinds
    assert weight_bytes(kept) < (0.6 if qtype == "K" else 0.2) * weight_bytes(exact)
    spread = float(want.std())
    assert float((got - want).abs().max()) < 0.05 * spread, float((got - want).abs().max()) / spread
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.95


def test_a_q8_0_gguf_keeps_its_projections_in_8_bits_on_cpu(tiny_model, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.quant import projection_modules
    from kernels import int8_group_gemm_cpu

    if load_int8_kernel() is None:
        pytest.skip("no C++ compiler here: Q8_0 projections are expanded to dense (see the log)")
    hf = tiny_model("llama", hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2)
    path = export_gguf(hf, tmp_path / "q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    kw = dict(dtype="float32", device="cpu", block_size=8, num_kv_blocks=64)
    kept, exact = LLM(path, **kw), LLM(path, gguf_dequantize=True, **kw)
    assert kinds(kept) == {"GroupQuantLinear/cpu_int8"}
    for _, m in projection_modules(kept.engine.runner.model):
        assert m.qweight.dtype == torch.uint8 and m.scales.dtype == torch.float32 and m.group_size == 32
    # 1 byte per weight + a float32 scale and a uint8 zero point per 32, against 4 bytes dense
    assert weight_bytes(kept) * 4 == weight_bytes(exact) * (1 + 5 / 32)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = random_prompts(1024, [5, 17, 9], seed=8)
    got = [o.token_ids for o in kept.generate(prompts, params)]
    assert got == [o.token_ids for o in exact.generate(prompts, params)]
    # without the kernel (no compiler): expanded to dense at load, as before
    monkeypatch.setattr(int8_group_gemm_cpu, "load_kernel", lambda: None)
    assert kinds(LLM(path, **kw)) == {"Linear/dense"}


def test_a_kept_quantized_gguf_refuses_load_time_quantization(tiny_model, tmp_path: Path) -> None:
    path = export_gguf(tiny_model("llama"), tmp_path / "q4.gguf", qtype=gguf.GGMLQuantizationType.Q4_1)
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=16)
    with pytest.raises(ValueError, match=r"already quantized \(GGUF .*Q4_1\).*gguf_dequantize"):
        LLM(path, quantization="int4", **kw)
    assert kinds(LLM(path, quantization="int4", gguf_dequantize=True, **kw)) == {"Int4Linear/dequant"}
