"""The prefill worker's configuration. Torch-free: `tandem prefill-worker` builds its flags from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from engine.options import check_options, option
from server.config import ServerOptions, WorkerOptions

if TYPE_CHECKING:
    from kvtransfer.curve import CurveClient


@dataclass(frozen=True)
class PrefillWorkerConfig:
    engine: EngineConfig
    request_timeout_s: float = option(300.0, "seconds a Prefill call may take (queueing, prefill, transfer) "
                                      "unless the request says less", flag="request-timeout", above=0)
    max_queued: int = option(1024, "Prefill calls queued here before RESOURCE_EXHAUSTED", min=1)
    kv_curve_secret_key_file: str | None = option(
        None, "this worker's CurveZMQ certificate with its secret key (`tandem keygen` writes NAME.key_secret)")
    kv_curve_server_public_key_file: str | None = option(None, "the decode workers' public certificate (NAME.key)")
    worker: WorkerOptions = field(default_factory=WorkerOptions)
    server: ServerOptions = field(default_factory=ServerOptions)

    def __post_init__(self) -> None:
        check_options(self)
        if (self.kv_curve_secret_key_file is None) != (self.kv_curve_server_public_key_file is None):
            raise ValueError("--kv-curve-secret-key-file and --kv-curve-server-public-key-file go together on a "
                             "prefill worker")

    def kv_curve(self) -> CurveClient | None:
        """The KV sender's CurveZMQ keys, read from their files; None: plaintext. Raises ValueError."""
        if self.kv_curve_secret_key_file is None or self.kv_curve_server_public_key_file is None:
            return None
        from kvtransfer.curve import CurveClient, CurveKeys, load_public_key

        return CurveClient(CurveKeys.load(self.kv_curve_secret_key_file),
                           load_public_key(self.kv_curve_server_public_key_file))
