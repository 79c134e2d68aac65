"""Rank 0's side of a tensor-parallel engine: it starts this node's follower processes, joins the group,
serialises every collective, keeps idle followers alive and fails fast when one dies.

    worker process (rank 0)                          follower processes (ranks 1..n-1 of this node)
    ModelRunner -> TPDriver.start(config)
        spawn `python -m engine.parallel.follower --rank r` --------> init_group(r) -> load shard r
        init_group(0) (hosts the rendezvous store) <---------------> -> loop: recv() -> run
        lock: one command + its collectives at a time (the engine thread; the keep-alive thread)
        keep-alive thread: NOP after `keepalive_s` without a command (the followers' recv has a timeout);
                           started by the runner once every rank has loaded (`start_keepalive`)
        monitor thread: a follower process that exits -> `error` is set, `on_failure` callbacks run
                        (the worker's engine loop dies: every request fails, the process exits 1)
    close(): STOP to every follower, wait, kill what is left

Followers die with rank 0 (PR_SET_PDEATHSIG on Linux); followers on other nodes (`--node-rank k`) see
rank 0's connections close, or the group's timeout, and exit 1.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.parallel.group import Op, TPGroup, destroy_group, init_group

logger = logging.getLogger(__name__)

_MONITOR_TICK_S = 0.1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the group's timeout still ends an orphan
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def follower_config(config: EngineConfig, init_addr: str) -> EngineConfig:
    """What a follower runs: the target model only (the draft stays on rank 0), at a known address."""
    return dataclasses.replace(config, dist_init_addr=init_addr, speculative_model=None, speculative_method=None,
                               num_speculative_tokens=None)


def spawn_follower(config: EngineConfig, rank: int) -> subprocess.Popen[bytes]:
    """Start rank `rank` as a child process (stdout/stderr: this process's), dying with this thread."""
    argv = [sys.executable, "-m", "engine.parallel.follower", "--rank", str(rank),
            "--config", json.dumps(dataclasses.asdict(config))]
    root = str(Path(__file__).resolve().parents[2])  # the same code as this process, wherever it runs from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent)


class TPDriver:
    """Rank 0 of `config.tensor_parallel_size` (see the module docstring). Raises RuntimeError (or the
    rendezvous's error) when the followers do not join within `config.dist_timeout_s`."""

    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.size = config.tensor_parallel_size
        init_addr = config.dist_init_addr or f"127.0.0.1:{free_port()}"
        cfg = follower_config(config, init_addr)
        local = config.ranks_per_node
        self.children = {r: spawn_follower(cfg, r) for r in range(1, local)}
        try:
            self.group: TPGroup = init_group(0, self.size, init_addr, config.dist_timeout_s, device)
        except BaseException:
            self._kill_children()
            raise
        self.lock = threading.RLock()
        self.keepalive_s = max(0.5, config.dist_timeout_s / 4)
        self.error: str | None = None
        self.on_failure: list[Callable[[str], None]] = []
        self._last = time.monotonic()
        self._closing = threading.Event()
        threading.Thread(target=self._monitor, name="tp-monitor", daemon=True).start()
        atexit.register(self.close)
        logger.info("tensor parallel: %d ranks joined (%d local followers)", self.size, len(self.children))

    def start_keepalive(self) -> None:
        """Start the keep-alive thread: call once the ranks are past their start-up collectives (the
        followers then wait in `recv`; a NOP during their start-up would pair with the wrong collective)."""
        self._last = time.monotonic()
        threading.Thread(target=self._keepalive, name="tp-keepalive", daemon=True).start()

    def touch(self) -> None:
        """A command went out (the caller holds `lock`)."""
        self._last = time.monotonic()

    # ------------------------------------------------------------------ failure
    def when_failed(self, fn: Callable[[str], None]) -> None:
        """Call `fn(message)` when a rank fails (at once if one already has); from the monitor thread."""
        self.on_failure.append(fn)
        if self.error is not None:
            fn(self.error)

    def _fail(self, message: str) -> None:
        if self.error is not None or self._closing.is_set():
            return
        self.error = message
        logger.critical("tensor parallel: %s", message)
        for fn in list(self.on_failure):
            try:
                fn(message)
            except Exception:  # noqa: BLE001
                logger.exception("tensor-parallel failure callback raised")

    def _monitor(self) -> None:
        while not self._closing.wait(_MONITOR_TICK_S):
            for rank, proc in self.children.items():
                code = proc.poll()
                if code is not None:
                    self._fail(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {code}")
                    return

    def _keepalive(self) -> None:
        while not self._closing.wait(self.keepalive_s / 2):
            if self.error is not None or time.monotonic() - self._last < self.keepalive_s:
                continue
            if not self.lock.acquire(blocking=False):
                continue  # a step is running: that is traffic enough
            try:
                self.group.send(Op.NOP)
                self.touch()
            except Exception as exc:  # noqa: BLE001 - a dead peer
                self._fail(f"tensor-parallel keep-alive failed: {exc}")
                return
            finally:
                self.lock.release()

    # -------------------------------------------------------------------- close
    def close(self, grace_s: float = 5.0) -> None:
        """Stop every local follower (STOP, then SIGTERM, then SIGKILL) and leave the group. Idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self.error is None and self.lock.acquire(timeout=grace_s):
            try:
                self.group.send(Op.STOP)
            except Exception:  # noqa: BLE001 - a follower already gone
                logger.debug("STOP did not reach every follower", exc_info=True)
            finally:
                self.lock.release()
        deadline = time.monotonic() + grace_s
        for proc in self.children.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._kill_children()
        if self.error is None:
            destroy_group()

    def _kill_children(self) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.children.values():
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
