"""What a transfer ends as, on each side: result codes and the records handed to callers."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import cast

from tandem.v1 import kv_pb2


class TransferCode(enum.IntEnum):
    """How a transfer ended; the values are kv.proto's KVErrorCode (OK is KV_ERROR_CODE_UNSPECIFIED)."""

    OK = kv_pb2.KV_ERROR_CODE_UNSPECIFIED
    MISMATCH = kv_pb2.KV_ERROR_CODE_MISMATCH
    NO_SPACE = kv_pb2.KV_ERROR_CODE_NO_SPACE
    UNKNOWN_REQUEST = kv_pb2.KV_ERROR_CODE_UNKNOWN_REQUEST
    ABORTED = kv_pb2.KV_ERROR_CODE_ABORTED
    TIMEOUT = kv_pb2.KV_ERROR_CODE_TIMEOUT
    DUPLICATE = kv_pb2.KV_ERROR_CODE_DUPLICATE
    PROTOCOL = kv_pb2.KV_ERROR_CODE_PROTOCOL
    INTERNAL = kv_pb2.KV_ERROR_CODE_INTERNAL
    CLOSED = kv_pb2.KV_ERROR_CODE_CLOSED

    @property
    def wire(self) -> kv_pb2.KVErrorCode:
        """The kv.proto value, for KVReject.code / KVAbort.code."""
        return cast(kv_pb2.KVErrorCode, self.value)

    @classmethod
    def from_wire(cls, value: int) -> TransferCode:
        """The code of a peer's KVReject/KVAbort: a missing one (0) reads as ABORTED, one this
        version does not know as PROTOCOL; never OK."""
        if value == cls.OK:
            return cls.ABORTED
        try:
            return cls(value)
        except ValueError:
            return cls.PROTOCOL


@dataclass(frozen=True)
class TransferResult:
    """The sender's view of one finished transfer.

    ok: every page was written by the receiver (KVDone arrived); then code is OK and error None.
    bytes, seconds: KV payload bytes sent and the wall time from the first KV byte handed to
        ZeroMQ to KVDone received; both 0 when no KV byte was sent. bytes / seconds is honest GB/s.
    """

    ok: bool
    error: str | None
    code: TransferCode
    bytes: int
    seconds: float
    num_blocks: int

    @property
    def gbps(self) -> float:
        """Gigabytes (1e9) per second over the measured window; 0 when nothing was measured."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class CompletedTransfer:
    """Given to the receiver's on_complete: the KV of `request_id` is in `block_ids` of every layer.

    From this call on the blocks belong to the caller (the decode engine); the receiver never
    releases them. bytes, seconds: first KV frame received -> last frame written on the receiver.
    meta, traceparent: as the sender passed them to begin().
    """

    request_id: str
    block_ids: list[int]
    num_tokens: int
    meta: bytes
    traceparent: str
    bytes: int
    seconds: float


@dataclass(frozen=True)
class FailedTransfer:
    """Given to the receiver's on_failed: a transfer that ended without on_complete.

    Its reservation (if any) was already released through `release` when this is delivered.
    Not delivered for transfers ended by the receiver's own abort().
    """

    request_id: str
    code: TransferCode
    message: str
