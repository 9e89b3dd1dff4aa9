"""The run-folder contract: which config a folder was written with, whether a path can
be a run folder, and the lock that keeps a second writer out.

- ``config.yaml`` holds the resolved config of the run (:meth:`RunConfig.to_dict`).
  ``--resume`` (and a rerun of ``compare``) continues a folder only when the resolved
  config is the same, up to :data:`RESULT_NEUTRAL_KEYS`: keys that name where or how
  fast a run goes, never what it computes.
- :func:`check_output_folder` turns every unusable output path (a file, a dangling
  symlink, a symlink loop, a name too long, a folder that cannot be created or
  written) into one :class:`UserError` line, before anything is written.
- :class:`FolderLock` holds an exclusive ``fcntl.flock`` on ``<folder>/.lock`` for the
  life of a run (or a comparison); a second writer gets a :class:`UserError`.
"""
from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any, Mapping

import yaml

from cl_proxyfda.config import NAME_MAX_BYTES
from cl_proxyfda.yaml_files import load_yaml_text
from cl_proxyfda.errors import UserError

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"

# Dotted key paths (a section name covers the whole section) that may differ between a
# run and its continuation: output location and name, the device the run is placed on,
# CPU threads, data-loading workers, evaluation batch size, logging and checkpointing.
RESULT_NEUTRAL_KEYS: tuple[str, ...] = (
    "run.name",
    "run.output_dir",
    "run.device",
    "run.threads",
    "train.workers",
    "eval.batch_size",
    "logging",
    "checkpoint",
)


# Keys added to (or removed from) the schema after run folders were written, with the
# value that behaves as runs did without the key: a config that lacks such a key equals
# one that has exactly that value.
ABSENT_KEY_VALUES: dict[str, Any] = {
    "train.teacher_table": False,  # added: false is the former behaviour
    "eval.every_experience": True,  # removed: it was never read
    "strategies[].generator_hidden": 32,  # added: the generator's width before the default became 16
    "strategies[].cache_teacher": False,  # added to zscl (gift always had it): false is the former behaviour
}
"""Keys that older run folders' configs lack (or still have), with the value that means
the same run; ``[]`` stands for any list index."""


def _neutral(path: str, ignore: tuple[str, ...]) -> bool:
    return any(path == key or path.startswith(key + ".") or path.startswith(key + "[") for key in ignore)


def config_differences(old: Any, new: Any, ignore: tuple[str, ...] = RESULT_NEUTRAL_KEYS, path: str = "") -> list[str]:
    """Dotted key paths (``strategies[0].weight``) where two resolved configs differ,
    leaving out ``ignore`` (default :data:`RESULT_NEUTRAL_KEYS`)."""
    if path and _neutral(path, ignore):
        return []
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                present = new[key] if key in new else old[key]
                generic = re.sub(r"\[\d+\]", "[]", sub)
                equivalent = generic in ABSENT_KEY_VALUES and present == ABSENT_KEY_VALUES[generic]
                if not equivalent and not _neutral(sub, ignore):
                    out.append(sub)
            else:
                out.extend(config_differences(old[key], new[key], ignore, sub))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new)):
            out.extend(config_differences(a, b, ignore, f"{path}[{i}]"))
        return out
    return [] if old == new else [path or "(root)"]


def saved_config(folder: Path) -> dict[str, Any] | None:
    """The resolved config a run folder was written with (``None`` when it has none)."""
    path = Path(folder) / CONFIG_FILE
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():
        raise UserError(f"{path}: not a regular file")
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise UserError(f"{path}: cannot read the saved config ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a run config")
    return data


def check_same_config(folder: Path, new: Mapping[str, Any], fallback: Mapping[str, Any] | None = None, what: str = "") -> None:
    """Refuse to continue ``folder`` with a resolved config that differs from the one it
    was written with: its ``config.yaml`` and ``fallback`` (the checkpoint's copy), each
    when present."""
    for old in (saved_config(folder), fallback):
        if old is None:
            continue
        diff = config_differences(dict(old), dict(new))
        if diff:
            shown = ", ".join(diff[:5]) + (f" and {len(diff) - 5} more" if len(diff) > 5 else "")
            raise UserError(
                f"{folder} holds a run{what} with a different config (differs at {shown}); "
                "use the same config to continue it, or choose another folder"
            )


# ------------------------------------------------------------------ output paths
def check_output_folder(out: Path, what: str = "output folder") -> None:
    """One line for every output path that cannot become a writable folder; writes nothing."""
    out = Path(out)
    text = str(out)
    if "\0" in text:
        raise UserError(f"{what}: {text!r} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{what}: {text!r} is not a valid file name") from None
    absolute = Path(os.path.abspath(out))
    if len(os.fsencode(absolute)) >= 4096:
        raise UserError(f"{what}: the path is {len(os.fsencode(absolute))} bytes long (the limit is 4095)")
    for part in absolute.parts:
        if len(os.fsencode(part)) > NAME_MAX_BYTES:
            raise UserError(f"{what}: {part[:40]!r}... is {len(os.fsencode(part))} bytes long, more than a folder name may be ({NAME_MAX_BYTES})")
    folder = absolute
    while True:
        try:
            st = os.stat(folder)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserError(f"{what}: {folder} is a symlink loop") from None
            if folder.is_symlink():
                raise UserError(f"{what}: {folder} is a symlink to {os.readlink(folder)}, which does not exist") from None
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):  # look for the part that exists
                if folder.parent == folder:
                    raise UserError(f"{what}: {out} cannot be created") from None
                folder = folder.parent
                continue
            raise UserError(f"{what}: {folder}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UserError(f"{what}: {folder} exists and is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"{what}: {folder} is not writable" + ("" if folder == absolute else f", so {out} cannot be created"))
        return


def make_output_folder(out: Path, what: str = "output folder") -> None:
    """:func:`check_output_folder`, then create it (errors stay one line)."""
    check_output_folder(out, what)
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{what}: cannot create {out}: {exc.strerror or exc}") from None


# ------------------------------------------------------------------------- lock
class FolderLock:
    """An exclusive, non-blocking ``fcntl.flock`` on ``<folder>/.lock``.

    ``acquire`` raises :class:`UserError` when another process holds it. The lock file
    stays (removing it would let two processes lock two different files); the lock
    itself goes with the process, so a killed run never leaves a folder locked.
    """

    def __init__(self, folder: Path, what: str = "run folder") -> None:
        self.folder, self.what, self.fd = Path(folder), what, None

    def acquire(self) -> "FolderLock":
        import fcntl

        path = self.folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise UserError(f"{self.what}: cannot write in {self.folder}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{self.what}: {self.folder} is in use by another run (locked: {path}); wait for it to finish") from None
            raise UserError(f"{self.what}: cannot lock {path}: {exc.strerror or exc}") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
