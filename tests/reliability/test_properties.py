"""Property tests: no input makes request validation or the KV-transfer header parser crash with anything
but the errors they promise, or allocate without bound.

Request side: random SamplingParams protos and GenerateRequests through `sampling_from_proto` and
`gateway.validation` (ValueError / TandemError only; what passes round-trips), and random bytes through
the gRPC request parser (always a message or an explanation). KV side: random bytes and random
well-formed KVMessages through `wire.decode`, `refuse_begin` and `Inbound.check_layer`; and a live
KVReceiver fed random multipart messages stays up, never reserves more blocks than its pool, and ends
with every reservation released. Example counts are modest: this runs on a busy 2-core box.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.validation import (
    PromptLimits,
    check_generate_wire,
    check_length,
    check_prompt_ids,
    check_request,
)
from kvtransfer import KVReceiver, wire
from kvtransfer.inbound import Inbound, refuse_begin
from server.errors import TandemError
from server.grpc_server import _lenient
from server.protoconv import sampling_from_proto, sampling_to_proto
from server.wirecheck import bad_utf8_field
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import kv_pb2
from tests.kvtransfer.kvpeers import Allocator, layout_of, make_pool

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U32, U64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
ENUM = st.integers(-(2**31), 2**31 - 1)  # protobuf enums are int32; unknown values included
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def sampling_protos(draw: st.DrawFn) -> gen.SamplingParams:
    p = gen.SamplingParams(max_tokens=draw(st.one_of(st.just(0), U32)), min_tokens=draw(st.one_of(st.just(0), U32)),
                           ignore_eos=draw(st.booleans()))
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if draw(st.booleans()):
            setattr(p, name, draw(FLOATS))
    for name, values in (("top_k", U32), ("seed", U64), ("logprobs", U32), ("skip_special_tokens", st.booleans())):
        if draw(st.booleans()):
            setattr(p, name, draw(values))
    p.stop.extend(draw(st.lists(st.text(max_size=300), max_size=20)))
    p.stop_token_ids.extend(draw(st.lists(U32, max_size=40)))
    return p


@FAST
@given(sampling_protos())
def test_sampling_conversion_raises_only_value_error_and_round_trips(p: gen.SamplingParams) -> None:
    try:
        params = sampling_from_proto(p)
    except ValueError:
        return
    assert math.isfinite(params.temperature) and params.temperature >= 0 and 0 < params.top_p <= 1
    assert 0 <= params.top_k < 2**31 and 1 <= params.max_tokens
    assert sampling_from_proto(sampling_to_proto(params)) == params


@FAST
@given(st.builds(gen.GenerateRequest, prompt=st.text(max_size=64),
                 prompt_token_ids=st.lists(U32, max_size=64), model=st.sampled_from(["tiny", "other", ""])),
       st.integers(1, 2**32))
def test_request_checks_raise_only_their_errors(req: gen.GenerateRequest, max_tokens: int) -> None:
    try:
        check_request(req, ("tiny",), PromptLimits(128))
        ids = check_prompt_ids(list(req.prompt_token_ids) or [ord(c) for c in req.prompt], token_id_limit=1024)
        check_length(len(ids), max_tokens, limit=128)
    except TandemError:
        return
    assert ids and all(0 <= t < 1024 for t in ids) and len(ids) + max_tokens <= 128


@FAST
@given(st.one_of(st.binary(max_size=256),
                 st.builds(lambda r, i, j, b: r.SerializeToString()[:i] + b + r.SerializeToString()[j:],
                           st.builds(gen.GenerateRequest, prompt=st.text(max_size=32),
                                     sampling=st.builds(gen.SamplingParams, stop=st.lists(st.text(max_size=8)))),
                           st.integers(0, 64), st.integers(0, 64), st.binary(max_size=4))))
def test_grpc_request_parser_returns_a_message_or_an_explanation(data: bytes) -> None:
    parsed = _lenient(gen.GenerateRequest.FromString)(data)  # type: ignore[misc]
    if not isinstance(parsed, gen.GenerateRequest):
        assert "GenerateRequest" in parsed.message
    found = bad_utf8_field(data, gen.GenerateRequest.DESCRIPTOR)
    if found is not None:
        assert not isinstance(parsed, gen.GenerateRequest), "flagged bytes that protobuf accepted"


@FAST
@given(st.one_of(st.binary(max_size=256),
                 st.builds(lambda r: r.SerializeToString(),
                           st.builds(gen.GenerateRequest, request_id=st.text(max_size=300), prompt=st.text(max_size=600),
                                     prompt_token_ids=st.lists(U32, max_size=200),
                                     sampling=st.builds(gen.SamplingParams, stop=st.lists(st.text(max_size=8)))))))
def test_the_wire_check_refuses_only_what_the_parsed_checks_refuse(data: bytes) -> None:
    """Lengths alone never refuse a request that the checks after parsing would admit."""
    limits = PromptLimits(128)  # 4096 characters, 127 token ids
    try:
        check_generate_wire(data, limits)
    except TandemError:
        req = gen.GenerateRequest.FromString(data)  # the walk refuses only what parses
        with pytest.raises(TandemError):
            check_request(req, ("tiny",), limits)
            check_prompt_ids(list(req.prompt_token_ids) or [1], vocab_size=2**32)


@FAST
@given(st.binary(max_size=512))
def test_kv_decode_of_random_bytes_raises_only_wire_error(data: bytes) -> None:
    try:
        env = wire.decode(data)
    except wire.WireError:
        wire.request_id_of(data)  # never raises either
        return
    assert env.kind in wire.MESSAGE_TYPES and isinstance(env.request_id, str)


LAYOUT = layout_of(make_pool("float16", None, num_blocks=8))
POOL_BLOCKS = 64


def _begins(layout_ok: bool = True) -> st.SearchStrategy[kv_pb2.KVTransferBegin]:
    layout = st.just(LAYOUT.to_proto()) if layout_ok else st.builds(
        kv_pb2.KVLayout, protocol_version=U32, dtype=st.sampled_from(["float16", "float32", "int7", ""]),
        num_layers=U32, block_size=U32, num_kv_heads=U32, head_dim=U32)
    return st.builds(kv_pb2.KVTransferBegin, request_id=st.text(max_size=8), layout=layout,
                     num_tokens=U32, num_blocks=st.one_of(U32, st.integers(0, 80)), max_inflight_bytes=U64)


@st.composite
def _fitting_begins(draw: st.DrawFn) -> kv_pb2.KVTransferBegin:
    """Begins whose token count fits their block count: small ones, and ones claiming up to 2**28 blocks."""
    n = draw(st.one_of(st.integers(1, 80), st.integers(2**20, 2**28 - 1)))
    bs = LAYOUT.block_size
    return kv_pb2.KVTransferBegin(request_id=draw(st.sampled_from(["a", "b", "c"])), layout=LAYOUT.to_proto(),
                                  num_blocks=n, num_tokens=(n - 1) * bs + draw(st.integers(1, bs)))


@FAST
@given(st.one_of(_begins(), _begins(layout_ok=False), _fitting_begins()))
def test_begin_is_refused_unless_it_fits_the_pool(b: kv_pb2.KVTransferBegin) -> None:
    refusal = refuse_begin(b, LAYOUT, POOL_BLOCKS)
    if refusal is None:  # accepted: the reservation it leads to is bounded by the pool
        n, bs = b.num_blocks, LAYOUT.block_size
        assert b.request_id and 0 < n <= POOL_BLOCKS and (n - 1) * bs < b.num_tokens <= n * bs


@FAST
@given(st.builds(kv_pb2.KVLayer, layer=U32, first_block=U32, num_blocks=U32, bytes_per_block=U32,
                 frame_pages=st.lists(st.one_of(U32, st.integers(0, 8)), max_size=12)))
def test_layer_header_is_checked_before_any_write(h: kv_pb2.KVLayer) -> None:
    t = Inbound(b"peer", "r", 8, 8 * LAYOUT.block_size, b"", "", 1 << 20, time.monotonic())
    t.reserved(list(range(10, 18)), LAYOUT.num_layers)
    if t.check_layer(h, LAYOUT.num_layers, LAYOUT.page_bytes) is None:
        assert h.layer < LAYOUT.num_layers and 0 < h.num_blocks and h.first_block + h.num_blocks <= 8
        assert sum(h.frame_pages) == h.num_blocks and h.bytes_per_block == LAYOUT.page_bytes


# -- a live receiver under random input ---------------------------------------------------------------
class _Bounded(Allocator):
    """Records every reserve() size (an assert here would be swallowed: reserve runs on the I/O thread)."""

    asked: list[int]

    def reserve(self, rid: str, n: int) -> list[int] | None:
        self.asked.append(n)
        return super().reserve(rid, n)


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[KVReceiver, _Bounded, zmq.Socket]]:
    kv = make_pool("float16", None, num_blocks=POOL_BLOCKS)
    alloc = _Bounded(POOL_BLOCKS)
    alloc.asked = []
    receiver = alloc.receiver(kv, "tcp://127.0.0.1:0", timeout_s=0.5)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(receiver.address)
    yield receiver, alloc, sock
    sock.close(0)
    ctx.term()
    deadline = time.monotonic() + 5
    while receiver.stats()["held_blocks"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = receiver.stats()
    receiver.close()
    assert alloc.balanced(), "a reservation was neither released nor completed"
    assert stats["reservations"] > 0 and stats["rejected"] > 0, f"the examples never reached reserve(): {stats}"


def _messages() -> st.SearchStrategy[list[bytes]]:
    header = st.one_of(
        st.binary(max_size=64),
        _begins().map(wire.encode), _begins(layout_ok=False).map(wire.encode), _fitting_begins().map(wire.encode),
        st.builds(kv_pb2.KVLayer, request_id=st.sampled_from(["a", "b", ""]), layer=U32, first_block=U32,
                  num_blocks=U32, bytes_per_block=U32, frame_pages=st.lists(U32, max_size=4)).map(wire.encode),
        st.builds(kv_pb2.KVAbort, request_id=st.sampled_from(["a", "b"]), code=ENUM).map(wire.encode))
    # A well-formed begin alone, as often as all the rest: without it, the examples reached reserve() (a
    # fitting begin, with no trailing frames, for an id not live) too rarely to be sure of once in 60.
    return st.one_of(_fitting_begins().map(lambda b: [wire.encode(b)]),
                     st.tuples(header, st.lists(st.binary(max_size=64), max_size=3)).map(lambda hp: [hp[0], *hp[1]]))


_probe = itertools.count()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(st.lists(_messages(), min_size=1, max_size=4))
def test_receiver_survives_random_messages(live: tuple, messages: list[list[bytes]]) -> None:
    receiver, alloc, sock = live
    for parts in messages:
        sock.send_multipart(parts)
    # a begin with another protocol version is always refused: its reply proves the thread still runs
    rid = f"probe-{next(_probe)}"
    sock.send(wire.encode(wire.Begin(request_id=rid, layout=LAYOUT.to_proto()), version=99))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if sock.poll(int((deadline - time.monotonic()) * 1000)) and wire.request_id_of(sock.recv()) == rid:
            break
    else:
        raise AssertionError("the receiver stopped answering")
    assert receiver._thread.is_alive()
    assert all(0 < n <= POOL_BLOCKS for n in alloc.asked), f"reserve() asked for {max(alloc.asked)} blocks"
