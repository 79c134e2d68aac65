"""`tandem bench`: a serving benchmark against a running Tandem stack (gRPC or the HTTP API).

    workload.py     the requests: synthetic lognormal lengths, or a JSONL file; arrival times
    clients.py      one request over gRPC or HTTP, timed token by token -> RequestResult
    runner.py       a load (Poisson rate or fixed concurrency) with a progress bar, bounded in time
    metrics.py      TTFT / TPOT / ITL / E2E percentiles, throughput, goodput under SLOs
    hf_baseline.py  the same workload through transformers `generate` on this machine
    plots.py        latency CDFs and the rate sweep as PNGs
"""
