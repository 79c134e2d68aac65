"""Tensor parallelism on CPU with gloo, in real processes.

- Every supported architecture (and a padded vocabulary, tied embeddings, fewer KV heads than ranks,
  int8 weights quantized at load, a GPTQ checkpoint, a Q4_0 GGUF kept quantized) gives, split over 2 ranks,
  the logits of the unsharded model at every step of a greedy run: within 1e-4 (float32; only the order of
  the all-reduce's sums differs) for dense weights, within 0.1 for the GGUF (its CPU kernel rounds to
  bfloat16), and the same greedy tokens; the KV relay's whole pages equal the unsharded pool's
  (tests/engine/tp_ranks.py: one 2-process group for all of them).
- Through the engine (LLM: rank 0 starts its follower, broadcasts each step): greedy output and prompt
  logprobs at TP 2 equal TP 1, with speculative decoding (the draft unsharded on rank 0).
- What cannot be split is refused at start-up, naming the count, before any process starts; so is a
  pre-quantized projection whose split would cut a quantization group or an act-order permutation.
- Each rank reads only its slices of a safetensors checkpoint.
"""

from __future__ import annotations

import multiprocessing as mp
import queue

import gguf
import pytest

from engine.checkpoint import load_hf_config
from engine.config import ModelConfig
from engine.llm import LLM
from engine.parallel.driver import free_port
from engine.parallel.shard import TPShard
from engine.sampling.params import SamplingParams
from engine.weights import iter_safetensors
from tests.engine.gguf_export import export_gguf
from tests.engine.tp_ranks import rank_main
from tests.quant_checkpoints import write_quantized

DENSE_ATOL = 1e-4  # float32 logits of std ~2: only the all-reduce's order of sums differs (seen: <= 3e-6)
INT8_ATOL = 0.1  # row-parallel int8: per-row scales over half a row each (RTN at load; seen: 0.05)
# a kept-quantized GGUF on CPU: torch's packed int4 kernel rounds x and its output to bfloat16, so each rank's
# partial sum of a row-parallel projection is rounded before the all-reduce (seen: 0.04 on logits of std ~2)
PACKED_ATOL = 0.1


def test_two_ranks_match_one_for_every_architecture(tiny_model, tmp_path) -> None:
    gptq, _ = write_quantized(tiny_model("llama"), tmp_path, "gptq", group=32)  # o_proj: 32 inputs per rank
    q4 = export_gguf(tiny_model("llama"), tmp_path / "q4_0.gguf", qtype=gguf.GGMLQuantizationType.Q4_0)
    cases = [
        ("llama", str(tiny_model("llama")), None),
        ("mistral", str(tiny_model("mistral", sliding_window=8)), None),
        ("qwen2-padded-vocab", str(tiny_model("qwen2", model_vocab_size=1027)), None),
        ("qwen3-tied", str(tiny_model("qwen3", tie_word_embeddings=True)), None),
        ("llama-1-kv-head", str(tiny_model("llama", num_heads=4, num_kv_heads=1)), None),
        ("llama-int8", str(tiny_model("llama")), "int8"),
        ("llama-gptq-g32", str(gptq), None),
        ("llama-gguf-q4_0", str(q4), None),  # kept quantized: torch's packed int4 kernel on CPU
    ]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    addr = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=rank_main, args=(r, addr, cases, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in cases:
            item = out.get(timeout=120)
            assert item[0] != "error", f"rank {item[1]} failed:\n{item[2]}"
            results[item[0]] = item[1:]
    except queue.Empty:
        pytest.fail(f"ranks answered only {sorted(results)}")
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    for name, (diff, same, kv_heads, std, relay_diff, round_trip, kinds) in results.items():
        assert same, f"{name}: greedy tokens differ at TP 2"
        if "gguf" in name:  # each rank keeps its shard of the file's 4-bit blocks, none dequantized
            assert kinds == ["GroupQuantLinear"], kinds
        # GPTQ: the same groups on both sides, cut on group boundaries: only the sums' order differs
        atol = INT8_ATOL if name.endswith("int8") else PACKED_ATOL if "gguf" in name else DENSE_ATOL
        assert diff <= atol, f"{name}: logits differ by {diff}"
        assert std > 0.5, f"{name}: degenerate logits"
        assert kv_heads == 1, f"{name}: each rank's pool holds one KV head (of 2, or 1 replicated), got {kv_heads}"
        # the KV relay: whole pages gathered from the ranks' heads equal the unsharded pool's pages (the
        # K/V projections are column-parallel: no reduction, so equal up to the order of a matmul's sums)
        assert relay_diff <= atol if not name.endswith("int8") else relay_diff < 0.5, (name, relay_diff)
        assert round_trip, f"{name}: scatter then gather changed the pages"


def test_the_engine_at_tp2_matches_tp1_with_speculation_and_prompt_logprobs(tiny_model) -> None:
    model = str(tiny_model("llama"))
    kw = dict(device="cpu", dtype="float32", num_kv_blocks=64, block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=2, logprobs=1)
    prompts = [[5, 17, 300, 42, 9, 77, 128, 3, 64, 21], list(range(40, 71))]
    want = LLM(model, **kw).generate(prompts, params)
    tp = LLM(model, tensor_parallel_size=2, speculative_model=model, num_speculative_tokens=3, **kw)
    try:
        got = tp.generate(prompts, params)
        assert tp.engine.runner.tp is not None and tp.engine.runner.kv.shape[4] == 1  # 2 KV heads over 2 ranks
        assert tp.engine.spec is not None and tp.engine.spec.stats()["spec_accepted_tokens"] > 0
    finally:
        tp.engine.runner.close()
    for w, g in zip(want, got, strict=True):
        assert g.token_ids == w.token_ids
        assert [lp.token_id for lp in g.prompt_logprobs] == [lp.token_id for lp in w.prompt_logprobs]
        for a, b in zip(g.prompt_logprobs, w.prompt_logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4 and a.rank == b.rank


@pytest.mark.parametrize(("shape", "message"), [
    (dict(num_heads=3, num_kv_heads=1, hidden_size=48), "has 3 attention heads, which --tensor-parallel-size 2"),
    (dict(num_heads=6, num_kv_heads=3, hidden_size=48), "has 3 KV heads, which --tensor-parallel-size 2 does not"),
], ids=["odd-heads", "odd-kv-heads"])
def test_a_model_that_cannot_be_split_is_refused_at_start(tiny_model, shape, message) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(str(tiny_model("llama", **shape)), device="cpu", dtype="float32", num_kv_blocks=8, block_size=8,
            tensor_parallel_size=2)


def test_each_rank_reads_only_its_slices(tiny_model) -> None:
    path = tiny_model("qwen2")
    cfg = ModelConfig.from_hf(load_hf_config(path))
    shard = TPShard(cfg, 2, 1)
    full = dict(iter_safetensors(path))
    part = dict(iter_safetensors(path, select=shard.slice_for))
    d = cfg.head_dim
    q = full["model.layers.0.self_attn.q_proj.weight"]
    assert part["model.layers.0.self_attn.q_proj.weight"].equal(q[2 * d : 4 * d])  # heads 2, 3 of 4
    assert part["model.layers.0.self_attn.k_proj.bias"].equal(full["model.layers.0.self_attn.k_proj.bias"][d:])
    assert part["model.layers.0.self_attn.o_proj.weight"].equal(full["model.layers.0.self_attn.o_proj.weight"][:, 2 * d:])
    assert part["model.layers.0.mlp.down_proj.weight"].shape == (cfg.hidden_size, cfg.intermediate_size // 2)
    assert part["model.embed_tokens.weight"].shape[0] == cfg.vocab_size // 2
    assert part["model.norm.weight"].equal(full["model.norm.weight"])  # replicated


def test_a_split_that_would_cut_a_quantization_group_is_refused() -> None:
    import torch

    from engine.parallel.quantized import slice_quantized
    from engine.parallel.shard import Slice
    from kernels.wna16_gemm import GroupWeight

    w = GroupWeight(torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 2), torch.zeros(8, 2, dtype=torch.uint8),
                    64, 4)  # (8, 128) int4, groups of 64
    half = slice_quantized(w, Slice(1, 64, 64, 128), "o_proj")
    assert half.qweight.shape == (8, 32) and half.scales.shape == (8, 1)
    with pytest.raises(ValueError, match="split its quantization group of 64 at columns/rows \\[32, 96\\)"):
        slice_quantized(w, Slice(1, 32, 64, 128), "layers.0.self_attn.o_proj")
    with pytest.raises(ValueError, match="act-order"):
        slice_quantized(w._replace(perm=torch.arange(128, dtype=torch.int32)), Slice(1, 64, 64, 128), "o_proj")
    assert slice_quantized(w, Slice(0, 4, 4, 8), "q_proj").qweight.shape == (4, 64)  # rows: always allowed
