"""The security flags of `tandem gateway`, `tandem prefill-worker` and `tandem decode-worker`, and the
configs they build (docs/security.md explains each).

    gateway         --tls-cert PEM --tls-key PEM [--tls-client-ca PEM]   TLS, mTLS
                    --auth-token-file FILE                               bearer tokens (`token [role]`)
    decode worker   --kv-curve-secret-key-file F.key_secret              CurveZMQ server keypair
                    --kv-curve-client-keys DIR|F.key                     allowed prefill workers' keys
    prefill worker  --kv-curve-secret-key-file F.key_secret              CurveZMQ client keypair
                    --kv-curve-server-public-key-file F.key              the decode workers' public key
"""

from __future__ import annotations

import argparse

from kvtransfer.curve import CurveClient, CurveKeys, CurveServer, load_allow_list, load_public_key
from tandem.tls import TLSConfig


def add_gateway_security_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security")
    g.add_argument("--tls-cert", default=None, help="PEM certificate (chain) of the gateway: serve TLS")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument("--tls-client-ca", default=None,
                   help="PEM CA bundle: require client certificates it signed (mTLS)")
    g.add_argument("--auth-token-file", default=None,
                   help="file of allowed bearer tokens, one `token [role]` per line (roles: user, admin); "
                        "calls without a listed token get UNAUTHENTICATED")


def gateway_tls(args: argparse.Namespace) -> TLSConfig | None:
    """Raises ValueError for half a TLS configuration or a missing file."""
    return TLSConfig.from_flags(args.tls_cert, args.tls_key, args.tls_client_ca)


def add_kv_curve_args(p: argparse.ArgumentParser, role: str) -> None:
    g = p.add_argument_group("KV channel security (CurveZMQ; off unless a key file is given)")
    g.add_argument("--kv-curve-secret-key-file", default=None,
                   help="this worker's CurveZMQ certificate with its secret key (`tandem keygen` writes NAME.key_secret)")
    if role == "decode":
        g.add_argument("--kv-curve-client-keys", default=None,
                       help="directory of the allowed prefill workers' public certificates (*.key), or one file")
    else:
        g.add_argument("--kv-curve-server-public-key-file", default=None,
                       help="the decode workers' public certificate (NAME.key)")


def kv_curve_server(args: argparse.Namespace) -> CurveServer | None:
    """The decode worker's CurveZMQ config, or None. Raises ValueError for half a configuration."""
    secret, clients = args.kv_curve_secret_key_file, args.kv_curve_client_keys
    if secret is None and clients is None:
        return None
    if secret is None or clients is None:
        raise ValueError("--kv-curve-secret-key-file and --kv-curve-client-keys go together on a decode worker "
                         "(CurveZMQ without an allow-list would admit any key)")
    return CurveServer(CurveKeys.load(secret), load_allow_list(clients))


def kv_curve_client(args: argparse.Namespace) -> CurveClient | None:
    """The prefill worker's CurveZMQ config, or None. Raises ValueError for half a configuration."""
    secret, server = args.kv_curve_secret_key_file, args.kv_curve_server_public_key_file
    if secret is None and server is None:
        return None
    if secret is None or server is None:
        raise ValueError("--kv-curve-secret-key-file and --kv-curve-server-public-key-file go together on a "
                         "prefill worker")
    return CurveClient(CurveKeys.load(secret), load_public_key(server))
