"""KVSender <-> KVReceiver over real ZeroMQ sockets (tcp and ipc loopback) in one process: handshake,
reservation, credit, streaming order, aborts, timeouts. Every test checks that each reservation
ended in exactly one release or completion."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq

from kvtransfer import PROTOCOL_VERSION, KVLayout, KVReceiver, KVSender, TransferCode, wire
from tests.kvtransfer.kvpeers import SHAPE, SRC_IDS, Allocator, layout_of, make_pool

T = 1.0  # timeout_s of these tests: short, yet far above scheduling hiccups on a loaded 2-core box
TOKENS = len(SRC_IDS) * SHAPE["block_size"]


@pytest.fixture(params=["tcp", "ipc"])
def bind(request: pytest.FixtureRequest, ipc_dir: Path) -> str:
    return "tcp://127.0.0.1:0" if request.param == "tcp" else f"ipc://{ipc_dir}/{request.node.name[-40:]}"


@pytest.fixture
def src() -> torch.Tensor:
    return make_pool("float16", seed=11)


@pytest.fixture
def pair(src: torch.Tensor, bind: str) -> Iterator[tuple[KVSender, KVReceiver, Allocator, torch.Tensor]]:
    dst = make_pool("float16", None)
    alloc = Allocator(dst.shape[1])
    receiver = alloc.receiver(dst, bind, timeout_s=T)
    sender = KVSender(src, layout_of(src), timeout_s=T)
    yield sender, receiver, alloc, dst
    sender.close()
    receiver.close()
    assert alloc.balanced()


def test_transfer_streams_layers_only_once_ready(pair: tuple, src: torch.Tensor) -> None:
    sender, receiver, alloc, dst = pair
    handle = sender.begin("r", receiver.address, SRC_IDS, TOKENS)
    handle.layer_ready(1)  # out of order on purpose
    alloc.wait(lambda a: a.reservations == 1)
    ids = alloc.reserved["r"]
    deadline = time.monotonic() + 5
    while not torch.equal(dst[1, ids], src[1, SRC_IDS]):
        assert time.monotonic() < deadline, "layer 1 never arrived"
        time.sleep(0.01)
    time.sleep(0.1)
    assert not dst[0, ids].any() and not dst[2, ids].any(), "a layer was sent before it was ready"
    src[0, SRC_IDS] += 1  # the engine still writes layer 0: what arrives must be the final values
    handle.layer_ready(0)
    handle.layer_ready(2)
    result = handle.result(timeout=5)
    assert result.ok and result.num_blocks == len(SRC_IDS)
    assert torch.equal(dst[:, alloc.completed["r"].block_ids], src[:, SRC_IDS])


def test_finish_ships_the_last_layer_with_a_late_meta(pair: tuple, src: torch.Tensor) -> None:
    sender, receiver, alloc, dst = pair
    num_layers = src.shape[0]
    handle = sender.begin("late", receiver.address, SRC_IDS, TOKENS, meta=b"early")
    for layer in range(num_layers - 1):
        handle.layer_ready(layer)
    time.sleep(0.2)
    assert "late" not in alloc.completed, "completed before the last layer was given"
    src[num_layers - 1, SRC_IDS] += 3  # the last layer is still being written until finish()
    handle.finish(b"first-token=42")
    assert handle.result(timeout=5).ok
    done = alloc.completed["late"]
    assert done.meta == b"first-token=42"
    assert torch.equal(dst[:, done.block_ids], src[:, SRC_IDS])


def test_layout_mismatch_is_refused_naming_each_field(bind: str) -> None:
    dst = make_pool("bfloat16", None, block_size=32)
    alloc = Allocator(dst.shape[1])
    receiver = alloc.receiver(dst, bind, timeout_s=T)
    src = make_pool("float16", seed=1)
    sender = KVSender(src, layout_of(src, "other-model"), timeout_s=T)
    try:
        result = sender.begin("m", receiver.address, [0, 1], 20).result(timeout=5)
    finally:
        sender.close()
        receiver.close()
    assert result.code is TransferCode.MISMATCH and not result.ok
    for text in ("block_size: sender 16, receiver 32", "dtype: sender float16, receiver bfloat16",
                 "model_fingerprint: sender other-model, receiver tiny-llama@1"):
        assert text in (result.error or "")
    assert alloc.reservations == 0 and alloc.failed[0].code is TransferCode.MISMATCH


def test_protocol_version_mismatch_is_refused(pair: tuple, src: torch.Tensor) -> None:
    _, receiver, alloc, _ = pair
    future = KVLayout(**{**layout_of(src).__dict__, "protocol_version": 2})
    sender = KVSender(src, future, timeout_s=T)
    try:
        result = sender.begin("v", receiver.address, [3], 16).result(timeout=5)
    finally:
        sender.close()
    assert result.code is TransferCode.MISMATCH and "protocol_version: sender 2, receiver 1" in (result.error or "")


def test_peer_speaking_another_wire_version_is_refused(pair: tuple, src: torch.Tensor) -> None:
    _, receiver, alloc, _ = pair
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)  # a future sender, as raw bytes on the wire
    try:
        peer.connect(receiver.address)
        begin = wire.Begin(request_id="f", layout=layout_of(src).to_proto(), num_tokens=16, num_blocks=1)
        peer.send(wire.encode(begin, version=PROTOCOL_VERSION + 1))
        assert peer.poll(5000), "no answer"
        env = wire.decode(peer.recv())
    finally:
        peer.close(0)
        ctx.term()
    assert env.kind == "reject" and env.body.code == TransferCode.MISMATCH
    assert f"protocol_version: sender {PROTOCOL_VERSION + 1}, receiver {PROTOCOL_VERSION}" in env.body.message
    assert alloc.reservations == 0


def test_no_space_is_refused_within_the_timeout(pair: tuple) -> None:
    sender, receiver, alloc, _ = pair
    alloc.free = alloc.free[: len(SRC_IDS) - 1]  # one block short
    alloc.num_blocks = len(alloc.free)
    start = time.monotonic()
    result = sender.begin("big", receiver.address, SRC_IDS, TOKENS).result(timeout=T + 3)
    assert T <= time.monotonic() - start < T + 1.0
    assert result.code is TransferCode.NO_SPACE and "no space" in (result.error or "")
    assert alloc.reservations == 0 and [f.code for f in alloc.failed] == [TransferCode.NO_SPACE]


def test_waits_for_space_then_completes(pair: tuple) -> None:
    sender, receiver, alloc, _ = pair
    with alloc.lock:
        hoard, alloc.free = alloc.free, []
    handle = sender.begin("patient", receiver.address, SRC_IDS, TOKENS)
    handle.all_ready()
    time.sleep(T / 2)  # past the sender's heartbeat interval: waiting is not silence
    alloc.add_free(hoard)
    assert handle.result(timeout=5).ok


def test_abort_from_sender_releases_on_receiver(pair: tuple) -> None:
    sender, receiver, alloc, _ = pair
    handle = sender.begin("a", receiver.address, SRC_IDS, TOKENS)
    handle.layer_ready(0)
    alloc.wait(lambda a: a.reservations == 1)
    handle.abort("client went away")
    result = handle.result(timeout=5)
    assert result.code is TransferCode.ABORTED and "client went away" in (result.error or "")
    alloc.wait(lambda a: a.released == ["a"])
    assert alloc.failed[0].code is TransferCode.ABORTED and "client went away" in alloc.failed[0].message


def test_abort_from_receiver_fails_sender_and_refuses_a_late_begin(pair: tuple) -> None:
    sender, receiver, alloc, _ = pair
    handle = sender.begin("b", receiver.address, SRC_IDS, TOKENS)
    alloc.wait(lambda a: a.reservations == 1)
    receiver.abort("b", "client cancelled")
    result = handle.result(timeout=5)
    assert result.code is TransferCode.ABORTED and "client cancelled" in (result.error or "")
    assert alloc.released == ["b"] and not alloc.failed  # its own abort is not reported back
    receiver.abort("c")  # before its transfer began
    late = sender.begin("c", receiver.address, [1], 3).result(timeout=5)
    assert late.code is TransferCode.ABORTED and alloc.reservations == 1


def test_a_grant_after_the_transfer_ended_goes_straight_back(pair: tuple) -> None:
    sender, receiver, alloc, _ = pair
    with alloc.lock:
        hoard, alloc.free = alloc.free, []
    result = sender.begin("late", receiver.address, SRC_IDS, TOKENS).result(timeout=T + 3)
    assert result.code is TransferCode.NO_SPACE
    alloc.add_free(hoard)  # the waiting want (dropped by on_failed) is not granted
    ids = alloc.reserve("late", len(SRC_IDS))
    assert ids is not None
    receiver.grant("late", ids)  # a grant that raced the timeout comes straight back
    alloc.wait(lambda a: a.released == ["late"])
    assert alloc.balanced()


def test_refuse_all_fails_live_transfers_and_new_ones(pair: tuple) -> None:
    sender, receiver, alloc, _ = pair
    handle = sender.begin("live", receiver.address, SRC_IDS, TOKENS)
    alloc.wait(lambda a: a.reservations == 1)
    receiver.refuse_all("the decode worker is shutting down")
    assert handle.result(timeout=5).code is TransferCode.CLOSED
    late = sender.begin("new", receiver.address, [1], 3).result(timeout=5)
    assert late.code is TransferCode.CLOSED and "shutting down" in (late.error or "")
    alloc.wait(lambda a: a.released == ["live"])


def test_engine_that_never_makes_a_layer_ready_times_out(pair: tuple) -> None:
    sender, receiver, alloc, _ = pair
    handle = sender.begin("stuck", receiver.address, SRC_IDS, TOKENS)
    result = handle.result(timeout=T + 3)
    assert result.code is TransferCode.TIMEOUT and "no layer ready" in (result.error or "")
    alloc.wait(lambda a: a.released == ["stuck"])


def test_receiver_that_never_answers_times_out_naming_it(src: torch.Tensor, ipc_dir: Path) -> None:
    sender = KVSender(src, layout_of(src), timeout_s=T)
    nobody = f"ipc://{ipc_dir}/nobody"
    try:
        start = time.monotonic()
        result = sender.begin("lost", nobody, SRC_IDS, TOKENS).result(timeout=T + 3)
        assert time.monotonic() - start < T + 1.0
    finally:
        sender.close()
    assert result.code is TransferCode.TIMEOUT and nobody in (result.error or "")


def test_many_concurrent_transfers_with_a_small_window(src: torch.Tensor, bind: str) -> None:
    dst = make_pool("float16", None, num_blocks=512)
    alloc = Allocator(dst.shape[1])
    page = layout_of(src).page_bytes
    receiver = alloc.receiver(dst, bind, timeout_s=5.0, max_inflight_bytes=4 * page)
    senders = [KVSender(src, layout_of(src), timeout_s=5.0, max_inflight_bytes=16 * page) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    jobs = {f"c{i}": torch.randperm(src.shape[1], generator=gen)[: 1 + i % 9].tolist() for i in range(24)}
    try:
        handles = [senders[i % 2].begin(rid, receiver.address, ids, len(ids) * 16) for i, (rid, ids) in enumerate(jobs.items())]
        for h in handles:
            threading.Thread(target=h.all_ready).start()
        results = {h.request_id: h.result(timeout=20) for h in handles}
        peaks = [s.stats()["inflight_peak_bytes"] for s in senders]
    finally:
        for s in senders:
            s.close()
        receiver.close()
    assert all(r.ok for r in results.values()), [r.error for r in results.values() if not r.ok]
    for rid, ids in jobs.items():
        assert torch.equal(dst[:, alloc.completed[rid].block_ids], src[:, ids]), rid
    assert all(0 < p <= 16 * page for p in peaks), peaks  # credit bounded what was in flight
    assert alloc.balanced()


def test_begin_rejects_misuse(pair: tuple) -> None:
    sender, receiver, _, _ = pair
    with pytest.raises(ValueError, match="block_ids"):
        sender.begin("x", receiver.address, [0, 10_000], 20)
    with pytest.raises(ValueError, match="cannot hold"):
        sender.begin("x", receiver.address, [0, 1], 40)
    with pytest.raises(ValueError, match="tcp:// or ipc://"):
        sender.begin("x", "localhost:5555", [0], 1)
    handle = sender.begin("x", receiver.address, [0], 1)
    with pytest.raises(ValueError, match="already live"):
        sender.begin("x", receiver.address, [1], 1)
    with pytest.raises(ValueError, match="layer"):
        handle.layer_ready(SHAPE["num_layers"])
    handle.all_ready()
    assert handle.result(timeout=5).ok


def test_close_ends_live_transfers_on_both_sides(pair: tuple) -> None:
    sender, receiver, alloc, _ = pair
    handle = sender.begin("z", receiver.address, SRC_IDS, TOKENS)
    alloc.wait(lambda a: a.reservations == 1)
    receiver.close()
    assert alloc.released == ["z"]
    sender.close()
    assert handle.result(timeout=1).code in (TransferCode.CLOSED, TransferCode.TIMEOUT)
    with pytest.raises(RuntimeError, match="closed"):
        sender.begin("after", receiver.address, [0], 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pools_transfer_byte_exact(bind: str) -> None:
    src = make_pool("bfloat16", seed=4).cuda()
    dst = make_pool("bfloat16", None).cuda()
    alloc = Allocator(dst.shape[1], free=list(range(100, 128)) + list(range(0, 100, 3)))
    receiver = alloc.receiver(dst, bind, timeout_s=5.0)
    sender = KVSender(src, layout_of(src), timeout_s=5.0)
    try:
        handle = sender.begin("g", receiver.address, SRC_IDS, TOKENS)
        handle.all_ready()
        assert handle.result(timeout=10).ok
    finally:
        sender.close()
        receiver.close()
    assert torch.equal(dst[:, alloc.completed["g"].block_ids], src[:, SRC_IDS])
