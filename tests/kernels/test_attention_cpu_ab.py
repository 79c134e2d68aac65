"""bench/attention_cpu_ab.py builds a revision's CPU attention kernel (with the fast-call header it
includes) in a scratch folder, runs it and writes its JSON: the kernel's A/B stays runnable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import cpu_build

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(cpu_build.compiler() is None, reason="no C++ compiler")
def test_the_ab_builds_and_runs_a_revision(tmp_path: Path) -> None:
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    out = tmp_path / "ab.json"
    cmd = [sys.executable, "-m", "bench.attention_cpu_ab", "HEAD", "--batch", "2", "--rounds", "1", "--layers", "1",
           "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["layers"] == 1 and record["rows"][0]["rev"] == "HEAD"
    assert record["rows"][0]["ms_per_layer_median"] > 0 and record["rows"][0]["same_answer_as_first"]
