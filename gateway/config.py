"""The gateway's configuration: which workers, which limits, which model name. Torch-free.

Each field's default, range and help text are declared here once (engine.options); `tandem gateway`
and `tandem up` generate their flags from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.options import REQUIRED, check_options, option
from gateway.tool_parsers import TOOL_PARSERS
from gateway.validation import MAX_MODEL_NAME_CHARS
from server.config import ServerOptions
from server.protoconv import DEFAULT_MAX_TOKENS
from server.tls import TLSConfig


@dataclass(frozen=True)
class GatewayLimits:
    max_inflight: int = option(256, "concurrent requests (gRPC and HTTP) before RESOURCE_EXHAUSTED / 429", min=1)
    request_timeout_s: float = option(600.0, "seconds a request may run in all (queueing, prefill, decode)",
                                      flag="request-timeout", above=0)
    default_max_tokens: int = option(DEFAULT_MAX_TOKENS, "max_tokens of a request that leaves it unset", min=1)
    client_read_timeout_s: float = option(
        30.0, "seconds a streaming client may leave its stream unread (with the send buffer full) before its "
        "request is aborted and its slot and KV blocks freed", flag="client-read-timeout", above=0)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class HttpLimits:
    """Connections to the HTTP API (gateway/http_listener.py)."""

    idle_timeout_s: float = option(
        30.0, "seconds an HTTP connection may go without a request in progress (idle keep-alive, or still "
        "sending its headers) before it is closed", flag="http-idle-timeout", above=0)
    read_timeout_s: float = option(30.0, "seconds a request's body may take to arrive (then 408)",
                                   flag="http-read-timeout", above=0)
    max_connections: int = option(512, "open HTTP connections; a new one past it is answered 503 and closed "
                                  "(keep it under the open-file limit, ulimit -n)", flag="http-max-connections",
                                  min=1)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class GatewayConfig:
    model: str = option(REQUIRED, "checkpoint directory, .gguf file, packaged model name, Hugging Face cache "
                        "folder or Hugging Face id (tokenizer and config are read from it; engine.hub)")
    decode_workers: tuple[str, ...] = option(REQUIRED, "comma-separated host:port of decode workers")
    revision: str | None = option(None, "branch, tag or commit of a Hugging Face id or cache folder (default: main)")
    prefill_workers: tuple[str, ...] = option((), "comma-separated host:port of prefill workers")
    served_model_name: tuple[str, ...] = option(
        (), "comma-separated names clients may use for the model, the first one in responses (default: the "
        "Hugging Face id of a hub model, else the model directory's name)")
    local_prefill_threshold: int = option(
        32, "uncached prompt tokens below which the decode worker prefills itself (0: never)", min=0)
    heartbeat_interval_s: float = option(0.5, "seconds between status polls of each worker",
                                         flag="heartbeat-interval", above=0)
    http_port: int | None = option(
        None, "serve the OpenAI-compatible HTTP API (/v1/completions, ...) on this port (0: any free port, "
        "reported as http_address in the ready file; default: off)", min=0, max=65535)
    tls_cert: str | None = option(None, "PEM certificate (chain) of the gateway: serve TLS")
    tls_key: str | None = option(None, "PEM private key of --tls-cert")
    tls_client_ca: str | None = option(None, "PEM CA bundle: require client certificates it signed (mTLS)")
    auth_token_file: str | None = option(
        None, "file of allowed bearer tokens, one `token [role]` per line (roles: user, admin); calls "
        "without a listed token get UNAUTHENTICATED")
    trace_content: bool = option(
        False, "record prompts and completions on the request's span (gen_ai.input.messages / "
        "gen_ai.output.messages; also $OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true); off by default: "
        "they may hold personal data")
    tool_call_parser: str = option(
        "auto", "how tool calls are read out of the model's text: auto (from the chat template: <tool_call> "
        "hermes, [TOOL_CALLS] mistral, <|python_tag|> llama3_json), none (tools only with tool_choice none), "
        "or a format", choices=("auto", "none", *TOOL_PARSERS))
    reasoning_parser: str = option(
        "auto", "how a thinking model's reasoning is split from its reply: auto (<think> when the chat template "
        "has it), none (left in the content), or think (qwen3 and deepseek_r1 are the same <think> format)",
        choices=("auto", "none", "think", "qwen3", "deepseek_r1"))
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    http: HttpLimits = field(default_factory=HttpLimits)
    server: ServerOptions = field(default_factory=ServerOptions)

    def __post_init__(self) -> None:
        check_options(self)
        if not self.decode_workers:
            raise ValueError("the gateway needs at least one decode worker (--decode-workers)")
        bad = next((n for n in self.served_model_name if len(n) > MAX_MODEL_NAME_CHARS), None)
        if bad is not None:
            raise ValueError(f"served_model_name {bad[:40]!r}... has {len(bad)} characters; the limit is "
                             f"{MAX_MODEL_NAME_CHARS}")
        self.tls  # noqa: B018 - validates the TLS flags (half a configuration, missing files)

    @property
    def tls(self) -> TLSConfig | None:
        """The TLS files, or None for plaintext. Raises ValueError for half a configuration."""
        return TLSConfig.from_flags(self.tls_cert, self.tls_key, self.tls_client_ca)
