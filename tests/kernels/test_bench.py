"""bench/kernel_speed.py: importable, its arguments parse, it refuses to run without CUDA, and its
--smoke run (tiny shapes, CPU interpreter) goes through every case and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "bench.kernel_speed", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's check of the script (Triton's "
                    "interpreter); on a GPU the benchmark itself runs")
def test_bench_smoke_run_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    done = bench("--smoke", "--rep", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    names = {(r["kernel"], r["backend"]) for r in rows}
    for kernel in ("rms_norm", "rotary", "silu_and_mul", "store_kv", "paged_decode", "paged_extend"):
        assert {(kernel, "triton"), (kernel, "torch")} <= names
    assert all(r["rel_err"] < 1e-5 for r in rows)  # float32 smoke shapes


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_bench_needs_cuda() -> None:
    done = bench()
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr
