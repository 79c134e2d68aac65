"""bench/overhead.py end to end on a tiny batch: each size and mode runs `--repeats` times and the row
it keeps is the median run's, with every run's ms/step beside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_repeats_keep_the_median_run(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    subprocess.run([sys.executable, "-m", "bench.overhead", "--batch-sizes", "4", "--modes", "serial", "--warmup",
                    "2", "--steps", "3", "--repeats", "3", "--profile", "", "--out", str(out)],
                   check=True, capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    record = json.loads(out.read_text())
    assert record["repeats"] == 3 and len(record["rows"]) == 1
    row = record["rows"][0]
    runs = row["runs_ms_per_step"]
    assert len(runs) == 3 and row["ms_per_step"] == sorted(runs)[1]
    assert row["batch"] == 4 and row["tokens_per_s"] > 0
