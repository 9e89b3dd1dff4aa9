"""Write files into a Hugging Face hub cache exactly as huggingface_hub lays it out.

``<cache>/models--ORG--NAME/blobs/<sha256>``, ``snapshots/<commit>/<file>`` (a relative
symlink to the blob) and ``refs/main`` (the commit), so that ``hf_hub_download`` and
``try_to_load_from_cache`` find them offline, as on a machine that downloaded them.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_hub_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """Place ``files`` (relative path -> content) in ``cache`` as repository ``repo_id``; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for rel, content in files.items():
        digest = hashlib.sha256(content).hexdigest()
        (repo / "blobs" / digest).write_bytes(content)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(repo / "blobs" / digest, link.parent))
    return snapshot


def write_hub_folder(cache: Path, repo_id: str, folder: Path) -> Path:
    """Place every file under ``folder`` (e.g. a saved diffusers pipeline) as repository ``repo_id``."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return write_hub_repo(cache, repo_id, files)
