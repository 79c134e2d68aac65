"""Shared fixtures: tiny random checkpoints of every supported architecture, made once per run."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Triton chooses its CPU interpreter when it is first imported: decide before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# gRPC's fork handlers restart its poller threads in a forked child, where subprocess then closes their
# fds before exec: the child aborts ("epoll_wait error: Bad file descriptor") in a few percent of forks
# once this process holds a gRPC channel or server, and every Stack.start() forks (preexec_fn). Nothing
# here needs fork support; it must be decided before grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_model(arch, **options)` -> a checkpoint directory; equal arguments share one directory."""
    from training.tiny import make_tiny_model

    made: dict[tuple[str, str], Path] = {}

    def make(arch: str = "llama", **options: Any) -> Path:
        key = (arch, repr(sorted(options.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            made[key] = make_tiny_model(out, arch, **options)
        return made[key]

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module (restored afterwards): tiny models on a shared 2-core box
    run many times faster than with two threads that spin-wait for each other. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
