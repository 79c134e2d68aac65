"""Start and stop a whole local stack (gateway, prefill and decode workers) as child processes.

Each child runs one `tandem <component>` command (the same ones docker-compose runs), binds port 0,
and writes its bound addresses to a ready file; the launcher waits for those files, so there are no
port races. Children die with the launcher (PR_SET_PDEATHSIG on Linux) and on `stop()`.

PR_SET_PDEATHSIG fires when the *thread* that started a child exits, not only the process: start
children (and restart them: `Stack.restart`, `Stack.relaunch`) from a thread that lives as long as
the stack, as `tandem up`'s main loop does (cli/supervisor.py).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: stop() still cleans up
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    ready_file: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def start(self, env: dict[str, str]) -> None:
        self.ready_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen([*self.argv, "--ready-file", str(self.ready_file)], stdout=log, stderr=log,
                                     env=env, preexec_fn=_die_with_parent)
        log.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def exit_code(self) -> int | None:
        """None while the process runs (or was never started); its exit code once it has exited."""
        return self.proc.poll() if self.proc is not None else None

    def ready(self) -> bool:
        """Whether the current process has written its ready file; if so, `info` now holds it. Never blocks."""
        if not self.ready_file.exists():
            return False
        self.info = json.loads(self.ready_file.read_text())
        return True

    def wait_ready(self, deadline: float) -> dict[str, Any]:
        while time.monotonic() < deadline:
            if self.ready():
                return self.info
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before it was ready:\n{tail}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} was not ready in time; see {self.log_path}")

    def terminate(self) -> None:
        """Ask the child to drain and exit (SIGTERM) without waiting for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, grace_s: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Stack:
    """A gateway plus prefill and decode workers on this host."""

    def __init__(self, model: str | Path, *, prefill_workers: int = 1, decode_workers: int = 1, host: str = "127.0.0.1",
                 port: int = 0, engine_args: list[str] | None = None, prefill_args: list[str] | None = None,
                 decode_args: list[str] | None = None, gateway_args: list[str] | None = None,
                 workdir: str | Path | None = None, env: dict[str, str] | None = None,
                 metrics_port: int = 0, log_args: list[str] | None = None) -> None:
        """`metrics_port` > 0 gives every process a Prometheus port: the gateway `metrics_port`,
        prefill worker i `metrics_port + 1 + i`, decode worker j `metrics_port + 1 + prefill_workers + j`.
        `log_args` (--log-level, --log-format) go to every process's `tandem` command; each writes its
        log to `<workdir>/<name>.log` (gateway, prefill-0, decode-0, ...)."""
        self.model = str(model)
        self.host = host
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tandem-stack-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}
        base = [sys.executable, "-m", "cli.main", *(log_args or [])]
        eng = ["--model", self.model, *(engine_args or [])]
        def metrics(index: int) -> list[str]:
            return ["--metrics-port", str(metrics_port + index)] if metrics_port > 0 else []

        self.prefill = [self._child(f"prefill-{i}", [*base, "prefill-worker", *eng, "--host", host, "--port", "0",
                                                    *metrics(1 + i), *(prefill_args or [])])
                        for i in range(prefill_workers)]
        self.decode = [self._child(f"decode-{i}", [*base, "decode-worker", *eng, "--host", host, "--port", "0",
                                                  *metrics(1 + prefill_workers + i), *(decode_args or [])])
                       for i in range(decode_workers)]
        self._gateway_argv = [*base, "gateway", "--model", self.model, "--host", host, "--port", str(port),
                              *metrics(0), *(gateway_args or [])]
        self.gateway: Child | None = None

    def _child(self, name: str, argv: list[str]) -> Child:
        return Child(name, argv, self.workdir / f"{name}.ready.json", self.workdir / f"{name}.log")

    @property
    def address(self) -> str:
        assert self.gateway is not None
        return self.gateway.info["address"]

    def start(self, timeout_s: float = 120.0) -> Stack:
        deadline = time.monotonic() + timeout_s
        try:
            for c in [*self.prefill, *self.decode]:
                c.start(self.env)
            for c in [*self.prefill, *self.decode]:
                c.wait_ready(deadline)
            self.start_gateway(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def start_gateway(self, deadline: float | None = None) -> None:
        argv = [*self._gateway_argv,
                "--prefill-workers", ",".join(c.info["address"] for c in self.prefill),
                "--decode-workers", ",".join(c.info["address"] for c in self.decode)]
        self.gateway = self._child("gateway", argv)
        self.gateway.start(self.env)
        self.gateway.wait_ready(deadline or time.monotonic() + 60)

    @property
    def children(self) -> list[Child]:
        """Every process, the gateway last (once started)."""
        return [*self.prefill, *self.decode, *([self.gateway] if self.gateway is not None else [])]

    @property
    def workers(self) -> list[Child]:
        return [*self.prefill, *self.decode]

    def relaunch(self, child: Child) -> None:
        """Start an exited worker again on the port it first bound, so the gateway's heartbeat finds it;
        returns at once (`child.ready()` says when it serves). Its log file is appended to.
        Raises KeyError if the worker never became ready (no port to reuse)."""
        port = child.info["address"].rsplit(":", 1)[1]
        argv = list(child.argv)
        argv[argv.index("--port") + 1] = port
        child.argv = argv
        child.start(self.env)

    def restart(self, child: Child, timeout_s: float = 60.0) -> None:
        """`relaunch` and wait until the worker is ready (RuntimeError if it exits first, TimeoutError)."""
        self.relaunch(child)
        child.wait_ready(time.monotonic() + timeout_s)

    def stop(self) -> None:
        """SIGTERM every child at once (they drain in parallel), then wait for each (SIGKILL after 5 s)."""
        children = [c for c in [self.gateway, *self.decode, *self.prefill] if c is not None]
        for c in children:
            c.terminate()
        for c in children:
            c.stop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
