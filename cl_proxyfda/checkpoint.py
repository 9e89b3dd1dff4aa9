"""Run checkpoints: plain state_dicts and JSON-able metadata, written atomically.

A checkpoint holds the model's state_dict, every plugin's state, the results so far,
the RNG states and the index of the next experience. It contains tensors and plain
Python values only, so it loads with ``torch.load(weights_only=True)``; no strategy
object is pickled (Avalanche's dill checkpoints fail on this torch).
"""
from __future__ import annotations

import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_proxyfda.errors import UserError
from cl_proxyfda.io import write_atomic_with

FORMAT_VERSION = 1
_NAME = re.compile(r"^exp_(\d{3,})\.pt$")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``."""
    write_atomic_with(path, lambda handle: torch.save(obj, handle))


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]), "gauss": [int(np_state[3]), float(np_state[4])]},
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"], np_state["gauss"][0], np_state["gauss"][1]))
    random.setstate((state["python_version"], tuple(state["python"]), None))


def checkpoint_path(folder: Path, experience: int) -> Path:
    return folder / f"exp_{experience:03d}.pt"


def save_checkpoint(folder: Path, experience: int, payload: dict[str, Any], keep_last: int = 2) -> Path:
    """Write the checkpoint after ``experience`` (1-based) and prune older ones."""
    path = checkpoint_path(folder, experience)
    atomic_torch_save({"format": FORMAT_VERSION, "experience": experience, **payload, "rng": rng_state()}, path)
    existing = sorted(list_checkpoints(folder))
    for old in existing[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Regular files named ``exp_NNN.pt`` (a FIFO or folder of that name is ignored:
    opening a FIFO would block)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name) and p.is_file())


def _check_rng(state: Any) -> bool:
    if not isinstance(state, dict) or not isinstance(state.get("torch"), torch.Tensor):
        return False
    np_state = state.get("numpy")
    if not isinstance(np_state, dict) or not isinstance(np_state.get("key"), torch.Tensor) or np_state["key"].numel() != 624:
        return False
    gauss = np_state.get("gauss")
    if not isinstance(np_state.get("pos"), int) or not isinstance(gauss, list) or len(gauss) != 2:
        return False
    python = state.get("python")
    return isinstance(python, list) and len(python) == 625 and all(isinstance(v, int) for v in python) and isinstance(state.get("python_version"), int)


def check_checkpoint(data: Any, path: Path) -> dict[str, Any]:
    """The structure of a loaded checkpoint; a hand-edited or foreign one is refused."""
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION or not isinstance(data.get("model"), dict):
        raise UserError(f"checkpoint {path} is not a cl-proxyfda run checkpoint")
    experience = data.get("experience")
    match = _NAME.match(path.name)
    if isinstance(experience, bool) or not isinstance(experience, int) or experience < 1:
        raise UserError(f"checkpoint {path}: 'experience' must be a positive integer (got {experience!r})")
    if match and int(match.group(1)) != experience:
        raise UserError(f"checkpoint {path}: it says experience {experience} but is named for experience {int(match.group(1))}")
    for key, kind in (("plugins", dict), ("results", dict), ("model_name", str)):
        if not isinstance(data.get(key), kind):
            raise UserError(f"checkpoint {path}: '{key}' is missing or not a {kind.__name__}")
    if not _check_rng(data.get("rng")):
        raise UserError(f"checkpoint {path}: the RNG state is missing or malformed")
    return data


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """Load one checkpoint with ``weights_only=True``; errors name the file."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a regular file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, foreign content
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"checkpoint {path} is unreadable or corrupted: {first}") from None
    return check_checkpoint(data, path)


def load_latest_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint; unreadable ones are reported and skipped."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return load_checkpoint_file(path)
        except UserError as exc:
            warnings.warn(f"{exc}; falling back to the previous checkpoint", stacklevel=2)
    return None
