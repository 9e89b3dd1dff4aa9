"""Tasks and streams: the data side of a run, independent of Avalanche.

A ``Task`` carries its name, class names, prompt templates and two map-style datasets
that yield ``(PIL.Image, int label)``. ``to_avalanche`` turns a list of tasks into an
Avalanche benchmark with task labels (experience i has task label i), applying the
model's train/eval transforms.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from cl_proxyfda.errors import UserError
from cl_proxyfda.models import TaskVocabulary


@dataclass
class Task:
    """One task of a stream: vocabulary plus train/test data yielding (PIL image, label)."""

    name: str
    classnames: list[str]
    templates: list[str]
    train: Dataset
    test: Dataset
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.classnames:
            raise UserError(f"task {self.name!r}: empty class list")
        if not self.templates:
            raise UserError(f"task {self.name!r}: no prompt templates")
        for t in self.templates:
            if "{}" not in t and "{c}" not in t:
                raise UserError(f"task {self.name!r}: template {t!r} has no '{{}}' placeholder")
        self.templates = [t.replace("{c}", "{}") for t in self.templates]

    @property
    def vocabulary(self) -> TaskVocabulary:
        return TaskVocabulary(self.name, list(self.classnames), list(self.templates))

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def dataset_targets(ds: Dataset) -> list[int]:
    """Labels of a dataset without decoding images when the dataset exposes them."""
    for attr in ("targets", "labels"):
        values = getattr(ds, attr, None)
        if values is not None:
            return [int(v) for v in values]
    return [int(ds[i][1]) for i in range(len(ds))]  # type: ignore[arg-type]


class ArrayImageDataset(Dataset):
    """In-memory uint8 images (N, H, W, 3) with labels, yielding (PIL image, label)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int]) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images = images
        self.targets = [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]), self.targets[i]


class Subset(Dataset):
    """A subset that keeps ``targets`` visible (torch's Subset hides them)."""

    def __init__(self, base: Dataset, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        base_targets = dataset_targets(base)
        self.targets = [base_targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]


def few_shot_indices(targets: Sequence[int], shots: int, seed: int, num_classes: int, task: str = "") -> list[int]:
    """Indices of ``shots`` examples per class, drawn with a seeded generator."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    chosen: list[int] = []
    for c in range(num_classes):
        idx = np.flatnonzero(targets == c)
        if len(idx) < shots:
            raise UserError(f"stream.shots: {shots} shots asked but task {task!r} class {c} has only {len(idx)} training images")
        chosen.extend(rng.choice(idx, size=shots, replace=False).tolist())
    return sorted(chosen)


def to_avalanche(tasks: Sequence[Task], train_transform: Callable, eval_transform: Callable) -> Any:
    """An Avalanche benchmark (train/test streams with task labels) from tasks."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_classification_dataset

    def wrap(ds: Dataset, t: int, group: str) -> Any:
        return _make_taskaware_classification_dataset(
            ds,
            task_labels=t,
            targets=dataset_targets(ds),
            transform_groups={"train": (train_transform, None), "eval": (eval_transform, None)},
            initial_transform_group=group,
        )

    train = [wrap(task.train, t, "train") for t, task in enumerate(tasks)]
    test = [wrap(task.test, t, "eval") for t, task in enumerate(tasks)]
    return with_task_labels(benchmark_from_datasets(train=train, test=test))


def check_unique_names(tasks: Sequence[Task]) -> None:
    seen: set[str] = set()
    for t in tasks:
        if t.name in seen:
            raise UserError(f"stream: duplicate task name {t.name!r}")
        seen.add(t.name)


@dataclass
class StreamData:
    """What a stream builder returns: the ordered tasks and an optional control set.

    The control set is a task of concepts never trained in the stream; its zero-shot
    accuracy at every row of the accuracy matrix is the control retention.
    ``reference_images`` optionally lists generic images (e.g. base-world images) for
    methods that need unlabelled reference data (ZSCL, Infusing).
    """

    tasks: list[Task]
    control: Task | None = None
    reference: Dataset | None = None
    base_concepts: list[str] = field(default_factory=list)
