"""Errors that carry their gRPC status code; the one interceptor in `server.grpc_server` maps them.

Raise these (or plain ValueError for bad input) anywhere in a handler; never build statuses by hand.
"""

from __future__ import annotations

import grpc


class TandemError(Exception):
    """An error a client should see with a specific status code and an actionable message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidRequest(TandemError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TandemError):
    code = grpc.StatusCode.NOT_FOUND


class Overloaded(TandemError):
    """Bounded queues are full: try again later (the message says when)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(TandemError):
    """No healthy worker, or a worker died mid-request."""

    code = grpc.StatusCode.UNAVAILABLE


class Mismatch(TandemError):
    """Two components disagree about the model or the KV layout."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(TandemError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(TandemError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TandemError):
    code = grpc.StatusCode.PERMISSION_DENIED


class AlreadyExists(TandemError):
    code = grpc.StatusCode.ALREADY_EXISTS

