"""bench/quant_gpu.py: without CUDA it exits 2, and its --smoke run (tiny shapes, CPU interpreter)
goes through every scheme's GEMM and quantized decoding and writes its JSON."""

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
    cmd = [sys.executable, "-m", "bench.quant_gpu", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's check of the script (Triton's "
                    "interpreter); on a GPU the benchmark itself runs")
def test_quant_bench_smoke_run_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "quant.json"
    done = bench("--smoke", "--rep", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    gemm = {(r["shape"], r["m"], r["scheme"]): r for r in result["gemm"]}
    for shape in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        for scheme in ("dense", "int8", "int4", "fp8"):
            assert (shape, 1, scheme) in gemm and (shape, 20, scheme) in gemm
    assert {r["kernel"] for r in result["gemm"] if r["scheme"] in ("int8", "int4")} == {"triton"}
    assert all(r["rel_err"] < 1e-5 for r in result["gemm"])  # float32 against the dequantize reference
    decode = {(r["scheme"], r["batch"]) for r in result["decode"]}
    assert decode == {(s, b) for s in ("dense", "int8", "int4", "fp8") for b in (1, 2)}
    bytes_ = {r["scheme"]: r["linear_weight_bytes"] for r in result["decode"]}
    assert bytes_["int4"] < bytes_["int8"] < bytes_["dense"]
    formats = {(r["shape"], r["layout"]) for r in result["formats"] if r["m"] == 1}
    assert len(formats) == 4 * 5 and all(r["rel_err"] < 1e-5 for r in result["formats"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_quant_bench_needs_cuda() -> None:
    done = bench()
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr
