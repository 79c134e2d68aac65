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
