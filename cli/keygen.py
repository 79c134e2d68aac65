"""`tandem keygen`: make a CurveZMQ keypair for the KV channel (see docs/security.md).

    tandem keygen --out-dir keys --name decode     -> keys/decode.key (public), keys/decode.key_secret (0600)

Give a decode worker `--kv-curve-secret-key-file keys/decode.key_secret --kv-curve-client-keys keys/clients/`
and each prefill worker its own `.key_secret` plus `--kv-curve-server-public-key-file keys/decode.key`;
copy each prefill worker's `.key` into the decode workers' client directory.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_TEMPLATE = """#   ZeroMQ CURVE {kind} certificate, made by `tandem keygen` (zmq.curve_keypair)
#   {note}
metadata
curve
    public-key = "{public}"
{secret_line}"""


def write_keypair(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public key) and NAME.key_secret (both keys, mode 0600) into `out_dir` (created
    if needed); zmq.auth.load_certificate reads both. Returns (public file, secret file). Raises
    FileExistsError rather than overwrite a key, ValueError for a name with a path separator."""
    import zmq

    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"name must be a plain file name, got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = out / f"{name}.key", out / f"{name}.key_secret"
    for path in (public_file, secret_file):
        if path.exists():
            raise FileExistsError(f"{path} exists; remove it first or pick another --name")
    public, secret = zmq.curve_keypair()
    public_file.write_text(_TEMPLATE.format(kind="Public", note="share this file", public=public.decode(),
                                            secret_line=""))
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_TEMPLATE.format(kind="Secret", note="keep this file private", public=public.decode(),
                                 secret_line=f'    secret-key = "{secret.decode()}"\n'))
    return public_file, secret_file


def run(args: argparse.Namespace) -> int:
    public_file, secret_file = write_keypair(args.out_dir, args.name)
    logger.info("wrote %s (public) and %s (secret, mode 0600)", public_file, secret_file)
    print(f"{public_file}\n{secret_file}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("keygen", help="make a CurveZMQ keypair for the KV channel")
    p.add_argument("--out-dir", required=True, help="directory to write NAME.key and NAME.key_secret into")
    p.add_argument("--name", required=True, help="file name stem, e.g. decode or prefill-0")
    p.set_defaults(func=run)
