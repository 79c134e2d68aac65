"""Encoding of KV transfer messages: one protobuf envelope (kv.proto's KVMessage) per ZeroMQ message.

    ZeroMQ message = [ KVMessage bytes ][ payload frame ]*      (only KVLayer has payload frames)
    KVMessage      = { protocol_version, oneof body { begin | ready | reject | layer | ack |
                                                      done | abort | heartbeat } }

The oneof is the registry of message types: `MESSAGE_TYPES` maps each body field name to its class.
No pickle anywhere. A ROUTER prepends the peer's routing id frame; that is the sockets' business,
not this module's.
"""

from __future__ import annotations

from typing import NamedTuple

from google.protobuf.message import DecodeError, Message

from kvtransfer.layout import PROTOCOL_VERSION
from tandem.v1 import kv_pb2

_BODY = kv_pb2.KVMessage.DESCRIPTOR.oneofs_by_name["body"]
MESSAGE_TYPES: dict[str, type[Message]] = {f.name: getattr(kv_pb2, f.message_type.name) for f in _BODY.fields}
_FIELD_OF: dict[type[Message], str] = {cls: name for name, cls in MESSAGE_TYPES.items()}

# Public aliases so callers need not import tandem.v1 themselves.
Begin = kv_pb2.KVTransferBegin
Ready = kv_pb2.KVReady
Reject = kv_pb2.KVReject
Layer = kv_pb2.KVLayer
Ack = kv_pb2.KVAck
Done = kv_pb2.KVDone
Abort = kv_pb2.KVAbort
Heartbeat = kv_pb2.KVHeartbeat


class WireError(ValueError):
    """A message that cannot be decoded, or one from another protocol version (then
    `peer_version` is that version)."""

    def __init__(self, message: str, peer_version: int | None = None) -> None:
        super().__init__(message)
        self.peer_version = peer_version


class Envelope(NamedTuple):
    kind: str  # a MESSAGE_TYPES key: "begin", "layer", ...
    body: Message  # the instance of MESSAGE_TYPES[kind]
    request_id: str


def encode(body: Message, version: int = PROTOCOL_VERSION) -> bytes:
    """Wrap one body message in a KVMessage and serialize it. Raises KeyError for a foreign type."""
    env = kv_pb2.KVMessage(protocol_version=version)
    getattr(env, _FIELD_OF[type(body)]).CopyFrom(body)
    return env.SerializeToString()


def decode(data: bytes) -> Envelope:
    """Parse a KVMessage. Raises WireError when it does not parse, has no body, or its
    protocol_version differs from ours (the message then names both versions)."""
    env = kv_pb2.KVMessage()
    try:
        env.ParseFromString(data)
    except DecodeError as e:
        raise WireError(f"undecodable KV message ({len(data)} bytes): {e}") from e
    kind = env.WhichOneof("body")
    if kind is None:
        raise WireError("KV message without a body (a newer peer's message type?)")
    body = getattr(env, kind)
    if env.protocol_version != PROTOCOL_VERSION:
        raise WireError(f"protocol_version: peer {env.protocol_version}, local {PROTOCOL_VERSION}",
                        env.protocol_version)
    return Envelope(kind, body, body.request_id)


def request_id_of(data: bytes) -> str:
    """Best-effort request id of a message that failed `decode` ("" when none can be read)."""
    env = kv_pb2.KVMessage()
    try:
        env.ParseFromString(data)
    except DecodeError:
        return ""
    kind = env.WhichOneof("body")
    return getattr(env, kind).request_id if kind else ""
