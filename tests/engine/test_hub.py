"""Models by name: a checkpoint directory, a hub cache folder or a Hugging Face id (engine.hub), with
no network: the cache is laid out as huggingface_hub lays it out and HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.checkpoint import CheckpointError
from engine.hub import repo_id_of, resolve_model
from tests.hub_cache import add_to_hub_cache


@pytest.fixture(scope="module")
def hf_home(tiny_model, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    add_to_hub_cache(home, "tandem-test/tiny-llama", tiny_model("llama"))
    add_to_hub_cache(home, "tandem-test/tiny-llama", tiny_model("qwen3"), revision="v2")
    return home


def test_a_cache_folder_is_served_under_its_repo_id(hf_home: Path) -> None:
    repo = hf_home / "hub" / "models--tandem-test--tiny-llama"
    main = repo / "snapshots" / (repo / "refs" / "main").read_text()
    v2 = repo / "snapshots" / (repo / "refs" / "v2").read_text()
    assert repo_id_of(main) == repo_id_of(repo) == "tandem-test/tiny-llama"
    assert resolve_model(str(main)).name == "tandem-test/tiny-llama" and resolve_model(str(main)).path == main
    assert resolve_model(str(repo)).path == main
    assert resolve_model(str(repo), revision="v2").path == v2
    assert resolve_model(str(main), revision="v2").path == v2  # another snapshot of the same repository
    assert json.loads((v2 / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]


def test_a_plain_directory_keeps_its_name_and_refuses_a_revision(tiny_model) -> None:
    path = tiny_model("llama")
    assert resolve_model(str(path)).name == path.name
    with pytest.raises(CheckpointError, match="--revision v1 applies to a Hugging Face id"):
        resolve_model(str(path), revision="v1")


@pytest.mark.parametrize("name", ["not a model", "../escape", "org/name/extra", "a--b/c"])
def test_a_name_that_is_neither_a_path_nor_an_id_is_one_line(name: str) -> None:
    with pytest.raises(CheckpointError, match="neither an existing directory nor a Hugging Face id"):
        resolve_model(name)


def test_ids_resolve_through_hf_home_offline(hf_home: Path) -> None:
    """In a fresh interpreter: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported."""
    script = (
        "from engine.hub import resolve_model\n"
        "from engine.checkpoint import CheckpointError\n"
        "for rid, rev in [('tandem-test/tiny-llama', None), ('tandem-test/tiny-llama', 'v2')]:\n"
        "    m = resolve_model(rid, rev); print(m.name, m.path.parent.name, m.path.name)\n"
        "for rid, rev in [('tandem-test/absent', None), ('tandem-test/tiny-llama', 'v3')]:\n"
        "    try: resolve_model(rid, rev)\n"
        "    except CheckpointError as exc: print('error:', exc)\n"
        "import sys; print('torch' in sys.modules)\n"
    )
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2], check=True).stdout.splitlines()
    repo = hf_home / "hub" / "models--tandem-test--tiny-llama"
    assert out[0] == f"tandem-test/tiny-llama snapshots {(repo / 'refs' / 'main').read_text()}"
    assert out[1] == f"tandem-test/tiny-llama snapshots {(repo / 'refs' / 'v2').read_text()}"
    assert out[2].startswith("error: tandem-test/absent is not in the Hugging Face cache") and "HF_HUB_OFFLINE" in out[2]
    assert out[3].startswith("error: tandem-test/tiny-llama at revision v3 is not in the Hugging Face cache")
    assert out[4] == "False"  # resolving a name loads no torch (the gateway resolves its model too)
