"""Both worker cores in one process, on real engines and a real KV channel (ZeroMQ on loopback):
the request path through them, a transfer that arrives before its registration, an engine that dies
under them, and an observer that raises."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from decode_worker.worker import DecodeCore, DecodeRequest
from engine.checkpoint import checkpoint_fingerprint
from engine.config import EngineConfig
from engine.engine import Engine
from engine.llm import LLM
from engine.outputs import EngineDied, RequestOutput
from engine.sampling.params import SamplingParams
from kvtransfer import KVLayout
from prefill_worker.observe import PrefillObserver
from prefill_worker.worker import PrefillCore, PrefillDone, PrefillRequest
from server.metrics import WorkerMetrics, new_registry
from server.tracing import disabled

PROMPT = list(range(3, 43))
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _engine(model: Path) -> Engine:
    return Engine(EngineConfig(model=str(model), device="cpu", dtype="float32", num_kv_blocks=64, block_size=8,
                               max_num_batched_tokens=64))


class Box:
    """What a request's callbacks deliver, in order."""

    def __init__(self) -> None:
        self.items: queue.Queue[object] = queue.Queue()

    def last(self, timeout: float = 20.0) -> object:
        while True:
            item = self.items.get(timeout=timeout)
            if not isinstance(item, RequestOutput) or item.finished:
                return item


class Broken(PrefillObserver):
    def transfer_begin(self, req: PrefillRequest) -> str:
        raise RuntimeError("a tracing bug")


@pytest.fixture
def cores(tiny_model, request) -> Iterator[tuple[PrefillCore, DecodeCore]]:
    model = tiny_model("llama")
    p_engine, d_engine = _engine(model), _engine(model)
    fingerprint = checkpoint_fingerprint(model)
    observer = Broken if getattr(request, "param", "") == "broken-observer" else PrefillObserver
    prefill = PrefillCore(p_engine, KVLayout.for_pool(p_engine.runner.kv, fingerprint), 3.0,
                          observer(disabled(), WorkerMetrics(new_registry(), "prefill")))
    decode = DecodeCore(d_engine, KVLayout.for_pool(d_engine.runner.kv, fingerprint), "tcp://127.0.0.1:0", 3.0,
                        fault=("raise", 8))
    prefill.start()
    decode.start()
    yield prefill, decode
    prefill.close()
    decode.close()


def _prefill(core: PrefillCore, rid: str, peer: str) -> Box:
    box = Box()
    seq = core.engine.make_sequence(rid, PROMPT, PARAMS)
    core.prefill(PrefillRequest(seq, emit=box.items.put, fail=box.items.put, peer=peer, done=box.items.put))
    return box


def _decode(core: DecodeCore, rid: str) -> Box:
    box = Box()
    seq = core.engine.make_sequence(rid, PROMPT, PARAMS)
    core.decode(DecodeRequest(seq, emit=box.items.put, fail=box.items.put))
    return box


def _free(core: PrefillCore | DecodeCore, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = core.loop.snapshot.stats
        if s["kv_blocks_free"] == s["kv_blocks_total"] and not core.loop.requests:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("cores", ["broken-observer"], indirect=True)
def test_a_request_whose_kv_arrives_first_then_an_engine_death(cores) -> None:
    prefill, decode = cores
    reference = LLM(prefill.engine.config.model, device="cpu", dtype="float32", num_kv_blocks=64, block_size=8)
    expected = reference.generate([PROMPT], PARAMS)[0].token_ids

    p_box = _prefill(prefill, "early", decode.receiver.address)  # its KV reaches D before D knows it
    time.sleep(0.5)
    assert p_box.items.empty(), "the transfer waits for the request's registration"
    d_box = _decode(decode, "early")
    done = p_box.last()
    assert isinstance(done, PrefillDone) and done.result.ok, done
    out = d_box.last()
    assert isinstance(out, RequestOutput) and out.seq is not None and out.seq.output_token_ids == expected
    assert prefill.loop.snapshot.observer_errors >= 1 and not prefill.loop.dead.is_set()  # the observer's bug
    assert _free(prefill) and _free(decode)

    # the decode engine dies at its 8th step (the first request took 5): the running request hears it, new KV is refused
    d_box = _decode(decode, "doomed")
    p_box = _prefill(prefill, "doomed", decode.receiver.address)
    assert isinstance(d_box.last(), EngineDied)
    assert decode.loop.dead.is_set() and "engine failed" in decode.health_error()
    late = _prefill(prefill, "late", decode.receiver.address)
    result = late.last()
    assert isinstance(result, PrefillDone) and not result.result.ok and "engine died" in (result.result.error or "")
    p_box.last()
    assert _free(prefill)


def test_a_crashed_kv_thread_makes_the_worker_unhealthy(cores, monkeypatch) -> None:
    """A bug that kills the receiver's I/O thread: its transfers fail and the worker reports it (its
    process then exits like one whose engine died: server.worker watches health_error)."""
    prefill, decode = cores
    assert decode.health_error() == ""

    def crash(sock: object) -> None:
        raise RuntimeError("a bug in the KV receiver")

    monkeypatch.setattr(decode.receiver, "_on_readable", crash)
    done = _prefill(prefill, "into-a-crash", decode.receiver.address).last()
    assert isinstance(done, PrefillDone) and not done.result.ok
    deadline = time.monotonic() + 5
    while "KV receiver failed" not in decode.health_error():
        assert time.monotonic() < deadline, decode.health_error()
        time.sleep(0.02)
    assert _free(prefill)



def test_a_transfer_no_decode_call_claims_is_refused_by_the_worker_naming_why(tiny_model) -> None:
    """The decode worker answers every transfer within its KV timeout with the precise reason (here
    UNKNOWN_REQUEST: no Decode call claimed it); the receiver's own NO_SPACE comes a second later, only
    as a backstop, so the two deadlines never race."""
    model = tiny_model("llama")
    p_engine, d_engine = _engine(model), _engine(model)
    fingerprint = checkpoint_fingerprint(model)
    prefill = PrefillCore(p_engine, KVLayout.for_pool(p_engine.runner.kv, fingerprint), 5.0,
                          PrefillObserver(disabled(), WorkerMetrics(new_registry(), "prefill")))
    decode = DecodeCore(d_engine, KVLayout.for_pool(d_engine.runner.kv, fingerprint), "tcp://127.0.0.1:0", 1.0)
    assert decode.receiver.reserve_timeout_s > decode.kv_timeout_s
    prefill.start()
    decode.start()
    try:
        for i in range(3):
            orphan = _prefill(prefill, f"orphan{i}", decode.receiver.address).last()
            assert isinstance(orphan, PrefillDone) and not orphan.result.ok
            assert f"no Decode call for request orphan{i}" in (orphan.result.error or ""), orphan.result.error
        assert _free(prefill) and _free(decode)
    finally:
        prefill.close()
        decode.close()
