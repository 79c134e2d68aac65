"""CUDA graphs by role: a prefill worker never decodes, so its command defaults to --enforce-eager (no
capture at start-up); a decode worker captures unless told not to; `tandem up` passes the flag to both.
No process starts."""

from __future__ import annotations

from cli.main import build_parser
from cli.up import build_stack
from decode_worker.config import DecodeWorkerConfig
from engine.options import from_args
from prefill_worker.config import PrefillWorkerConfig
from tests.workers.test_tp_flags import _engine


def _eager(argv: list[str], cls: type) -> bool:
    return _engine(argv, cls).enforce_eager


def test_only_the_decode_worker_captures_by_default(tmp_path) -> None:
    parse = build_parser().parse_args
    assert from_args(PrefillWorkerConfig, parse(["prefill-worker", "--model", "m"])).engine.enforce_eager
    assert not from_args(PrefillWorkerConfig, parse(["prefill-worker", "--model", "m", "--no-enforce-eager"])
                         ).engine.enforce_eager
    assert not from_args(DecodeWorkerConfig, parse(["decode-worker", "--model", "m"])).engine.enforce_eager
    stack = build_stack(parse(["up", "--model", str(tmp_path), "--workdir", str(tmp_path)]), tmp_path)
    assert _eager(stack.prefill[0].argv, PrefillWorkerConfig) and not _eager(stack.decode[0].argv, DecodeWorkerConfig)
    stack = build_stack(parse(["up", "--model", str(tmp_path), "--enforce-eager", "--workdir", str(tmp_path)]),
                        tmp_path)
    assert _eager(stack.decode[0].argv, DecodeWorkerConfig)
