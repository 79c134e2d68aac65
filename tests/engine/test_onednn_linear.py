"""float32 CPU engines run their wide linears through oneDNN (kernels/onednn_linear.py, chosen at load
by engine.model.use_onednn_linears): gate_up_proj and the LM head (tied or not) of a model wide enough
for the rule, nothing else; the logits match an engine with F.linear everywhere and transformers; the
option (onednn_linear=False) and backend "torch" keep F.linear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from engine import LLM, SamplingParams
from engine.model import use_onednn_linears
from kernels.onednn_linear import OneDNNLinear, available
from tests.hf_reference import assert_prompt_logits_match, prompt_logits, random_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

# hidden 512 (K >= 512): gate_up (2 x 1024 rows) and the head (4096 rows, the tokenizer's 1024 padded)
# take oneDNN (N >= 2K, N * K >= 2^20); qkv (512 + 2 x 128 = 768 rows), o and down do not
SHAPE = {"hidden_size": 512, "intermediate_size": 1024, "num_heads": 4, "num_kv_heads": 1, "vocab_size": 1024,
         "model_vocab_size": 4096}


@pytest.fixture(autouse=True)
def onednn() -> None:
    if not available():
        pytest.skip("oneDNN linear is unavailable in this torch: the engine keeps F.linear (see the log)")


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def wide(request: pytest.FixtureRequest, tiny_model) -> Path:
    return tiny_model("qwen2", tie_word_embeddings=request.param, **SHAPE)  # qwen2: qkv has a bias


def _llm(path: Path, **kwargs) -> LLM:
    return LLM(path, dtype="float32", device="cpu", block_size=8, max_num_batched_tokens=256, num_kv_blocks=64,
               **kwargs)


def test_engine_picks_onednn_for_the_wide_layers_only(wide: Path) -> None:
    model = _llm(wide).engine.runner.model
    layer = model.layers[0]
    assert type(layer.mlp.gate_up_proj) is OneDNNLinear  # (2048, 512)
    assert type(layer.self_attn.qkv_proj) is nn.Linear  # (768, 512)
    assert type(layer.self_attn.o_proj) is nn.Linear and type(layer.mlp.down_proj) is nn.Linear
    assert model.onednn_head
    assert all(type(m) is not OneDNNLinear or name.endswith("gate_up_proj") for name, m in model.named_modules())


def test_logits_match_f_linear_and_transformers(wide: Path) -> None:
    prompts = random_prompts(1024, [1, 7, 30], seed=3)
    plain = _llm(wide, onednn_linear=False)
    assert not plain.engine.runner.model.onednn_head
    assert not any(isinstance(m, OneDNNLinear) for m in plain.engine.runner.model.modules())
    fast = _llm(wide)
    ours = assert_prompt_logits_match(fast.engine, wide, prompts)  # transformers, 1e-4
    torch.testing.assert_close(ours, prompt_logits(plain.engine, prompts), atol=2e-5, rtol=2e-5)


def test_greedy_output_matches_f_linear(wide: Path) -> None:
    prompts = random_prompts(1024, [5, 12, 20], seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    fast = [o.token_ids for o in _llm(wide).generate(prompts, params)]
    plain = [o.token_ids for o in _llm(wide, onednn_linear=False).generate(prompts, params)]
    assert fast == plain


def test_backend_torch_and_narrow_models_keep_f_linear(wide: Path, tiny_model) -> None:
    model = _llm(wide, attention_backend="torch").engine.runner.model
    assert not model.onednn_head and not any(isinstance(m, OneDNNLinear) for m in model.modules())
    narrow = _llm(tiny_model("llama")).engine.runner.model  # hidden 64: K below the rule's 512
    assert not narrow.onednn_head and not any(isinstance(m, OneDNNLinear) for m in narrow.modules())
    assert use_onednn_linears(narrow) == []


def test_quantized_layers_are_left_alone(wide: Path) -> None:
    model = _llm(wide, quantization="int8").engine.runner.model
    assert not any(isinstance(m, OneDNNLinear) for m in model.modules())  # the projections are Int8Linear
    assert model.onednn_head  # the head stays dense float32


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_floor_times_the_linears_the_engine_runs(wide: Path, quantization: str | None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.model
    import kernels.onednn_linear
    from bench.floor import StepRecorder, floor

    llm = _llm(wide, quantization=quantization)
    recorder = StepRecorder()
    recorder.attach(llm.engine)
    llm.generate(random_prompts(1024, [6, 9], seed=5), SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    calls: list[int] = []  # data_ptr of each weight oneDNN ran
    real = kernels.onednn_linear.onednn_linear_unchecked

    def counted(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(w.data_ptr())
        return real(x, w, b)

    monkeypatch.setattr(kernels.onednn_linear, "onednn_linear_unchecked", counted)  # OneDNNLinear.forward
    monkeypatch.setattr(engine.model, "onednn_linear_unchecked", counted)  # the LM head
    result = floor(llm.engine, recorder.steps)
    assert result["matmul_s"] > 0 and result["steps"] == len(recorder.steps)
    model = llm.engine.runner.model
    head = model.embed_tokens.weight if model.cfg.tie_word_embeddings else model.lm_head.weight
    assert head.data_ptr() in calls  # the head through oneDNN, as compute_logits runs it
    gate_up = model.layers[0].mlp.gate_up_proj  # oneDNN when dense, Int8Linear's kernel when quantized
    assert (quantization is None) == (isinstance(gate_up, OneDNNLinear) and gate_up.weight.data_ptr() in calls)
