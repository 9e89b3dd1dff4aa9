"""Shared test set-up: offline everything, tiny data written by the tests themselves."""
from __future__ import annotations

import os

# One CPU thread per process: the models here are tiny, and on a busy 2-core machine
# OpenMP threads of concurrent processes thrash (10-50x slower steps were measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# W&B keeps artifact staging, cache and settings outside the run folder: keep them in tmp.
import tempfile  # noqa: E402

_wandb_home = tempfile.mkdtemp(prefix="clpfda-wandb-")
for _var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
    os.environ.setdefault(_var, os.path.join(_wandb_home, _var.lower()))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from cl_proxyfda.benchmarks.colour_folders import PALETTE, write_image_folder_stream  # noqa: E402,F401

TINY_TASKS = {"warm": ["red", "orange", "yellow"], "cool": ["blue", "cyan", "green"], "mixed": ["purple", "gray"]}


@pytest.fixture(scope="session")
def tiny_pipe(tmp_path_factory) -> Path:
    """A real tiny Stable Diffusion pipeline saved to disk (built once per session)."""
    from cl_proxyfda.generators.diffusers_backend import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipe", seed=0)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """The tiny colour stream, shared read-only by a session's tests."""
    return write_image_folder_stream(tmp_path_factory.mktemp("stream") / "data", TINY_TASKS)


@pytest.fixture
def tiny_stream_root(tmp_path: Path) -> Path:
    return write_image_folder_stream(tmp_path / "data", TINY_TASKS)


def tiny_config(root: Path, out: Path, **sections: dict) -> dict:
    """A complete run config (as a mapping) for the tiny image-folder stream."""
    cfg = {
        "run": {"name": "tiny", "seed": 0, "device": "cpu", "output_dir": str(out)},
        "model": {"name": "cl-test-tiny", "pretrained": None},
        "stream": {"name": "image_folder", "root": str(root), "tasks": list(TINY_TASKS)},
        "train": {"lr": 1e-3, "iterations": 3, "batch_size": 8},
        "strategies": [{"name": "naive"}],
        "eval": {"batch_size": 64},
        "logging": {"wandb": {"mode": "disabled"}, "plots": False, "progress": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg
