"""Shared test set-up: offline everything, tiny data written by the tests themselves."""
from __future__ import annotations

import os

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

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

# Distinct, easy colours per class so that a tiny model can learn them in a few steps.
PALETTE = {
    "red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
    "purple": (150, 40, 200), "cyan": (30, 210, 220), "orange": (240, 140, 20), "gray": (128, 128, 128),
}


def write_image_folder_stream(root: Path, tasks: dict[str, list[str]], train_per_class: int = 6, test_per_class: int = 4, size: int = 32, seed: int = 0) -> Path:
    """Write root/TASK/{train,test}/CLASS/*.png with noisy solid-colour images."""
    rng = np.random.default_rng(seed)
    for task, classes in tasks.items():
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for cname in classes:
                folder = root / task / split / cname
                folder.mkdir(parents=True, exist_ok=True)
                base = np.array(PALETTE[cname], dtype=np.float32)
                for i in range(count):
                    img = np.clip(base + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(img).save(folder / f"{i}.png")
    return root


TINY_TASKS = {"warm": ["red", "orange", "yellow"], "cool": ["blue", "cyan", "green"], "mixed": ["purple", "gray"]}


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
