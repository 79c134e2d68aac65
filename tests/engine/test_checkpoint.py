"""Checkpoint directories: validation messages, streaming every layout, progress, fingerprints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine.weights as weights
from engine.checkpoint import CheckpointError, checkpoint_fingerprint, load_hf_config
from engine.weights import iter_safetensors


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_load_hf_config_reads_config(tiny_model) -> None:
    cfg = load_hf_config(str(tiny_model("llama")))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 2


def test_bad_directories_name_the_path_and_the_problem(tmp_path: Path, tiny_model) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match=f"{missing}.*does not exist"):
        load_hf_config(missing)
    a_file = tmp_path / "weights.bin"
    a_file.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hf_config(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"{empty} has no config.json"):
        load_hf_config(empty)
    no_weights = _copy(tiny_model("llama"), tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_hf_config(no_weights)
    bad_json = _copy(tiny_model("llama"), tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_hf_config(bad_json)
    assert issubclass(CheckpointError, ValueError)


def test_single_file_streams_every_tensor_once(tiny_model) -> None:
    path = tiny_model("qwen2")
    expected = load_file(path / "model.safetensors")
    got = list(iter_safetensors(path))
    assert sorted(name for name, _ in got) == sorted(expected)
    assert all(torch.equal(t, expected[n]) and t.device.type == "cpu" for n, t in got)


def test_sharded_index_is_followed_and_checked(tmp_path: Path, tiny_model) -> None:
    path = _copy(tiny_model("qwen2", num_shards=3), tmp_path / "sharded")
    single = load_file(tiny_model("qwen2") / "model.safetensors")
    got = dict(iter_safetensors(path))
    assert got.keys() == single.keys() and all(torch.equal(got[k], single[k]) for k in single)

    # A tensor stored in two shards is yielded once, from the shard the index names.
    index = json.loads((path / "model.safetensors.index.json").read_text())
    first = path / "model-00001-of-00003.safetensors"
    extra = load_file(first) | {"model.norm.weight": torch.zeros(64)}
    save_file(extra, str(first))
    assert [n for n, _ in iter_safetensors(path)].count("model.norm.weight") == 1
    assert torch.equal(dict(iter_safetensors(path))["model.norm.weight"], single["model.norm.weight"])

    index["weight_map"]["model.extra.weight"] = "model-00002-of-00003.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.extra.weight"):
        list(iter_safetensors(path))
    index["weight_map"]["model.extra.weight"] = "model-00009-of-00009.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00009-of-00009.safetensors"):
        load_hf_config(path)


def test_unindexed_files_are_all_read(tmp_path: Path, tiny_model) -> None:
    path = _copy(tiny_model("llama"), tmp_path / "loose")
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, str(path / "part-b.safetensors"))
    save_file({n: tensors[n] for n in names[5:]}, str(path / "part-a.safetensors"))
    got = list(iter_safetensors(path))
    assert sorted(n for n, _ in got) == names
    assert [n for n, _ in got][: len(names) - 5] == names[5:]  # part-a first: sorted file order


def test_tensors_are_read_lazily(tmp_path: Path, tiny_model) -> None:
    path = _copy(tiny_model("llama", num_shards=3), tmp_path / "lazy")
    last = path / "model-00003-of-00003.safetensors"
    stream = iter_safetensors(path)
    name, tensor = next(stream)
    last.write_bytes(b"\0" * 16)  # corrupt a later shard: the first tensor was read without it
    assert name == "model.embed_tokens.weight" and tensor.shape == (1024, 64)
    with pytest.raises(Exception):  # noqa: B017 (safetensors raises its own error type)
        list(stream)


def test_progress_bar(
    tiny_model, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_model("llama")
    list(iter_safetensors(path))
    list(iter_safetensors(path, progress=False))
    assert "loading weights" not in capsys.readouterr().err  # small checkpoint: no bar by default
    list(iter_safetensors(path, progress=True))
    err = capsys.readouterr().err
    assert "loading weights" in err and "100%" in err
    monkeypatch.setattr(weights, "PROGRESS_MIN_BYTES", 1024)
    list(iter_safetensors(path))
    assert "loading weights" in capsys.readouterr().err


def test_fingerprint_is_stable_and_tells_models_apart(tmp_path: Path, tiny_model) -> None:
    base = tiny_model("llama")
    fp = checkpoint_fingerprint(base)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert checkpoint_fingerprint(str(base)) == fp
    copy = _copy(base, tmp_path / "copy")
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(cfg, indent=7, sort_keys=True))  # formatting only
    assert checkpoint_fingerprint(copy) == fp
    cfg["rope_theta"] = 500000.0
    (copy / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_fingerprint(copy) != fp
    assert checkpoint_fingerprint(tiny_model("llama", num_shards=3)) != fp
    assert checkpoint_fingerprint(tiny_model("mistral")) != fp
