"""`tandem bench` against a real local stack, over gRPC and HTTP, with the transformers baseline.

Small on purpose (6 requests per run): it checks that the command runs end to end and writes what it
promises (the JSON report, the latency CDFs, the rate sweep), not how fast anything is. The command
runs in this process (`cli.main.main`, the `tandem` entry point), which already has torch and
transformers imported: a subprocess would spend ~10 s of this 2-core box importing them again.
"""

from __future__ import annotations

import json

from cli.main import main
from tests.e2e.conftest import wait_all_blocks_free

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N = 6


def test_bench_writes_json_and_plots_for_grpc_http_and_the_hf_baseline(make_stack, stack_model, tmp_path,
                                                                       capsys) -> None:
    stack = make_stack(stack_model, gateway_args=["--http-port", "0", "--local-prefill-threshold", "0"])
    out = tmp_path / "bench"
    argv = ["bench", "--addr", stack.address,
            "--http-url", f"http://{stack.gateway.info['http_address']}", "--protocol", "both",
            "--model", str(stack_model), "--num-requests", str(N), "--input-len", "24", "--output-len", "8",
            "--request-rates", "10,40", "--max-duration", "60", "--warmup", "1",
            "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--baseline", "hf", "--out-dir", str(out)]
    assert main(argv) == 0
    assert "tandem vs baseline" in capsys.readouterr().out

    report = json.loads((out / "bench.json").read_text())
    assert {"date", "machine", "command", "workload", "runs", "baseline", "ratios", "plots"} <= set(report)
    runs = report["runs"]
    assert [(r["backend"], r["request_rate"]) for r in runs] == [
        ("tandem-grpc", 10.0), ("tandem-grpc", 40.0), ("tandem-http", 10.0), ("tandem-http", 40.0)]
    base = report["baseline"]
    for r in [*runs, base]:
        assert (r["completed"], r["failed"], r["not_sent"]) == (N, 0, 0), (r["backend"], r["request_rate"],
                                                                           r.get("errors"))
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            d = r[key]
            assert 0 < d["p50"] <= d["p90"] <= d["p99"], (r["backend"], key, d)
        assert r["output_throughput"] > 0 and r["request_throughput"] > 0
        assert r["goodput"]["fraction"] == 1.0  # SLOs of a minute: everything is good
    # the same workload everywhere: exact output lengths (ignore_eos), the same prompts
    assert len({(r["prompt_tokens"], r["output_tokens"]) for r in [*runs, base]}) == 1
    assert len(report["ratios"]) == len(runs) and report["ratios"][0]["output_throughput_x"] > 0
    # raw, for --replot (inter-token gaps are per chunk received: a loaded box coalesces a tiny model's tokens)
    assert len(base["latencies_s"]["e2e"]) == N and len(runs[0]["latencies_s"]["itl"]) >= 1

    assert set(report["plots"]) == {"latency_cdf.png", "rate_sweep.png", "rate_sweep_http.png"}
    for name in report["plots"]:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        (out / name).unlink()
    assert main(["bench", "--replot", str(out / "bench.json")]) == 0  # redrawn from the JSON alone
    assert all((out / name).read_bytes().startswith(PNG_MAGIC) for name in report["plots"])
    wait_all_blocks_free(stack)


def _run_summary(completed: int, failed: int, errors: list[dict]) -> dict:
    d = {"mean": 10.0, "p50": 9.0, "p90": 12.0, "p99": 15.0}
    return {"backend": "tandem-grpc", "label": "tandem-grpc, rate inf", "request_rate": float("inf"),
            "concurrency": None, "completed": completed, "failed": failed, "not_sent": 0, "duration_s": 2.0,
            "prompt_tokens": 100, "output_tokens": 50, "request_throughput": 1.0, "output_throughput": 25.0,
            "total_token_throughput": 75.0, "ttft_ms": d, "tpot_ms": d, "itl_ms": d, "e2e_ms": d,
            "goodput": {"slo_ttft_ms": None, "slo_tpot_ms": None, "requests_per_s": 1.0, "fraction": 1.0},
            "errors": errors}


def test_the_summary_says_why_requests_failed_and_warns_on_small_samples() -> None:
    from cli.serving_bench.report import table

    errors = [{"error": "UNAVAILABLE: worker decode-0 failed: the sender disconnected", "count": 2}]
    text = table({"runs": [_run_summary(0, 2, errors)], "baseline": None, "ratios": None})
    assert "Successful requests:" in text and "Failed requests:" in text and "Median TTFT (ms):" in text
    assert "2 x UNAVAILABLE: worker decode-0 failed: the sender disconnected" in text
    assert "warning: tandem-grpc (rate inf): 2 of 2 requests failed" in text
    assert "only 0 completed requests" in text
    text = table({"runs": [_run_summary(200, 0, [])], "baseline": None, "ratios": None})
    assert "warning" not in text


def test_latency_cdfs_label_their_time_axes(tmp_path) -> None:
    """Narrow ranges (30-45 ms) and wide ones (1-5000 ms) both get several labelled ticks."""
    import numpy as np
    from matplotlib.figure import Figure

    from cli.serving_bench.plots import _time_axis, latency_cdfs

    for lo, hi in ((30.0, 45.0), (1.0, 5000.0)):
        fig = Figure()
        ax = fig.subplots()
        ms = np.linspace(lo, hi, 50)
        _time_axis(ax, [ms])
        ax.set_xlim(lo, hi)
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]
        assert len(labels) >= 3, (lo, hi, labels)
    s = [v / 1e3 for v in np.linspace(30, 45, 20)]
    path = latency_cdfs([("tandem", {"ttft": s, "tpot": s, "itl": s, "e2e": [x * 100 for x in s]})],
                        tmp_path / "cdf.png", "narrow")
    assert path.read_bytes().startswith(PNG_MAGIC)
