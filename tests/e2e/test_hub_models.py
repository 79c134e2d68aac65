"""Serving a model by its Hugging Face id, offline, from a hub cache laid out as huggingface_hub lays
it out: through `tandem up` (which resolves the id once and hands its children the snapshot) and
through components given the id themselves; the model is listed and accepted under its repo id.
A name that cannot be found is one line and exit code 2, never a traceback or a made-up model.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import openai
import pytest

from cli.launcher import Stack
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc
from tests.e2e.conftest import ENGINE_ARGS, wait_all_blocks_free
from tests.hub_cache import add_to_hub_cache

REPO = Path(__file__).resolve().parents[2]
REPO_ID = "tandem-test/tiny-llama"


@pytest.fixture(scope="module")
def hf_env(tiny_model, tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("hf-home")
    add_to_hub_cache(home, REPO_ID, tiny_model("llama", max_position_embeddings=1024))
    return {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def check_served_by_id(http_address: str, grpc_address: str) -> None:
    client = openai.OpenAI(base_url=f"http://{http_address}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [REPO_ID]
    resp = client.completions.create(model=REPO_ID, prompt="def main():", max_tokens=4, temperature=0)
    assert resp.model == REPO_ID and resp.usage.completion_tokens == 4
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(grpc_address))
    assert list(stub.Models(gen.ModelsRequest(), timeout=10).names) == [REPO_ID]


def test_tandem_up_serves_a_hub_id_under_its_repo_id(hf_env, tmp_path) -> None:
    out = tmp_path / "up.out"
    argv = [sys.executable, "-m", "cli.main", "up", "--model", REPO_ID, "--port", "0", "--http-port", "0",
            "--workdir", str(tmp_path / "stack"), *ENGINE_ARGS, "--local-prefill-threshold", "0"]
    with open(out, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **hf_env})
    try:
        deadline = time.monotonic() + 180
        while (m := re.search(r"gateway ready on (\S+)", out.read_text())) is None:
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        assert f"on {REPO_ID} (" in out.read_text() and "/snapshots/" in out.read_text()
        http = json.loads((tmp_path / "stack" / "gateway.ready.json").read_text())["http_address"]
        check_served_by_id(http, m.group(1))
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0


def test_components_given_the_id_resolve_it_themselves(hf_env, tmp_path) -> None:
    with Stack(REPO_ID, engine_args=ENGINE_ARGS, env=hf_env, workdir=tmp_path / "stack",
               gateway_args=["--http-port", "0", "--local-prefill-threshold", "0"]) as stack:
        assert stack.gateway is not None
        check_served_by_id(stack.gateway.info["http_address"], stack.address)
        wait_all_blocks_free(stack)


@pytest.mark.parametrize("command", [
    ["up", "--model", "tandem-test/absent"],
    ["gateway", "--model", "tandem-test/absent", "--decode-workers", "127.0.0.1:9"],
    ["decode-worker", "--model", "tandem-test/absent", "--device", "cpu"],
    ["up", "--model", "no such model"],
], ids=["up", "gateway", "decode-worker", "not-a-name"])
def test_a_model_that_cannot_be_found_is_one_line_and_exit_2(hf_env, tmp_path, command: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "cli.main", *command], cwd=REPO, env={**os.environ, **hf_env},
                          capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    assert "neither an existing directory" in errors[0] or "HF_HUB_OFFLINE" in errors[0]
    assert not (REPO / "tandem-test").exists()  # nothing was written in the model's place


def test_make_tiny_model_never_overwrites_a_checkpoint(tiny_model, tmp_path) -> None:
    target = tmp_path / "real"
    target.mkdir()
    (target / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    done = subprocess.run([sys.executable, "-m", "cli.main", "make-tiny-model", str(target)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--overwrite" in done.stderr
    assert json.loads((target / "config.json").read_text()) == {"architectures": ["Qwen2ForCausalLM"]}
