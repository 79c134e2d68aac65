"""CurveZMQ on the KV channel: an allowed sender's transfer is encrypted and lands; a sender with no key,
an unknown key or the wrong server key gets no frame through (the receiver reserves nothing, sees
nothing), and the sender fails fast with a message naming the fix. Also: MAXMSGSIZE and the
transfer cap on the receiver."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
import zmq

from cli.keygen import write_keypair
from kvtransfer import KVSender, TransferCode, wire
from kvtransfer.curve import CurveClient, CurveKeys, CurveServer, load_allow_list, load_public_key
from kvtransfer.receiver import max_frame_bytes
from tests.kvtransfer.kvpeers import SHAPE, SRC_IDS, Allocator, layout_of, make_pool

T = 1.0
TOKENS = len(SRC_IDS) * SHAPE["block_size"]


@pytest.fixture(scope="module")
def keys() -> dict[str, CurveKeys]:
    return {name: CurveKeys.generate() for name in ("server", "client", "stranger")}


@pytest.fixture
def secured(keys: dict[str, CurveKeys]) -> Iterator[tuple[Allocator, object, torch.Tensor]]:
    dst = make_pool("float16", None)
    alloc = Allocator(dst.shape[1])
    receiver = alloc.receiver(dst, "tcp://127.0.0.1:0", timeout_s=T,
                              curve=CurveServer(keys["server"], frozenset({keys["client"].public})))
    yield alloc, receiver, dst
    receiver.close()
    assert alloc.balanced()


def test_allowed_sender_transfers_over_curve(secured: tuple, keys: dict[str, CurveKeys]) -> None:
    alloc, receiver, dst = secured
    src = make_pool("float16", seed=3)
    sender = KVSender(src, layout_of(src), timeout_s=T, curve=CurveClient(keys["client"], keys["server"].public))
    try:
        handle = sender.begin("ok", receiver.address, SRC_IDS, TOKENS)
        handle.all_ready()
        assert handle.result(timeout=10).ok
        assert torch.equal(dst[:, alloc.completed["ok"].block_ids], src[:, SRC_IDS])
    finally:
        sender.close()


@pytest.mark.parametrize("who", ["stranger", "wrong-server-key", "plaintext"])
def test_sender_with_a_refused_key_fails_fast_and_reaches_nothing(secured: tuple, keys: dict[str, CurveKeys],
                                                                   who: str) -> None:
    alloc, receiver, _ = secured
    src = make_pool("float16", seed=3)
    curve = {"stranger": CurveClient(keys["stranger"], keys["server"].public),
             "wrong-server-key": CurveClient(keys["client"], keys["stranger"].public), "plaintext": None}[who]
    sender = KVSender(src, layout_of(src), timeout_s=30.0, curve=curve)
    try:
        for attempt in range(3):  # regression: a refused route used to crash the sender's I/O thread
            t0 = time.monotonic()
            handle = sender.begin(f"refused-{attempt}", receiver.address, SRC_IDS, TOKENS)
            handle.all_ready()
            result = handle.result(timeout=10)
            assert time.monotonic() - t0 < 5.0, "the refusal must not wait for the 30 s transfer timeout"
            assert not result.ok and result.code is TransferCode.MISMATCH, result
            assert "CurveZMQ" in (result.error or "")
            if who == "stranger":
                assert "allow-list" in (result.error or "")
            assert sender.error is None and not sender.closed, "the sender's I/O thread died"
    finally:
        sender.close()
    assert alloc.reservations == 0 and receiver.stats()["rejected"] == 0


def test_plaintext_peer_frames_are_refused(secured: tuple) -> None:
    """A DEALER without CurveZMQ sends a well-formed KVTransferBegin: nothing reaches the receiver."""
    alloc, receiver, dst = secured
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(receiver.address)
    layout = layout_of(dst)
    begin = wire.Begin(request_id="plain", layout=layout.to_proto(), num_tokens=TOKENS, num_blocks=len(SRC_IDS))
    try:
        sock.send(wire.encode(begin))
        assert not sock.poll(1500), "the receiver answered a peer that never authenticated"
    finally:
        sock.close(0)
        ctx.term()
    stats = receiver.stats()
    assert alloc.reservations == 0 and stats["rejected"] == 0 and stats["reservations"] == 0


def test_keygen_files_load_back(tmp_path) -> None:
    public_file, secret_file = write_keypair(tmp_path, "decode")
    keys = CurveKeys.load(secret_file)
    assert load_public_key(public_file) == keys.public
    assert load_allow_list(tmp_path) == frozenset({keys.public})
    assert (secret_file.stat().st_mode & 0o077) == 0, "the secret key file must be private to its owner"
    with pytest.raises(ValueError, match="only a public key"):
        CurveKeys.load(public_file)


def test_receiver_caps_frame_size_and_live_transfers() -> None:
    dst = make_pool("float16", None)
    alloc = Allocator(dst.shape[1])
    receiver = alloc.receiver(dst, "tcp://127.0.0.1:0", timeout_s=T, max_transfers=2)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(receiver.address)
    layout = layout_of(dst)
    try:
        for rid in ("a", "b", "c"):  # the pool has room for all three; the cap says no to the third
            sock.send(wire.encode(wire.Begin(request_id=rid, layout=layout.to_proto(), num_tokens=16, num_blocks=1)))
        replies = {}
        while len(replies) < 3 and sock.poll(2000):
            env = wire.decode(sock.recv())
            replies.setdefault(env.request_id, env)
        assert replies["a"].kind == replies["b"].kind == "ready"
        assert replies["c"].kind == "reject" and "limit 2" in replies["c"].body.message
        assert max_frame_bytes(layout) >= 16 << 20
        sock.send_multipart([b"x" * (max_frame_bytes(layout) + 1)])  # over MAXMSGSIZE: dropped, peer cut off
        time.sleep(0.3)
        assert receiver.stats()["rejected"] == 1  # the oversized frame never reached the parser
    finally:
        sock.close(0)
        ctx.term()
        receiver.close()
    assert alloc.balanced()
