"""Kernel tests: every Triton kernel against its PyTorch reference.

Without CUDA the kernels run on CPU through the Triton interpreter, which Triton fixes when triton
is first imported; so TRITON_INTERPRET=1 is set here, at conftest import, before any test module
imports triton (directly, through ``kernels``, or through ``transformers``). With CUDA the same
tests run compiled on the GPU, and the ``gpu``-marked bfloat16 tests run too (the interpreter's
``tl.dot`` is wrong for bfloat16, so those never run on CPU).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """torch's intra-op thread count for one test (the C++ CPU kernels' parallel split), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the Triton kernels under test run: the GPU when there is one, else the interpreter."""
    from kernels._triton import is_interpreted
    from kernels.rmsnorm import _rms_norm_kernel

    if torch.cuda.is_available():
        return torch.device("cuda")
    if not is_interpreted(_rms_norm_kernel):
        pytest.fail(
            "triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1: run "
            "tests/kernels on its own, or set TRITON_INTERPRET=1 in the environment / tests/conftest.py"
        )
    return torch.device("cpu")


@pytest.fixture
def cuda_device() -> torch.device:
    """The GPU for ``gpu``-marked tests; skips the test without one."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


class PagedBatch(NamedTuple):
    """A batch laid out as the engine lays it out: see kernels/paged_attention.py."""

    q: torch.Tensor  # (T, Hq, D)
    kv_layer: torch.Tensor  # (num_blocks, 2, block_size, Hk, D), a view into a 2-layer pool
    block_tables: torch.Tensor  # (B, max_blocks) int32, shuffled, unused entries out of range
    query_start_loc: torch.Tensor  # (B+1,) int32
    seq_lens: torch.Tensor  # (B,) int32


@pytest.fixture
def make_paged() -> Callable[..., PagedBatch]:
    """``make_paged(q_lens, seq_lens, num_kv_heads, group, head_dim, block_size, dtype, device)``.

    Blocks are handed out in a random order (block tables are not contiguous), a spare column of
    every table row is left unused and filled with an out-of-range block id, and the cache is layer
    1 of a 2-layer pool; ``kv_layout="slot_major"`` stores it as (num_blocks, bs, 2, Hk, D) memory
    viewed through a transpose, so the kernels must honour every stride.
    """

    def make(
        q_lens: list[int],
        seq_lens: list[int],
        num_kv_heads: int,
        group: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_layout: str = "engine",
        seed: int = 0,
    ) -> PagedBatch:
        gen = torch.Generator().manual_seed(seed)
        batch = len(seq_lens)
        max_blocks = max(math.ceil(s / block_size) for s in seq_lens) + 1
        num_blocks = batch * max_blocks + 3
        if kv_layout == "engine":
            pool = torch.randn(2, num_blocks, 2, block_size, num_kv_heads, head_dim, generator=gen)
            kv_layer = pool.to(dtype)[1]
        else:
            pool = torch.randn(num_blocks, block_size, 2, num_kv_heads, head_dim, generator=gen)
            kv_layer = pool.to(dtype).transpose(1, 2)
        perm = torch.randperm(num_blocks, generator=gen)
        tables = torch.full((batch, max_blocks), num_blocks + 1000, dtype=torch.int32)
        used = 0
        for b, seq_len in enumerate(seq_lens):
            n = math.ceil(seq_len / block_size)
            tables[b, :n] = perm[used : used + n]
            used += n
        starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        return PagedBatch(*(t.to(device) for t in (q, kv_layer, tables, starts, lens)))

    return make
