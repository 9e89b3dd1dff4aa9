"""Atomic file writes: the one place that writes a file so that readers (and a killed
run) see either the old content or the new, never a partial file.

A temp file is written in the target's folder, flushed and ``os.fsync``-ed, then
renamed over the target with ``os.replace``; on any failure the temp file is removed.
"""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["write_atomic", "write_atomic_with", "safe_name"]


def _temp_path(path: Path, tmp_name: str | None) -> Path:
    name = tmp_name or f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    return path.parent / name


def write_atomic_with(path: str | Path, writer: Callable[[BinaryIO], None], tmp_name: str | None = None) -> Path:
    """Call ``writer(handle)`` on a temp file beside ``path``, fsync, then rename it over
    ``path``; the temp file is removed on failure. ``tmp_name``: the temp file's name in
    the same folder (default: hidden, unique per call). Creates the folder; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, tmp_name)
    try:
        with open(tmp, "wb") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_atomic(path: str | Path, data: str | bytes, tmp_name: str | None = None) -> Path:
    """Write ``data`` (``str`` as UTF-8) to ``path`` atomically (see :func:`write_atomic_with`)."""
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)

    def write(handle: BinaryIO) -> None:
        handle.write(payload)

    return write_atomic_with(path, write, tmp_name)


def safe_name(name: str) -> str:
    """A file-name stem from any name: runs of other characters than ``\\w`` and ``-``
    become ``_`` (``"matrix"`` when nothing is left)."""
    return re.sub(r"[^\w\-]+", "_", name).strip("_") or "matrix"
