"""A tiny image-folder stream of noisy solid colours, written to disk on demand.

Used where a real stream must exist on disk but no data can be downloaded: the test
suite and the ``bench`` command's fallback when the demo stream is not wanted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Distinct, easy colours per class so that a tiny model can learn them in a few steps.
PALETTE = {
    "red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
    "purple": (150, 40, 200), "cyan": (30, 210, 220), "orange": (240, 140, 20), "gray": (128, 128, 128),
}


def write_image_folder_stream(root: Path, tasks: dict[str, list[str]], train_per_class: int = 6, test_per_class: int = 4, size: int = 32, seed: int = 0) -> Path:
    """Write ``root/TASK/{train,test}/CLASS/*.png`` with noisy solid-colour images."""
    rng = np.random.default_rng(seed)
    for task, classes in tasks.items():
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for cname in classes:
                folder = Path(root) / task / split / cname
                folder.mkdir(parents=True, exist_ok=True)
                base = np.array(PALETTE[cname], dtype=np.float32)
                for i in range(count):
                    img = np.clip(base + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(img).save(folder / f"{i}.png")
    return Path(root)
