"""The CPU KV pool is zeroed on transparent huge pages (engine.device.pool_zeros): the engine's pool, read
back from the kernel's own account of this process's memory (/proc/self/smaps_rollup)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.device import HUGE_PAGE
from engine.engine import Engine

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="no transparent huge pages here")


def anon_huge_bytes() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("smaps_rollup has no AnonHugePages line")


def test_the_engines_cpu_kv_pool_lies_on_huge_pages(tiny_model) -> None:
    before = anon_huge_bytes()
    # a pool of 32 MiB: at least 15 whole huge pages
    engine = Engine(EngineConfig(model=str(tiny_model("llama")), device="cpu", dtype="float32", num_kv_blocks=4096,
                                 block_size=16))  # fmt: skip
    kv = engine.runner.kv
    size = kv.numel() * kv.element_size()
    assert size >= 8 * HUGE_PAGE and torch.count_nonzero(kv) == 0
    # the kernel may refuse a few (memory too fragmented to compact), never most of them
    assert anon_huge_bytes() - before >= size // 2, (before, anon_huge_bytes(), size)
