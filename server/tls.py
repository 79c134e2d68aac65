"""TLS for the public gRPC port: server credentials from PEM files, and the matching client side.

    --tls-cert cert.pem --tls-key key.pem            TLS: clients verify the server's certificate
    ... --tls-client-ca ca.pem                       mTLS: clients must present a certificate that
                                                     this CA signed, or the handshake fails
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TLSConfig:
    """PEM file paths. cert and key go together; client_ca turns on client-certificate checks."""

    cert: str
    key: str
    client_ca: str | None = None

    def __post_init__(self) -> None:
        for name in ("cert", "key", "client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--tls-{name.replace('_', '-')} {path!r} is not a readable file")

    @classmethod
    def from_flags(cls, cert: str | None, key: str | None, client_ca: str | None) -> TLSConfig | None:
        """None when no TLS flag is given. Raises ValueError for half a configuration."""
        if cert is None and key is None:
            if client_ca is not None:
                raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS plus client certificates)")
            return None
        if cert is None or key is None:
            raise ValueError("--tls-cert and --tls-key go together: give both")
        return cls(cert, key, client_ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Raises OSError if a file cannot be read (grpc itself rejects a malformed PEM at bind)."""
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=ca, require_client_auth=ca is not None,
        )


def client_credentials(ca: bytes | None = None, cert: bytes | None = None, key: bytes | None = None
                       ) -> grpc.ChannelCredentials:
    """Credentials for a client of a TLS gateway: `ca` verifies the server (None: the system roots);
    `cert`/`key` (PEM bytes) are the client's certificate for mTLS."""
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
