"""The protos: code generation from a clean directory, our conventions, and message round trips."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf.descriptor import FileDescriptor

from kvtransfer import wire
from protos import generate as protogen
from tandem.v1 import generation_pb2, kv_pb2, worker_pb2

FILES: list[FileDescriptor] = [generation_pb2.DESCRIPTOR, worker_pb2.DESCRIPTOR, kv_pb2.DESCRIPTOR]


def test_codegen_into_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "tandem" / "v1").mkdir(parents=True)
    (tmp_path / "tandem" / "v1" / "stale_pb2.py").write_text("raise ImportError\n")  # a deleted proto's output
    made = protogen.generate(out_root=tmp_path)
    names = sorted(p.name for p in made)
    stems = sorted(p.stem for p in protogen.proto_files())
    assert stems == ["generation", "kv", "worker"]
    assert names == sorted(["__init__.py", *(s + sfx for s in stems for sfx in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))])
    for path in made:
        compile(path.read_text(), str(path), "exec")  # valid Python
    assert "from tandem.v1 import generation_pb2" in (tmp_path / "tandem/v1/worker_pb2.py").read_text()


def test_codegen_reports_a_broken_proto(tmp_path: Path) -> None:
    (tmp_path / "tandem" / "v1").mkdir(parents=True)
    (tmp_path / "tandem" / "v1" / "bad.proto").write_text('syntax = "proto3"; message {')
    with pytest.raises(protogen.ProtoGenError):
        protogen.generate(out_root=tmp_path / "out", proto_root=tmp_path)


def test_conventions() -> None:
    for f in FILES:
        assert f.package == "tandem.v1"
        for enum in f.enum_types_by_name.values():
            prefix = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", enum.name).upper()
            assert enum.values_by_number[0].name == f"{prefix}_UNSPECIFIED", enum.name
            assert all(v.name.startswith(prefix + "_") for v in enum.values), enum.name
        for service in f.services_by_name.values():
            for rpc in service.methods:
                assert (rpc.input_type.name, rpc.output_type.name) == (f"{rpc.name}Request", f"{rpc.name}Response")


def test_public_api_round_trips_and_keeps_presence() -> None:
    req = generation_pb2.GenerateRequest(
        request_id="r1", prompt_token_ids=[1, 2, 3], model="tiny",
        sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=8, stop=["\n"], logprobs=2, seed=7),
    )
    back = generation_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert back == req and back.HasField("model")
    assert back.sampling.HasField("temperature") and back.sampling.temperature == 0.0  # greedy, not unset
    assert not back.sampling.HasField("top_p") and not back.sampling.HasField("skip_special_tokens")
    status = generation_pb2.WorkerStatus(worker_id="d0", role=generation_pb2.WORKER_ROLE_DECODE,
                                         kv_blocks_total=100, kv_blocks_free=40)
    fields = generation_pb2.WorkerStatus.DESCRIPTOR.fields_by_name
    assert (fields["kv_blocks_total"].number, fields["kv_blocks_free"].number) == (10, 11)
    assert generation_pb2.WorkerStatus.FromString(status.SerializeToString()) == status
    resp = generation_pb2.GenerateResponse(token_ids=[5], finish_reason=generation_pb2.FINISH_REASON_STOP,
                                           usage=generation_pb2.Usage(prompt_tokens=3, completion_tokens=1))
    assert generation_pb2.GenerateResponse.FromString(resp.SerializeToString()) == resp


def test_worker_messages_round_trip() -> None:
    req = worker_pb2.PrefillRequest(request_id="r", prompt_token_ids=[1, 2], decode_kv_address="tcp://10.0.0.2:7000",
                                    traceparent="00-abc-def-01", timeout_ms=5000)
    assert worker_pb2.PrefillRequest.FromString(req.SerializeToString()) == req
    resp = worker_pb2.PrefillResponse(num_cached_tokens=9, transfer=worker_pb2.KVTransferStats(bytes=10, transfer_ns=5))
    assert resp.HasField("transfer")
    status = worker_pb2.StatusResponse(kv_layout=kv_pb2.KVLayout(block_size=16, dtype="bfloat16"))
    assert worker_pb2.StatusResponse.FromString(status.SerializeToString()).kv_layout.block_size == 16
    meta = kv_pb2.KVRequestMeta(first_token_id=42, first_token_logprob=generation_pb2.TokenLogprob(token_id=42))
    assert kv_pb2.KVRequestMeta.FromString(meta.SerializeToString()) == meta


def test_every_kv_message_type_round_trips_through_the_envelope() -> None:
    samples = {
        "begin": wire.Begin(request_id="r", num_blocks=2, num_tokens=20, meta=b"\x00\xff"),
        "ready": wire.Ready(request_id="r", num_blocks=2, window_bytes=1 << 20, dst_runs=[1, 1]),
        "reject": wire.Reject(request_id="r", code=kv_pb2.KV_ERROR_CODE_NO_SPACE, message="full"),
        "layer": wire.Layer(request_id="r", layer=3, first_block=0, num_blocks=2, bytes_per_block=64,
                            frame_pages=[2]),
        "ack": wire.Ack(request_id="r", layer=3, num_blocks=2, bytes=128),
        "done": wire.Done(request_id="r", bytes=128, duration_ns=1000),
        "abort": wire.Abort(request_id="r", code=kv_pb2.KV_ERROR_CODE_ABORTED, reason="bye"),
        "heartbeat": wire.Heartbeat(request_id="r"),
    }
    assert set(samples) == set(wire.MESSAGE_TYPES)
    for kind, body in samples.items():
        env = wire.decode(wire.encode(body))
        assert (env.kind, env.body, env.request_id) == (kind, body, "r")
    with pytest.raises(wire.WireError) as info:
        wire.decode(wire.encode(samples["begin"], version=99))
    assert info.value.peer_version == 99 and wire.request_id_of(wire.encode(samples["ack"], version=99)) == "r"
    with pytest.raises(wire.WireError):
        wire.decode(b"\xff\xff\xff")
