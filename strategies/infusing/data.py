"""Infusing's data: the generic image set, indexed views of it, the stratified split."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from cl_proxyfda.errors import UserError


def task_id_of(strategy: Any) -> int:
    """The task label of the experience being trained."""
    labels = getattr(strategy.experience, "task_labels", None) or [0]
    return int(labels[0])


class IndexedImages(Dataset):
    """``(transform(image), position)`` for the items at ``positions`` of ``items``.

    ``base`` yields ``(PIL image, label)``; ``items[p]`` is the base index of position p,
    so that per-item tensors (targets, labels) are indexed by position.
    """

    def __init__(self, base: Dataset, items: Sequence[int], positions: Sequence[int], transform: Callable) -> None:
        self.base, self.items, self.positions, self.transform = base, list(items), list(positions), transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        pos = self.positions[i]
        image = self.base[self.items[pos]][0]
        return self.transform(image), pos


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded class-stratified (train, val) indices: ``round(fraction * n_c)`` per class,
    at least one when the class has two or more items, never the class's last item."""
    rng = np.random.default_rng(seed)
    y = np.asarray(targets)
    val: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2 or fraction <= 0:
            continue
        k = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        val.extend(rng.choice(idx, size=k, replace=False).tolist())
    val_set = set(val)
    return [i for i in range(len(y)) if i not in val_set], sorted(val)


def folder_images(root: str | Path) -> Dataset:
    """Every image under ``root`` (recursive), labelled by its parent folder."""
    from cl_proxyfda.benchmarks.image_folder import ImageFileDataset, list_images

    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise UserError(f"infusing generic.root: folder {folder} does not exist")
    paths = list_images(folder)
    if not paths:
        raise UserError(f"infusing generic.root: no images under {folder}")
    parents = sorted({str(p.parent.relative_to(folder)) for p in paths})
    label = {name: i for i, name in enumerate(parents)}
    return ImageFileDataset(paths, [label[str(p.parent.relative_to(folder))] for p in paths])


def generic_dataset(source: str, root: str | None, stream: Any) -> Dataset:
    """The generic image set: the stream's reference images, its control test set, or a folder."""
    if source == "folder":
        if root is None:
            raise UserError("infusing generic.root: source 'folder' needs a root folder")
        return folder_images(root)
    if source == "reference":
        ref = getattr(stream, "reference", None)
        if ref is None or len(ref) == 0:
            raise UserError("infusing generic.source: the stream provides no reference images; use source: folder with a root")
        return ref
    if source == "control":
        control = getattr(stream, "control", None)
        if control is None or len(control.test) == 0:
            raise UserError("infusing generic.source: the stream has no control set; use source: folder with a root")
        return control.test
    raise UserError(f"infusing generic.source: unknown source {source!r} (use reference, control, folder)")
