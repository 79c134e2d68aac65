"""`tandem up` supervises its children, over the real command: a SIGKILLed decode worker is restarted on
its port while the other keeps streaming; a worker that cannot start again, or the gateway exiting,
stops the stack with exit code 1 naming the process and its log; Ctrl-C leaves no child behind, also
in the middle of starting.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cli.supervisor import RestartPolicy
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.e2e.conftest import ENGINE_ARGS
from tests.hf_reference import random_prompts
from tests.reliability.streams import Stream, wait_until

REPO = Path(__file__).resolve().parents[2]
STREAM_TOKENS = 400


class Up:
    """One `tandem up` process; stdout and stderr go to a file (a pipe nobody reads would fill)."""

    def __init__(self, model: Path, tmp: Path, *flags: str) -> None:
        self.workdir = tmp / "stack"
        self.out = tmp / "up.out"
        tmp.mkdir(parents=True)
        argv = [sys.executable, "-m", "cli.main", "up", "--model", str(model), "--port", "0", "--http-port", "0",
                "--workdir", str(self.workdir), *ENGINE_ARGS, "--local-prefill-threshold", "0", *flags]
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 180.0) -> str:
        """The gateway's address, once `tandem up` says it is ready."""
        deadline = time.monotonic() + timeout_s
        while (m := re.search(r"gateway ready on (\S+)", self.output())) is None:
            assert self.proc.poll() is None, f"tandem up exited with {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"tandem up not ready in {timeout_s} s:\n{self.output()}"
            time.sleep(0.1)
        return m.group(1)

    def ready_info(self, name: str) -> dict[str, Any]:
        return json.loads((self.workdir / f"{name}.ready.json").read_text())

    def pid(self, name: str) -> int:
        """From the ready file's worker_id, `<role>-<host>-<pid>-<port>`."""
        return int(self.ready_info(name)["worker_id"].rsplit("-", 2)[1])

    def descendants(self) -> list[int]:
        return _descendants(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                for pid in [*self.descendants(), self.proc.pid]:
                    _kill(pid)
                self.proc.wait(10)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Up]]:
    ups: list[Up] = []

    def make(model: Path, *flags: str) -> Up:
        ups.append(Up(model, tmp_path / f"up{len(ups)}", *flags))
        return ups[-1]

    yield make
    for up in ups:
        up.close()


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        kids = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += kids
        frontier = kids
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _status(address: str) -> worker_pb2.StatusResponse:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.DecodeWorkerStub(channel).Status(worker_pb2.StatusRequest(), timeout=2)


def test_restart_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(backoff_s=1.0, max_backoff_s=30.0)
    assert [policy.delay_s(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert RestartPolicy(backoff_s=2.0, max_backoff_s=2.0).delay_s(10_000) == 2.0
    with pytest.raises(ValueError):
        RestartPolicy(backoff_s=5.0, max_backoff_s=1.0)
    with pytest.raises(ValueError):
        RestartPolicy(max_restarts=-1)


def test_a_killed_decode_worker_comes_back_on_its_port_while_the_other_keeps_streaming(
        tiny_model: Callable[..., Path], launch: Callable[..., Up]) -> None:
    up = launch(tiny_model("llama", max_position_embeddings=1024), "--prefill-workers", "1", "--decode-workers", "2",
                "--restart-backoff", "1")
    address = up.wait_ready()
    victim, survivor = up.ready_info("decode-0")["address"], up.ready_info("decode-1")["address"]
    victim_pid = up.pid("decode-0")
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(address))

    streams = [Stream(stub, p, STREAM_TOKENS) for p in random_prompts(1024, [40] * 4, seed=11)]
    wait_until(lambda: _status(victim).running > 0 and _status(survivor).running > 0, 60,
          "a stream on each decode worker")
    os.kill(victim_pid, signal.SIGKILL)
    killed = time.monotonic()
    at_kill = [s.tokens for s in streams]
    for s in streams:
        s.join(120)
        assert not s.is_alive(), "a stream did not end in 120 s"
    finished = [(s, n) for s, n in zip(streams, at_kill, strict=True) if s.error is None]
    assert finished, "no stream was left on the healthy worker"
    for s, n in finished:
        assert s.tokens == STREAM_TOKENS and n < STREAM_TOKENS and s.ended > killed, \
            "a stream on the healthy worker must run across the kill and complete"
    for s in streams:
        if s.error is not None:
            assert s.error.code() == grpc.StatusCode.UNAVAILABLE and victim in s.error.details(), s.error.details()
    assert up.proc.poll() is None, f"tandem up stopped when one worker died:\n{up.output()}"

    # back on the same port, a new process, with the exit and the restart in tandem up's log
    wait_until(lambda: f"decode-0 is back on {victim}" in up.output(), 60, "decode-0 to be restarted")
    assert up.ready_info("decode-0")["address"] == victim and up.pid("decode-0") != victim_pid
    out = up.output()
    assert re.search(rf"decode-0 \(pid {victim_pid}\) exited with code -9; log: \S*decode-0\.log", out), out
    assert f"restarting decode-0 on {victim}" in out, out

    def both_healthy() -> bool:
        workers = stub.ClusterStatus(gen.ClusterStatusRequest(), timeout=5).workers
        return all(w.healthy for w in workers) and {victim, survivor} <= {w.address for w in workers}
    wait_until(both_healthy, 10, "the gateway to list both decode workers healthy")

    seen: set[str] = set()
    again = [Stream(stub, p, STREAM_TOKENS) for p in random_prompts(1024, [30] * 4, seed=12)]

    def both_served() -> bool:
        seen.update(a for a in (victim, survivor) if _status(a).running > 0)
        return seen == {victim, survivor} or not any(s.is_alive() for s in again)
    wait_until(both_served, 60, "new streams on both decode workers")
    assert seen == {victim, survivor}, f"new streams only ran on {seen}"
    for s in again:
        s.join(120)
        assert s.error is None and s.tokens == STREAM_TOKENS

    # Ctrl-C stops every child, the restarted one included
    children = up.descendants()
    assert up.pid("decode-0") in children
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(30) == 0, up.output()
    assert not [pid for pid in children if _alive(pid)], "children left behind after Ctrl-C"


def test_a_worker_that_cannot_start_again_stops_the_stack_naming_it(
        tiny_model: Callable[..., Path], launch: Callable[..., Up], tmp_path: Path) -> None:
    model = tmp_path / "model"
    subprocess.run(["cp", "-r", str(tiny_model("llama", max_position_embeddings=1024)), str(model)], check=True)
    up = launch(model, "--prefill-workers", "0", "--decode-workers", "2", "--restart-backoff", "0.2",
                "--max-restarts", "2")
    up.wait_ready()
    children = up.descendants()
    (model / "config.json").write_text("{ not json")  # every start from now on fails loading the model
    os.kill(up.pid("decode-0"), signal.SIGKILL)
    try:
        rc = up.proc.wait(120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"tandem up still running 120 s after its worker could no longer start:\n{up.output()}")
    out = up.output()
    assert rc == 1, out
    assert len(re.findall(r"decode-0 failed to start", out)) == 2, out
    assert re.search(r"stopping: decode-0 could not be restarted: 2 failed starts in a row, the last exited with "
                     r"code \d+ \(log: \S*decode-0\.log\)", out), out
    assert not [pid for pid in children if _alive(pid)], "children left behind"


def test_ctrl_c_while_starting_stops_every_child(tiny_model: Callable[..., Path], launch: Callable[..., Up]) -> None:
    up = launch(tiny_model("llama", max_position_embeddings=1024), "--prefill-workers", "1", "--decode-workers", "2")
    wait_until(lambda: len(up.descendants()) >= 3 or up.proc.poll() is not None, 30, "the workers to be launched")
    children = up.descendants()
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(30) == 130, up.output()
    assert "gateway ready" not in up.output()
    assert not [pid for pid in children if _alive(pid)], "children left behind after Ctrl-C"


def test_the_gateway_exiting_stops_the_stack(tiny_model: Callable[..., Path], launch: Callable[..., Up]) -> None:
    up = launch(tiny_model("llama", max_position_embeddings=1024), "--prefill-workers", "0", "--decode-workers", "1")
    up.wait_ready()
    children = up.descendants()
    gateway_pid = up.pid("gateway")
    assert gateway_pid in children
    os.kill(gateway_pid, signal.SIGKILL)
    assert up.proc.wait(30) == 1, up.output()
    assert re.search(r"stopping: the gateway exited with code -9 \(log: \S*gateway\.log\)", up.output()), up.output()
    assert not [pid for pid in children if _alive(pid)], "children left behind"
