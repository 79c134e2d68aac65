"""Tiny checkpoints: transformers loads every architecture exactly, weights are deterministic and useful."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as RawTokenizer

from cli.main import main as tandem_main
from engine.weights import iter_safetensors
from training.tiny import llama3_rope_scaling, make_tiny_model, tokenizer_cache_dir

transformers = pytest.importorskip("transformers")

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_every_arch_without_missing_or_unexpected_keys(tiny_model, arch: str) -> None:
    path = tiny_model(arch)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    expected = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    assert type(model).__name__ == expected
    cfg = _config(path)
    assert cfg["architectures"] == [expected] and cfg["model_type"] == arch
    assert cfg["hidden_act"] == "silu" and cfg["torch_dtype"] == "float32"
    assert cfg["tie_word_embeddings"] is False
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tok) == cfg["vocab_size"] == 1024
    assert cfg["eos_token_id"] in tok.all_special_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_padded_model_vocabulary_loads_in_transformers(tiny_model, arch: str) -> None:
    """As Qwen ships them: config.json's vocab_size counts the model's rows, the tokenizer has fewer."""
    path = tiny_model(arch, vocab_size=384, model_vocab_size=512)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.model.embed_tokens.weight.shape == model.lm_head.weight.shape == (512, 64)
    assert _config(path)["vocab_size"] == 512 == model.config.vocab_size
    assert len(transformers.AutoTokenizer.from_pretrained(path)) == 384
    plain = tiny_model(arch, vocab_size=384)
    assert (path / "tokenizer.json").read_text() == (plain / "tokenizer.json").read_text()
    assert _config(plain)["vocab_size"] == 384


def test_family_specific_tensors(tiny_model) -> None:
    names = {arch: set(load_file(tiny_model(arch) / "model.safetensors")) for arch in ARCHS}
    assert "model.layers.1.self_attn.q_proj.bias" in names["qwen2"]
    assert not any(n.endswith(".bias") for arch in ("llama", "mistral", "qwen3") for n in names[arch])
    assert "model.layers.0.self_attn.k_norm.weight" in names["qwen3"]
    assert not any("q_norm" in n for arch in ("llama", "mistral", "qwen2") for n in names[arch])
    assert all("lm_head.weight" in names[arch] for arch in ARCHS)
    assert _config(tiny_model("qwen3"))["head_dim"] == 16
    assert _config(tiny_model("mistral"))["sliding_window"] is None


def test_special_tokens_per_family(tiny_model) -> None:
    llama = RawTokenizer.from_file(str(tiny_model("llama") / "tokenizer.json"))
    assert [llama.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    qwen = RawTokenizer.from_file(str(tiny_model("qwen2") / "tokenizer.json"))
    qwen_specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert [qwen.token_to_id(t) for t in qwen_specials] == [1021, 1022, 1023]
    gen = json.loads((tiny_model("qwen2") / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1023, 1021]
    tok_cfg = json.loads((tiny_model("llama") / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "[INST]" in tok_cfg["chat_template"]


def test_tied_embeddings_llama3_rope_and_sliding_window(tmp_path: Path) -> None:
    rope = llama3_rope_scaling(256, 8.0)
    path = make_tiny_model(tmp_path / "llama", "llama", tie_word_embeddings=True, rope_scaling=rope,
                           num_layers=1, head_dim=32)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 32, 64)
    params = transformers.AutoConfig.from_pretrained(path).rope_parameters
    assert params["rope_type"] == "llama3" and params["factor"] == 8.0
    assert params["original_max_position_embeddings"] == 256

    mistral = make_tiny_model(tmp_path / "mistral", "mistral", sliding_window=32, num_layers=1)
    assert transformers.AutoConfig.from_pretrained(mistral).sliding_window == 32


def test_sharded_checkpoint_matches_single_file(tiny_model) -> None:
    single = dict(iter_safetensors(tiny_model("llama")))
    path = tiny_model("llama", num_shards=3)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(single) and set(index["weight_map"].values()) == set(shards)
    sharded = dict(iter_safetensors(path))
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_weights_are_deterministic_in_seed_and_dtype(tmp_path: Path, tiny_model) -> None:
    base = load_file(tiny_model("qwen3") / "model.safetensors")
    again = load_file(make_tiny_model(tmp_path / "a", "qwen3") / "model.safetensors")
    other = load_file(make_tiny_model(tmp_path / "b", "qwen3", seed=1) / "model.safetensors")
    assert all(torch.equal(base[k], again[k]) for k in base)
    assert not torch.equal(base["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    bf16 = make_tiny_model(tmp_path / "c", "qwen3", dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in load_file(bf16 / "model.safetensors").values())
    assert _config(bf16)["torch_dtype"] == "bfloat16"
    norms = base["model.layers.0.input_layernorm.weight"]
    assert 0.7 < norms.min() < norms.max() < 1.3 and norms.std() > 0.05


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_greedy_outputs_vary(tiny_model, arch: str, tied: bool) -> None:
    """A near-constant model would let a broken engine pass the transformers comparisons."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model(arch, tie_word_embeddings=tied))
    ids = torch.randint(3, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                         do_sample=False)[:, 12:]
    # Random models fall into loops eventually; what matters is that outputs depend on the input.
    assert len(set(out.flatten().tolist())) >= 12, out
    assert len(set(out[:, 0].tolist())) >= 3, out


def test_bad_options_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3"):
        make_tiny_model(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="dtype"):
        make_tiny_model(tmp_path, "llama", dtype="float64")
    with pytest.raises(ValueError, match="num_kv_heads"):
        make_tiny_model(tmp_path, "llama", num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="sliding_window"):
        make_tiny_model(tmp_path, "llama", sliding_window=16)
    with pytest.raises(ValueError, match="num_shards"):
        make_tiny_model(tmp_path, "llama", num_shards=100)
    with pytest.raises(ValueError, match=r"model_vocab_size \(400\) must be >= vocab_size \(512\)"):
        make_tiny_model(tmp_path, "llama", vocab_size=512, model_vocab_size=400)
    assert not (tmp_path / "config.json").exists()


def test_tokenizer_cache_is_used_and_survives_corruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    out = make_tiny_model(tmp_path / "m1", "llama", vocab_size=512, num_layers=1)
    (cached,) = tokenizer_cache_dir().glob("llama-512-*.json")
    assert json.loads(cached.read_text()) == json.loads((out / "tokenizer.json").read_text())
    # A marker put into the cached tokenizer shows up in the next checkpoint: it was read, not retrained.
    marked = RawTokenizer.from_file(str(cached))
    marked.add_tokens(["<cache-marker>"])
    marked.save(str(cached))
    out2 = make_tiny_model(tmp_path / "m2", "llama", vocab_size=512, num_layers=1)
    assert "<cache-marker>" in (out2 / "tokenizer.json").read_text()
    cached.write_text("{not json")
    out3 = make_tiny_model(tmp_path / "m3", "llama", vocab_size=512, num_layers=1)
    retrained = json.loads((out3 / "tokenizer.json").read_text())
    assert retrained == json.loads((out / "tokenizer.json").read_text())


def test_cli_writes_a_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    rc = tandem_main(["make-tiny-model", str(out), "--arch", "llama", "--layers", "1", "--hidden-size", "32",
                      "--heads", "2", "--kv-heads", "1", "--shards", "2", "--tie-word-embeddings",
                      "--llama3-rope-scaling", "--max-position-embeddings", "512"])
    assert rc == 0
    cfg = _config(out)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (1, 32, 1)
    assert cfg["tie_word_embeddings"] is True and (out / "model.safetensors.index.json").is_file()
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    assert cfg["rope_scaling"]["original_max_position_embeddings"] == 64
    padded = tmp_path / "padded"
    assert tandem_main(["make-tiny-model", str(padded), "--layers", "1", "--vocab-size", "384",
                        "--model-vocab-size", "400"]) == 0
    assert _config(padded)["vocab_size"] == 400
    assert tandem_main(["make-tiny-model", str(tmp_path / "bad"), "--heads", "3"]) == 2
    with pytest.raises(SystemExit):
        tandem_main(["make-tiny-model", str(tmp_path / "bad"), "--arch", "gpt2"])
