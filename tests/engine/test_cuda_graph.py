"""CUDA graphs of the decode forward (engine/cuda_graph.py): the sizes captured, and that the CPU never
captures. Replays against eager steps and transformers run on a GPU: tests/engine/test_gpu_vs_hf.py."""

from __future__ import annotations

from engine import LLM
from engine.cuda_graph import MAX_CAPTURED_BATCH, capture_sizes


def test_capture_sizes_cover_every_batch_up_to_the_limit() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 20
    assert capture_sizes(10_000)[-1] == MAX_CAPTURED_BATCH
    for top in (1, 3, 17, 100, 256, 600):
        sizes = capture_sizes(top)
        assert sizes == sorted(set(sizes))
        # every batch up to the top pads to a captured size at most 16 rows (or 2x) above it
        assert all(any(n <= s <= max(2 * n, n + 15) for s in sizes) for n in range(1, sizes[-1] + 1))


def test_the_cpu_captures_no_graph(tiny_model) -> None:
    llm = LLM(tiny_model("llama"), dtype="float32", device="cpu", num_kv_blocks=16)
    assert llm.engine.runner.graphs is None


class _RecomputingGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: `replay` re-runs the model on the static buffers."""

    def __init__(self) -> None:
        self.fn = None

    def replay(self) -> None:
        assert self.fn is not None
        self.fn()

    def pool(self) -> None:
        return None


def test_replays_pad_the_batch_and_give_the_eager_tokens(tiny_model, monkeypatch) -> None:
    """The graphs' bookkeeping (static buffers, padding to a captured size, stale rows, slot -1) on the CPU,
    with torch's CUDA graph API replaced by a recomputation. 21 requests of different lengths through at
    most 7 running sequences: batches shrink and grow, padded rows sit where finished sequences were while
    new ones reuse their blocks, and the tokens equal eager steps'; every block comes back."""
    import contextlib

    import torch

    from engine.cuda_graph import DecodeGraphs
    from engine.model import ForwardContext
    from engine.sampling.params import SamplingParams
    from tests.hf_reference import random_prompts

    path = tiny_model("qwen3")
    prompts = random_prompts(1000, [1, 5, 9, 17, 23, 40, 57] * 3, seed=2)
    params = [SamplingParams(temperature=0.0, max_tokens=3 + 5 * i % 11, ignore_eos=True) for i in range(len(prompts))]
    config = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=96, max_num_seqs=7)
    want = [o.token_ids for o in LLM(path, **config).generate(prompts, params)]
    llm = LLM(path, **config)
    r = llm.engine.runner
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _RecomputingGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None, capture_error_mode=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    with torch.inference_mode():
        graphs = DecodeGraphs(r.model, r.kv, r.ops, r.kv_scale, 7, -(-r.max_model_len // r.block_size), r.device)
    assert graphs.sizes == [1, 2, 4, 7]
    for b, graph in graphs.graphs.items():
        ctx = ForwardContext(kv=r.kv, slot_mapping=graphs.slot_mapping[:b], block_tables=graphs.block_tables[:b],
                             query_start_loc=graphs.query_start_loc[: b + 1], seq_lens=graphs.seq_lens[:b],
                             max_query_len=1, ops=r.ops, kv_scale=r.kv_scale)
        graph.fn = lambda b=b, ctx=ctx: graphs.hidden[b].copy_(r.model(graphs.input_ids[:b], graphs.positions[:b], ctx))
    r.graphs = graphs
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert graphs.replays >= 10
    assert got == want
    assert llm.engine.block_manager.num_free_blocks == 96
    # a smaller batch on the same graph: the rows it pads must neither store (slot -1) nor read past one row
    for n, slot in ((7, 40), (5, 80)):
        ctx = ForwardContext(kv=r.kv, slot_mapping=torch.arange(slot, slot + n), block_tables=torch.tensor(
                             [[slot // 4 + i] for i in range(n)], dtype=torch.int32), query_start_loc=torch.arange(
                             n + 1, dtype=torch.int32), seq_lens=torch.full((n,), 3, dtype=torch.int32),
                             max_query_len=1, ops=r.ops)
        with torch.inference_mode():
            hidden = graphs.run(torch.arange(n), torch.full((n,), 2), ctx)
        assert hidden.shape[0] == n
    assert graphs.slot_mapping[5:7].tolist() == [-1, -1] and graphs.seq_lens[5:7].tolist() == [1, 1]
    assert graphs.slot_mapping[:5].tolist() == list(range(80, 85))
