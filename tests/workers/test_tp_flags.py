"""The tensor-parallel flags: `tandem up` gives each role its own size, the worker commands parse the
multi-node flags into a checked EngineConfig, and `tandem up` refuses to span nodes. No process starts."""

from __future__ import annotations

import pytest

from cli.main import build_parser
from cli.up import build_stack, run
from decode_worker.config import DecodeWorkerConfig
from engine.config import EngineConfig
from engine.options import from_args
from prefill_worker.config import PrefillWorkerConfig


def _engine(argv: list[str], cls: type) -> EngineConfig:
    """What the child's own command line makes of its flags (the last of a repeated flag wins)."""
    cmd = argv[argv.index("-m") + 2 :]  # [..., python, -m, cli.main, <log flags>..., <command>, ...]
    cmd = cmd[next(i for i, a in enumerate(cmd) if a.endswith("-worker")) :]
    return from_args(cls, build_parser().parse_args(cmd)).engine


def test_tandem_up_gives_each_role_its_tensor_parallel_size(tmp_path) -> None:
    args = build_parser().parse_args(["up", "--model", str(tmp_path), "--tensor-parallel-size", "2",
                                      "--prefill-tensor-parallel-size", "1", "--workdir", str(tmp_path)])
    stack = build_stack(args, tmp_path)
    assert _engine(stack.prefill[0].argv, PrefillWorkerConfig).tensor_parallel_size == 1
    assert _engine(stack.decode[0].argv, DecodeWorkerConfig).tensor_parallel_size == 2


def test_tandem_up_refuses_more_than_one_node(tmp_path, caplog) -> None:
    args = build_parser().parse_args(["up", "--model", str(tmp_path), "--nnodes", "2", "--dist-init-addr",
                                      "10.0.0.1:29500", "--workdir", str(tmp_path)])
    assert run(args) == 2
    assert "tandem up runs one host" in caplog.text


@pytest.mark.parametrize(("kw", "message"), [
    (dict(tensor_parallel_size=4, nnodes=2, node_rank=2, dist_init_addr="h:1"), "node_rank must be in \\[0, 2\\)"),
    (dict(tensor_parallel_size=3, nnodes=2, dist_init_addr="h:1"), "does not split evenly over --nnodes 2"),
    (dict(tensor_parallel_size=4, nnodes=2), "--nnodes > 1 needs --dist-init-addr"),
    (dict(dist_init_addr="no-port"), "dist_init_addr must be HOST:PORT"),
])
def test_bad_multinode_settings_are_refused(kw, message) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="m", **kw)


def test_the_worker_commands_take_the_multinode_flags() -> None:
    ns = build_parser().parse_args(["decode-worker", "--model", "m", "--tensor-parallel-size", "16", "--nnodes", "2",
                                    "--node-rank", "1", "--dist-init-addr", "leader:29500", "--dist-timeout", "120"])
    e = from_args(DecodeWorkerConfig, ns).engine
    assert (e.tensor_parallel_size, e.nnodes, e.node_rank, e.ranks_per_node, e.dist_timeout_s) == (16, 2, 1, 8, 120.0)
