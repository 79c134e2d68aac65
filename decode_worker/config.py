"""The decode worker's configuration. Torch-free: `tandem decode-worker` builds its flags from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from engine.options import check_options, option
from server.config import ServerOptions, WorkerOptions

if TYPE_CHECKING:
    from kvtransfer.curve import CurveServer


@dataclass(frozen=True)
class DecodeWorkerConfig:
    engine: EngineConfig
    kv_bind: str = option("tcp://127.0.0.1:0", "KV receiver endpoint (tcp://host:port or ipc://path)")
    max_streams: int = option(1024, "concurrent Decode streams before RESOURCE_EXHAUSTED", min=1)
    kv_curve_secret_key_file: str | None = option(
        None, "this worker's CurveZMQ certificate with its secret key (`tandem keygen` writes NAME.key_secret)")
    kv_curve_client_keys: str | None = option(
        None, "directory of the allowed prefill workers' public certificates (*.key), or one file")
    worker: WorkerOptions = field(default_factory=WorkerOptions)
    server: ServerOptions = field(default_factory=ServerOptions)

    def __post_init__(self) -> None:
        check_options(self)
        if (self.kv_curve_secret_key_file is None) != (self.kv_curve_client_keys is None):
            raise ValueError("--kv-curve-secret-key-file and --kv-curve-client-keys go together on a decode worker "
                             "(CurveZMQ without an allow-list would admit any key)")

    def kv_curve(self) -> CurveServer | None:
        """The KV receiver's CurveZMQ keys and allow-list, read from their files; None: plaintext."""
        if self.kv_curve_secret_key_file is None or self.kv_curve_client_keys is None:
            return None
        from kvtransfer.curve import CurveKeys, CurveServer, load_allow_list

        return CurveServer(CurveKeys.load(self.kv_curve_secret_key_file), load_allow_list(self.kv_curve_client_keys))
