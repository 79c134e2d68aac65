"""A Hugging Face hub cache laid out the way `huggingface_hub` lays it out, from a local checkpoint,
so tests can serve a model by its id with no network (HF_HUB_OFFLINE=1):

    $HF_HOME/hub/models--<org>--<name>/
        blobs/<sha256 of the file>              the files' bytes
        refs/<revision>                         the commit hash (40 hex digits) of that branch or tag
        snapshots/<commit>/<file> -> ../../blobs/<sha256>
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def add_to_hub_cache(hf_home: Path, repo_id: str, checkpoint: Path, revision: str = "main",
                     commit: str | None = None) -> Path:
    """Put `checkpoint`'s files in the cache under `repo_id` at `revision`; returns the snapshot folder."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(checkpoint.iterdir()):
        if not f.is_file():
            continue
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snapshot / f.name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..") / ".." / "blobs" / digest)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
