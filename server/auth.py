"""Who may call what: bearer tokens in gRPC metadata, checked by one server interceptor.

A token file holds one token per line, optionally followed by its role (default `user`):

    # comments and blank lines are ignored
    3q2+7w-very-long-random-token            # role user: Generate
    Zm9vYmFyYmF6-another-random-token admin  # role admin: everything, incl. ClusterStatus

Clients send `authorization: Bearer <token>` metadata. The interceptor answers

    no or malformed authorization metadata, or an unknown token -> UNAUTHENTICATED
    a known token whose role may not call the method           -> PERMISSION_DENIED

by raising Unauthenticated / PermissionDenied, which `server.grpc_server.ErrorInterceptor` (the one
error mapper, outside this interceptor) turns into statuses. Health checks are open, so load
balancers and orchestrators can probe without a token; methods not listed need `admin` (fail closed).
Tokens are compared by SHA-256 digest, so lookups do not leak a token's prefix through timing.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from server.errors import PermissionDenied, Unauthenticated

logger = logging.getLogger(__name__)

ROLES = ("user", "admin")  # each role may do everything the ones before it may
MIN_TOKEN_CHARS = 16
METHOD_ROLES: dict[str, str] = {
    "/tandem.v1.Generation/Generate": "user",
    "/tandem.v1.Generation/ClusterStatus": "admin",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "user",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": "user",
}
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
_BEARER = "bearer "


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class TokenTable:
    """Allowed tokens (by digest) and their roles. Build with `from_file` or `from_lines`."""

    roles: dict[bytes, str]

    @classmethod
    def from_lines(cls, lines: Sequence[str], source: str = "<tokens>") -> TokenTable:
        """Parse `token [role]` lines. Raises ValueError naming the line for an unknown role, a token
        shorter than MIN_TOKEN_CHARS, a duplicate, or a file without any token."""
        roles: dict[bytes, str] = {}
        for n, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) > 2:
                raise ValueError(f"{source}:{n}: expected `token [role]`, got {len(parts)} words")
            token, role = parts[0], parts[1] if len(parts) == 2 else "user"
            if role not in ROLES:
                raise ValueError(f"{source}:{n}: unknown role {role!r}; roles are {', '.join(ROLES)}")
            if len(token) < MIN_TOKEN_CHARS:
                raise ValueError(f"{source}:{n}: token has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                                 f"random ones (python -c 'import secrets; print(secrets.token_urlsafe(32))')")
            if _digest(token) in roles:
                raise ValueError(f"{source}:{n}: duplicate token")
            roles[_digest(token)] = role
        if not roles:
            raise ValueError(f"{source}: no tokens; every request would be refused")
        return cls(roles)

    @classmethod
    def from_file(cls, path: str | Path) -> TokenTable:
        return cls.from_lines(Path(path).read_text().splitlines(), str(path))

    def role_of(self, token: str) -> str | None:
        return self.roles.get(_digest(token))

    def check(self, method: str, authorization: str | None) -> str | None:
        """The caller's role if `authorization` ("Bearer <token>") may call `method`; None for an open
        method. Raises Unauthenticated or PermissionDenied with a message saying what to do."""
        if method.startswith(OPEN_PREFIXES):
            return None
        if not authorization:
            raise Unauthenticated(f"{method} needs a bearer token: send metadata `authorization: Bearer <token>`")
        if not authorization.lower().startswith(_BEARER):
            raise Unauthenticated("the authorization metadata must be `Bearer <token>`")
        role = self.role_of(authorization[len(_BEARER):].strip())
        if role is None:
            raise Unauthenticated("invalid bearer token; ask the operator for a token listed in --auth-token-file")
        need = METHOD_ROLES.get(method, "admin")
        if ROLES.index(role) < ROLES.index(need):
            raise PermissionDenied(f"{method} needs role {need!r}; this token has role {role!r}")
        return role


def _authorization(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call's bearer token against `tokens` before its handler runs (see the module
    docstring); a refused call never reaches the service."""

    def __init__(self, tokens: TokenTable) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        try:
            self.tokens.check(method, _authorization(handler_call_details.invocation_metadata))
        except (Unauthenticated, PermissionDenied) as exc:
            logger.info("refused %s: %s", method, exc.message)
            return _refusal(handler, exc)
        return handler


def _refusal(handler: grpc.RpcMethodHandler, exc: Exception) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that raises `exc` (mapped by ErrorInterceptor)."""
    deser, ser = handler.request_deserializer, handler.response_serializer

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise exc

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise exc
        yield  # pragma: no cover - makes this an async generator

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, deser, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, deser, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, deser, ser)
    return grpc.unary_unary_rpc_method_handler(unary, deser, ser)
