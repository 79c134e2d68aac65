"""Every component serves Prometheus /metrics; after traffic the histograms are filled and the KV gauges add up."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

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


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
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

    for role, direction in (("prefill", "send"), ("decode", "receive")):
        m = scrape(ports[role])
        assert value(m, "tandem_kv_transfer_bytes_count", role=role, direction=direction) == 2
        assert value(m, "tandem_kv_transfer_bytes_sum", role=role, direction=direction) > 0
        assert value(m, "tandem_kv_transfer_seconds_count", role=role, direction=direction) == 2
        assert value(m, "tandem_kv_transfers_total", role=role, direction=direction, result="OK") == 2
        assert value(m, "tandem_queue_wait_seconds_count", role=role) == 2
        assert value(m, "tandem_engine_step_seconds_count", role=role) > 0
        total, free, used = (value(m, f"tandem_engine_kv_blocks_{k}", role=role) for k in ("total", "free", "used"))
        assert total == 256 and used + free == total and used == 0
        assert value(m, "tandem_engine_running_sequences", role=role) == 0
        assert value(m, "tandem_engine_waiting_sequences", role=role) == 0
        assert 0 <= value(m, "tandem_engine_prefix_cache_hit_rate", role=role) <= 1
        assert value(m, "tandem_spec_acceptance_rate", role=role) == 0  # no speculation here
        assert "process_cpu_seconds_total" in {n for n, _ in m}
    p = scrape(ports["prefill"])
    # 51- and 50-token prompts: all but the last token of each looked up; 48 found the second time
    assert value(p, "tandem_engine_prefix_cache_hit_tokens_total", role="prefill") == 48
    assert value(p, "tandem_engine_prefix_cache_hit_rate", role="prefill") == pytest.approx(48 / (50 + 49))
    assert value(p, "tandem_prefill_requests_inflight", role="prefill") == 0
    assert value(scrape(ports["decode"]), "tandem_decode_kv_pending", role="decode") == 0
