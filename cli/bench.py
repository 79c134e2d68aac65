"""`tandem bench`: a serving benchmark against a running stack (or one it launches), with plots.

    tandem bench --addr HOST:PORT --model DIR                       Poisson, all at once, synthetic
    tandem bench --protocol http --http-url http://HOST:8000 ...    the OpenAI HTTP API instead
    tandem bench --launch --model DIR --request-rates 1,2,4 --baseline hf --out-dir OUT

Writes OUT/bench.json (config, machine, every run's summary, the baseline and the ratios),
OUT/latency_cdf.png and, when sweeping rates, OUT/rate_sweep.png. See cli/serving_bench/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _rates(value: str) -> list[float]:
    return [float(v) for v in value.split(",") if v.strip()]


def _workload(args: argparse.Namespace) -> list[Any]:
    from cli.serving_bench.workload import LengthSpec, from_jsonl, synthetic
    from engine.checkpoint import load_hf_config
    from engine.config import ModelConfig

    out_len = LengthSpec(args.output_len, args.len_sigma, args.max_output_len)
    if args.dataset != "synthetic":
        return from_jsonl(args.dataset, args.num_requests, out_len, seed=args.seed)
    cfg = ModelConfig.from_hf(load_hf_config(args.model)) if args.model else None
    vocab = args.vocab_size or (cfg.vocab_size if cfg else 0)
    if not vocab:
        raise ValueError("synthetic prompts need --model (or --vocab-size) to draw token ids")
    return synthetic(args.num_requests, LengthSpec(args.input_len, args.len_sigma, args.max_input_len), out_len,
                     vocab, seed=args.seed, max_model_len=cfg.max_position_embeddings if cfg else None)


async def _bench(args: argparse.Namespace, requests: list[Any], grpc_addr: str, http_url: str
                 ) -> list[Any]:
    from cli.serving_bench.clients import GrpcClient, HttpClient
    from cli.serving_bench.runner import LoadSpec, run_load

    loads = ([LoadSpec(concurrency=args.concurrency, max_duration_s=args.max_duration,
                       timeout_s=args.request_timeout)] if args.concurrency else
             [LoadSpec(rate=r, max_concurrency=args.max_concurrency, max_duration_s=args.max_duration,
                       timeout_s=args.request_timeout) for r in args.request_rates])
    protocols = ["grpc", "http"] if args.protocol == "both" else [args.protocol]
    runs = []
    for proto in protocols:
        client = (GrpcClient(grpc_addr, args.temperature) if proto == "grpc" else
                  HttpClient(http_url, args.temperature, args.served_model_name))
        try:
            for req in requests[: args.warmup]:  # connections, first-call allocations: not measured
                await client.send(req, args.request_timeout)
            for i, load in enumerate(loads):
                runs.append(await run_load(client, requests, load, seed=args.seed + i, progress=not args.no_progress))
        finally:
            await client.close()
    return runs


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every run completed requests, 1 when a run completed none, 2 for bad options."""
    try:
        return _run(args)
    except ValueError as exc:
        logger.error("bench: %s", exc)
        return 2


def _run(args: argparse.Namespace) -> int:
    from cli.serving_bench import report as rep
    from cli.serving_bench.metrics import Slo

    if args.replot:
        path = Path(args.replot)
        data = json.loads(path.read_text())
        data["plots"] = rep.draw(data, path.parent, _title(data["workload"]["model"], data["workload"]["num_requests"]))
        rep.write(data, path.parent)
        print(f"plots: {', '.join(data['plots'])}")
        return 0
    if args.model:  # a Hugging Face id or cache folder: its local snapshot (engine.hub)
        from engine.hub import resolve_model

        args.model = str(resolve_model(args.model).path)
    requests = _workload(args)
    out = Path(args.out_dir or f"bench/results/serving-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    stack = None
    grpc_addr, http_url = args.addr, args.http_url
    if args.launch:
        from cli.launcher import Stack

        if not args.model:
            raise ValueError("--launch needs --model")
        stack = Stack(args.model, prefill_workers=args.prefill_workers, decode_workers=args.decode_workers,
                      engine_args=shlex.split(args.engine_args), gateway_args=["--http-port", "0"],
                      workdir=out / "stack")
        stack.start(timeout_s=300)
        grpc_addr = stack.address
        http_url = f"http://{stack.gateway.info['http_address']}" if stack.gateway else http_url
        if args.served_model_name is None and stack.gateway is not None:
            args.served_model_name = stack.gateway.info.get("model_name")
    try:
        runs = asyncio.run(_bench(args, requests, grpc_addr, http_url))
    finally:
        if stack is not None:
            stack.stop()
    base_run = None
    if args.baseline == "hf":
        from cli.serving_bench.hf_baseline import run_hf

        if not args.model or args.model.endswith(".gguf"):
            raise ValueError("--baseline hf needs --model, a Hugging Face checkpoint directory")
        base_run = run_hf(args.model, requests, batch_size=args.hf_batch_size, device=args.hf_device,
                          dtype=args.hf_dtype, max_duration_s=args.max_duration, progress=not args.no_progress)
    workload = {"dataset": args.dataset, "num_requests": len(requests), "input_len_mean": args.input_len,
                "output_len_mean": args.output_len, "len_sigma": args.len_sigma, "seed": args.seed,
                "temperature": args.temperature, "model": args.model}
    report = rep.build(runs, base_run, Slo(args.slo_ttft_ms, args.slo_tpot_ms), ["tandem", *sys.argv[1:]],
                       workload)
    if not args.no_plots:
        report["plots"] = rep.draw(report, out, _title(args.model, len(requests)))
    path = rep.write(report, out)
    print(rep.table(report))
    print(f"results: {path}  plots: {', '.join(report['plots']) or 'none'}")
    return 0 if all(s["completed"] for s in report["runs"]) else 1


def _title(model: str | None, n: int) -> str:
    return f"{Path(model).name if model else 'tandem'}: {n} requests"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="serving benchmark against a running stack (gRPC or HTTP)")
    t = p.add_argument_group("target")
    t.add_argument("--addr", default="127.0.0.1:50051", help="the gateway's gRPC host:port")
    t.add_argument("--http-url", default="http://127.0.0.1:8000", help="the gateway's HTTP API base URL")
    t.add_argument("--protocol", choices=("grpc", "http", "both"), default="grpc",
                   help="which API to load: gRPC, the OpenAI HTTP API, or both in turn (default: grpc)")
    t.add_argument("--served-model-name", default=None, help="the `model` field of HTTP requests (default: none)")
    t.add_argument("--launch", action="store_true", help="start a local stack from --model for the run")
    t.add_argument("--prefill-workers", type=int, default=1, help="with --launch")
    t.add_argument("--decode-workers", type=int, default=1, help="with --launch")
    t.add_argument("--engine-args", default="--device auto", help="with --launch: the workers' engine flags")
    w = p.add_argument_group("workload")
    w.add_argument("--model", default=None, help="checkpoint dir or Hugging Face id: vocabulary for synthetic "
                   "prompts; the baseline")
    w.add_argument("--dataset", default="synthetic", help="'synthetic' or a JSONL file of prompts")
    w.add_argument("--num-requests", type=int, default=64, help="requests per run (default: 64)")
    w.add_argument("--input-len", type=int, default=128, help="mean prompt tokens (lognormal)")
    w.add_argument("--output-len", type=int, default=64, help="mean output tokens (lognormal)")
    w.add_argument("--len-sigma", type=float, default=0.5, help="log-space spread of both lengths (0: fixed)")
    w.add_argument("--max-input-len", type=int, default=4096, help="cap on drawn prompt lengths (default: 4096)")
    w.add_argument("--max-output-len", type=int, default=2048, help="cap on drawn output lengths (default: 2048)")
    w.add_argument("--vocab-size", type=int, default=None, help="synthetic token ids without --model")
    w.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    w.add_argument("--seed", type=int, default=0, help="seed of the workload and arrival times (default: 0)")
    ld = p.add_argument_group("load (every run ends by itself)")
    ld.add_argument("--request-rates", type=_rates, default=[math.inf], metavar="R1,R2,...",
                    help="Poisson request rates (req/s) to sweep; inf: all at once")
    ld.add_argument("--request-rate", dest="request_rates", type=lambda v: [float(v)], help="one rate")
    ld.add_argument("--concurrency", type=int, default=0, help="closed loop of N streams instead of a rate")
    ld.add_argument("--max-concurrency", type=int, default=0, help="cap on requests in flight (0: none)")
    ld.add_argument("--max-duration", type=float, default=600.0, help="seconds per run before it stops sending")
    ld.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request counts as failed")
    ld.add_argument("--warmup", type=int, default=2, help="unmeasured requests first")
    ld.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT at most this")
    ld.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: time per output token at most this")
    b = p.add_argument_group("baseline")
    b.add_argument("--baseline", choices=("none", "hf"), default="none", help="hf: the same workload on transformers")
    b.add_argument("--hf-batch-size", type=int, default=1, help="static batch size (1: sequential)")
    b.add_argument("--hf-device", default="cpu", help="device of the transformers baseline (default: cpu)")
    b.add_argument("--hf-dtype", default="float32", help="dtype of the transformers baseline (default: float32)")
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", default=None, help="default: bench/results/serving-<time>")
    o.add_argument("--no-plots", action="store_true", help="write bench.json only")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    o.add_argument("--replot", default=None, metavar="BENCH_JSON", help="only redraw the plots of a finished run")
    p.set_defaults(func=run)
