"""The dense training forward against the serving engine and transformers; checkpoints it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import LLM, SamplingParams
from engine.checkpoint import CheckpointError
from engine.model_runner import StepInput
from engine.sequence import Sequence
from training.model import TrainableLM, save_hf_checkpoint
from training.tiny import llama3_rope_scaling

transformers = pytest.importorskip("transformers")

CASES = {
    "llama": {"rope_scaling": llama3_rope_scaling(256)},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"tie_word_embeddings": True},
}
LENGTHS = [3, 11, 20]


def _engine_logits(path: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Every position's logits from the paged engine model, one prefill of all prompts."""
    eng = LLM(path, dtype="float32", device="cpu", block_size=8, num_kv_blocks=64).engine
    seqs = [Sequence(f"r{i}", p, SamplingParams()) for i, p in enumerate(prompts)]
    for s in seqs:
        assert eng.block_manager.allocate_slots(s, s.num_tokens)
    input_ids, positions, ctx, _ = eng.runner.prepare(StepInput(seqs, [s.num_tokens for s in seqs], [True] * 3))
    with torch.inference_mode():
        logits = eng.runner.model.compute_logits(eng.runner.model(input_ids, positions, ctx))
    return list(logits.split(LENGTHS))


@pytest.mark.parametrize("arch", list(CASES))
def test_dense_logits_match_engine_and_transformers(tiny_model, arch: str) -> None:
    path = tiny_model(arch, **CASES[arch])
    model = TrainableLM.from_pretrained(path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine_logits = _engine_logits(path, prompts)
    with torch.no_grad():
        batch = torch.tensor([prompts[1][:10], prompts[2][:10]])  # batched rows must not mix
        torch.testing.assert_close(model(batch), hf(batch).logits, rtol=1e-5, atol=1e-5)
        for prompt, ours_engine in zip(prompts, engine_logits, strict=True):
            ours = model(torch.tensor([prompt]))[0]
            torch.testing.assert_close(ours, hf(torch.tensor([prompt])).logits[0], rtol=1e-5, atol=1e-5)
            # The engine's paged attention sums in another order: equal to float32 rounding.
            torch.testing.assert_close(ours, ours_engine, rtol=1e-4, atol=1e-4)


def test_gradients_reach_every_parameter(tiny_model) -> None:
    model = TrainableLM.from_pretrained(tiny_model("qwen2"))
    model(torch.randint(0, 1000, (2, 9))).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_saved_checkpoint_loads_in_transformers_and_engine(tiny_model, tmp_path: Path, arch: str) -> None:
    src = tiny_model(arch, **CASES[arch])
    model = TrainableLM.from_pretrained(src)
    model.init_weights(seed=3)
    out = save_hf_checkpoint(model, tmp_path / "saved", tokenizer_src_dir=src, dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["architectures"] == model.hf_config["architectures"]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    tensors = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert ("lm_head.weight" in tensors) == (not model.cfg.tie_word_embeddings)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded = TrainableLM.from_pretrained(out)
    ids = torch.randint(3, model.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    outs = LLM(out, dtype="float32", device="cpu", num_kv_blocks=32).generate(
        [ids[0].tolist()], SamplingParams(temperature=0.0, max_tokens=5))
    assert outs[0].token_ids == _greedy(reloaded, ids[0].tolist(), 5)


def _greedy(model: TrainableLM, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_save_rewrites_in_place_and_rejects_bad_inputs(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("llama")
    model = TrainableLM.from_pretrained(src)
    out = save_hf_checkpoint(model, tmp_path / "m", src)
    save_hf_checkpoint(model, out, out)  # tokenizer source == destination: nothing to copy
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    with pytest.raises(ValueError, match="unknown dtype"):
        save_hf_checkpoint(model, out, src, dtype="int8")
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        save_hf_checkpoint(model, out, tmp_path)


def test_load_weights_names_the_bad_tensor(tiny_model) -> None:
    model = TrainableLM.from_pretrained(tiny_model("llama"))
    weights = dict(model.state_dict())
    weights["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="model.norm.weight"):
        model.load_weights(weights)
    del weights["model.norm.weight"]
    with pytest.raises(ValueError, match="missing"):
        model.load_weights(weights)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, model.cfg.max_position_embeddings + 1, dtype=torch.long))
