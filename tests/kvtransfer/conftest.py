"""Fixtures of the kvtransfer tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def ipc_dir() -> Iterator[Path]:
    """A fresh directory for ipc:// endpoints: short (socket paths are limited to ~100 bytes, too
    little for pytest's tmp dirs) and unique, so concurrent runs never share a socket file."""
    path = Path(tempfile.mkdtemp(prefix="tandem-kv-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
