"""Greedy generation through the Triton kernels (interpreter on CPU, float32, a tiny model) gives
the same tokens as the PyTorch path: chunked prefill, batched decode and a prefix-cache hit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams

PROMPTS = [
    [5, 17, 300, 42, 9, 77, 123, 8, 64, 511, 2, 19, 33, 400, 7, 81, 12, 99, 250, 6, 3, 14],
    [40, 41, 42],
]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_greedy_tokens_match_torch_path(
    tiny_model: Callable[..., Path], device: torch.device, arch: str
) -> None:
    options = {"sliding_window": 12} if arch == "mistral" else {}
    path = tiny_model(arch, **options)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        # Chunks of 8 tokens: the 22-token prompt prefills over its own cached prefix; the second
        # generate call re-sends the first prompt, a prefix-cache hit.
        llm = LLM(path, dtype="float32", device=str(device), attention_backend=backend,
                  max_num_batched_tokens=8, num_kv_blocks=32, block_size=16)  # fmt: skip
        first = [out.token_ids for out in llm.generate(PROMPTS, params)]
        again = llm.generate([PROMPTS[0] + first[0][:2]], params)[0]
        assert again.num_cached_tokens > 0
        tokens[backend] = [*first, again.token_ids]
    assert tokens["triton"] == tokens["torch"]
