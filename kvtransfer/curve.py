"""CurveZMQ on the KV channel: encryption, and authentication of both ends, when configured.

    prefill worker (KVSender, DEALER)                    decode worker (KVReceiver, ROUTER)
    client keypair (its .key_secret)  ── CURVE handshake ──►  server keypair (its .key_secret)
    knows the server's public key (.key)                      ZAP: client public key on the allow-list?
                                                              no: handshake refused, no frame delivered

Keys are ZeroMQ certificate files (`tandem keygen` writes them with zmq.curve_keypair):
`NAME.key` holds the public key, `NAME.key_secret` both keys; keep the latter 0600. Every decode worker
of a cluster may share one server keypair, so prefill workers need one server public key. The
allow-list is a directory of clients' `.key` files (or one such file); it is read at start.

A refused handshake never reaches the receiver's code: libzmq drops the connection after ZAP says no.
The sender learns it from its socket monitor (`HandshakeWatch`) and fails the peer's transfers at once,
with a message saying which key to list, instead of timing out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

ZAP_DOMAIN = "tandem-kv"
_FAILED: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the receiver refused this worker's CurveZMQ key (not on its allow-list: add this "
                                     "prefill worker's .key file to the decode worker's --kv-curve-client-keys)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the CurveZMQ handshake failed (is --kv-curve-server-public-key-file the "
                                         "decode worker's public key, and is CurveZMQ on at both ends?)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the CurveZMQ handshake failed (is CurveZMQ configured at both ends with "
                                          "matching keys?)",
}


@dataclass(frozen=True)
class CurveKeys:
    """A Z85-encoded keypair (40 bytes each)."""

    public: bytes
    secret: bytes

    @classmethod
    def generate(cls) -> CurveKeys:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def load(cls, secret_file: str | Path) -> CurveKeys:
        """Read a `.key_secret` certificate. Raises ValueError if it is missing or holds no secret key."""
        public, secret = _load(secret_file)
        if secret is None:
            raise ValueError(f"{secret_file} holds only a public key; give the .key_secret file")
        return cls(public, secret)


def load_public_key(path: str | Path) -> bytes:
    """The public key of a `.key` (or `.key_secret`) certificate. Raises ValueError."""
    return _load(path)[0]


def load_allow_list(path: str | Path) -> frozenset[bytes]:
    """Public keys from a directory of `.key` certificates, or from one certificate file. Raises
    ValueError when there is none (an empty allow-list would refuse every prefill worker)."""
    p = Path(path)
    if p.is_dir():
        keys = frozenset(load_public_key(f) for f in sorted(p.glob("*.key")))
    else:
        keys = frozenset({load_public_key(p)})
    if not keys:
        raise ValueError(f"no client public keys (*.key) in {p}")
    return keys


def _load(path: str | Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read CurveZMQ certificate {path}: {exc}") from exc


@dataclass(frozen=True)
class CurveServer:
    """The receiver's side: its keypair and the client public keys it accepts."""

    keys: CurveKeys
    allowed_clients: frozenset[bytes]

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` (before bind) a CURVE server that asks ZAP about each client."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())

    def start_authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """Start a ZAP handler on `ctx` that admits only `allowed_clients`; stop() it at teardown."""
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("kvtransfer.zap"))
        auth.start()
        auth.configure_curve_callback(ZAP_DOMAIN, _AllowList(self.allowed_clients))
        return auth


class _AllowList:
    """zmq.auth's credentials provider: callback(domain, z85 client key) -> allowed."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys
        if not ok:
            log.warning("refused a KV sender with CurveZMQ public key %s (not on the allow-list)", key.decode())
        return ok


@dataclass(frozen=True)
class CurveClient:
    """The sender's side: its keypair and the receiver's public key."""

    keys: CurveKeys
    server_public: bytes

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` (before connect) a CURVE client of the server key."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)


class HandshakeWatch:
    """A monitor of one sender socket's handshake failures (PAIR socket; poll it with the others)."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.socket: zmq.Socket = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._watched = sock

    def failure(self) -> str | None:
        """Read the pending events; the explanation of a handshake failure among them, or None."""
        found: str | None = None
        while True:
            try:
                event = recv_monitor_message(self.socket, zmq.NOBLOCK)
            except zmq.Again:
                return found
            code: int = int(event["event"])
            found = _FAILED.get(code) or found

    def close(self) -> None:
        try:
            self._watched.disable_monitor()
        except zmq.ZMQError:
            pass
        self.socket.close(0)
