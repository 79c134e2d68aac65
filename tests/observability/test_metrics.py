"""Every component serves Prometheus /metrics that promtool accepts; after traffic the histograms are
filled, the KV gauges add up, HTTP refusals and cancellations are counted."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli.launcher import Stack
from tandem.v1 import generation_pb2 as gen
from tests.e2e.conftest import generate, stub, wait_all_blocks_free
from tests.hf_reference import random_prompts
from tests.observability.conftest import start_stack

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def metered_stack(tiny_model, tmp_path_factory) -> Iterator[tuple[Stack, dict[str, int]]]:
    stack, ports = start_stack(tiny_model("llama", max_position_embeddings=1024), tmp_path_factory.mktemp("metered"))
    yield stack, ports
    stack.stop()


def scrape_text(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        return r.read().decode()


def scrape(port: int | str) -> Samples:
    text = scrape_text(port if isinstance(port, str) else f"127.0.0.1:{port}")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the series whose labels include `labels`."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
    assert found, f"no series {name}{labels}"
    return sum(found)


def test_metrics_after_traffic(metered_stack: tuple[Stack, dict[str, int]]) -> None:
    stack, ports = metered_stack
    s = stub(stack)
    base = random_prompts(512, [48], seed=21)[0]
    for tail in ([1, 2, 3], [4, 5]):  # the second one hits the prefill worker's prefix cache
        generate(s, base + tail, temperature=0.0, max_tokens=12, ignore_eos=True)
    with pytest.raises(grpc.RpcError):
        list(s.Generate(gen.GenerateRequest(prompt="hi", prompt_token_ids=[1]), timeout=10))
    wait_all_blocks_free(stack)

    g = scrape(ports["gateway"])
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert value(g, f"tandem_gateway_{hist}_count") > 0, hist
    assert value(g, "tandem_gateway_time_to_first_token_seconds_count") == 2
    assert value(g, "tandem_gateway_inter_token_latency_seconds_count") == 2 * 11
    assert value(g, "tandem_gateway_requests_total", code="OK") == 2
    assert value(g, "tandem_gateway_requests_total", code="INVALID_ARGUMENT") == 1
    assert value(g, "tandem_gateway_requests_finished_total", finish_reason="length") == 2
    assert value(g, "tandem_gateway_generation_tokens_total") == 24
    assert value(g, "tandem_gateway_requests_inflight") == 0
    assert value(g, "tandem_gateway_route_prefix_hit_tokens_total") == 48
    assert value(g, "tandem_gateway_request_prompt_tokens_count") == 2
    assert value(g, "tandem_gateway_request_prompt_tokens_sum") == 51 + 50
    assert value(g, "tandem_gateway_request_generation_tokens_sum") == 24
    assert value(g, "tandem_info", role="gateway") == 1

    for role, direction in (("prefill", "send"), ("decode", "receive")):
        m = scrape(ports[role])
        assert value(m, "tandem_kv_transfer_bytes_count", role=role, direction=direction) == 2
        assert value(m, "tandem_kv_transfer_bytes_sum", role=role, direction=direction) > 0
        assert value(m, "tandem_kv_transfer_seconds_count", role=role, direction=direction) == 2
        assert value(m, "tandem_kv_transfers_total", role=role, direction=direction, result="OK") == 2
        assert value(m, "tandem_request_queue_time_seconds_count", role=role) == 2
        assert value(m, "tandem_engine_step_seconds_count", role=role) > 0
        assert value(m, "tandem_engine_iteration_tokens_count", role=role) == value(
            m, "tandem_engine_step_seconds_count", role=role)
        total, free, used = (value(m, f"tandem_engine_kv_blocks_{k}", role=role) for k in ("capacity", "free", "used"))
        assert total == 256 and used + free == total and used == 0
        assert value(m, "tandem_engine_kv_cache_usage_ratio", role=role) == 0
        assert value(m, "tandem_info", role=role, version="0.1.0") == 1
        assert value(m, "tandem_engine_running_sequences", role=role) == 0
        assert value(m, "tandem_engine_waiting_sequences", role=role) == 0
        assert 0 <= value(m, "tandem_engine_prefix_cache_hit_rate", role=role) <= 1
        assert value(m, "tandem_spec_acceptance_rate", role=role) == 0  # no speculation here
        assert "process_cpu_seconds_total" in {n for n, _ in m}
        assert value(m, "python_gc_collections_total", generation="2") >= 1  # freeze_startup_heap's
    for samples in (g, scrape(ports["prefill"]), scrape(ports["decode"])):  # each froze its startup heap
        assert value(samples, "tandem_gc_frozen_objects") > 50_000
    p = scrape(ports["prefill"])
    assert value(p, "tandem_request_prefill_time_seconds_count", role="prefill") == 2
    assert value(p, "tandem_engine_iteration_tokens_sum", role="prefill") == 51 + 50 - 48  # the hit is not computed
    d = scrape(ports["decode"])
    assert value(d, "tandem_request_decode_time_seconds_count", role="decode") == 2
    assert value(d, "tandem_request_prefill_time_seconds_count", role="decode") == 0  # no local prefill here
    for samples in (g, p, d):  # every series of ours says which model
        assert all(dict(ls).get("model_name") == Path(stack.model).name for n, ls in samples if n.startswith("tandem_"))
        assert not any(n.endswith("_created") for n, _ in samples)
    # 51- and 50-token prompts: all but the last token of each looked up; 48 found the second time
    assert value(p, "tandem_engine_prefix_cache_hit_tokens_total", role="prefill") == 48
    assert value(p, "tandem_engine_prefix_cache_hit_rate", role="prefill") == pytest.approx(48 / (50 + 49))
    assert value(p, "tandem_prefill_requests_inflight", role="prefill") == 0
    assert value(scrape(ports["decode"]), "tandem_decode_kv_pending", role="decode") == 0


def test_promtool_accepts_every_component(metered_stack: tuple[Stack, dict[str, int]]) -> None:
    """`promtool check metrics` (Prometheus's own linter) on each process's real /metrics, and on the
    gateway's HTTP port, which serves the same registry."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    stack, ports = metered_stack
    generate(stub(stack), [5, 6, 7, 8, 9], temperature=0.0, max_tokens=3)
    addresses = {role: f"127.0.0.1:{port}" for role, port in ports.items()}
    addresses["gateway-http"] = stack.gateway.info["http_address"]
    for role, address in addresses.items():
        text = scrape_text(address)
        assert "tandem_" in text, role
        out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (
            f"{role}: {out.stdout}{out.stderr}")
    http_names = {n for n, _ in scrape(addresses["gateway-http"])}
    assert "tandem_gateway_requests_total" in http_names and "tandem_info" in http_names


def _http(address: str, path: str, body: bytes) -> int:
    req = urllib.request.Request(f"http://{address}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_http_refusals_and_cancellations_are_counted(metered_stack: tuple[Stack, dict[str, int]]) -> None:
    stack, ports = metered_stack
    http = stack.gateway.info["http_address"]
    before = scrape(ports["gateway"])

    def total(samples: Samples, name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))

    def delta(name: str, **labels: str) -> float:
        return total(scrape(ports["gateway"]), name, **labels) - total(before, name, **labels)

    assert _http(http, "/v1/completions", b"{not json") == 400  # refused while parsing: never reaches Generate
    body = {"model": Path(stack.model).name, "prompt": [5, 6, 7], "max_tokens": 2}
    assert _http(http, "/v1/completions", json.dumps(body).encode()) == 200
    assert delta("tandem_gateway_http_requests_total", route="/v1/completions", status="400") == 1
    assert delta("tandem_gateway_http_requests_total", route="/v1/completions", status="200") == 1
    # a client that gives up mid-stream: CANCELLED, and its request finished as an abort
    call = stub(stack).Generate(gen.GenerateRequest(prompt_token_ids=[5, 6, 7], sampling=gen.SamplingParams(
        temperature=0.0, max_tokens=200, ignore_eos=True)), timeout=60)
    next(call)
    call.cancel()
    deadline = time.monotonic() + 10
    while delta("tandem_gateway_requests_total", code="CANCELLED") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert delta("tandem_gateway_requests_total", code="CANCELLED") == 1
    assert delta("tandem_gateway_requests_finished_total", finish_reason="abort") == 1
    wait_all_blocks_free(stack)


def test_the_dashboard_and_rules_query_series_that_exist(metered_stack: tuple[Stack, dict[str, int]]) -> None:
    """Every tandem_* name in the Grafana dashboard and the Prometheus rules is served by some process."""
    import re
    from pathlib import Path

    stack, ports = metered_stack
    generate(stub(stack), [5, 6, 7, 8, 9], temperature=0.0, max_tokens=3)
    _http(stack.gateway.info["http_address"], "/v1/completions", b"{")
    served = {n for port in ports.values() for n, _ in scrape(port)}
    root = Path(__file__).resolve().parents[2]
    for path in (root / "deploy/grafana/dashboards/tandem.json", root / "deploy/prometheus/rules.yml"):
        names = set(re.findall(r"\b(tandem_[a-z0-9_]+)", path.read_text()))
        assert names, path
        missing = sorted(n for n in names if not {n, f"{n}_bucket", f"{n}_total"} & served)  # a family's name too
        assert not missing, f"{path.name} queries series no process serves: {missing}"
