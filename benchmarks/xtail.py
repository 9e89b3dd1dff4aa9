"""X-TAIL: cross-domain task-agnostic incremental learning (RAIL, NeurIPS 2024; LADA, ICML 2025).

The ``xtail`` stream is MTIL without CIFAR100 (10 datasets), in X-TAIL's two orders
(order I: MTIL's order I without CIFAR100; order II: LADA's, which is NOT MTIL's order
II), trained few-shot (16 images per class by default; a class with fewer training
images is drawn with replacement, as RAIL's and LADA's code do), evaluated on the full
test sets. Everything else (loading, splits, vocabularies, formats, control set)
is the ``mtil`` stream's: :func:`cl_proxyfda.benchmarks.mtil.build_mtil_datasets`.
A run on it evaluates task-agnostically by default (``eval.task_agnostic``: every
test image over the union of all 10 datasets' class names, no task label; RAIL's
single template ``"a photo of a {}."`` for the union head). Definitions and sources:
docs/xtail.md.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Sequence

import numpy as np
from pydantic import Field

from cl_proxyfda.benchmarks.image_folder import subsample_task
from cl_proxyfda.benchmarks.mtil import MTIL_ORDERS, MTILStreamParams, build_mtil_datasets, mtil_task_names
from cl_proxyfda.benchmarks.stream import StreamData, Subset, dataset_targets
from cl_proxyfda.errors import ConfigError, UserError
from cl_proxyfda.registry import STREAMS

EXCLUDED = "CIFAR100"
XTAIL_ORDERS = {
    # RAIL's configs/analytic_clip.yaml and LADA's configs/data/TAIL.yaml: MTIL's order I without CIFAR100.
    "I": [n for n in MTIL_ORDERS["I"] if n != EXCLUDED],
    # LADA's configs/data/TAIL_order2.yaml (and the column order of its order-II tables).
    "II": ["StanfordCars", "Aircraft", "OxfordPet", "Food", "SUN397", "MNIST", "Flowers", "DTD", "Caltech101", "EuroSAT"],
}
XTAIL_SHOTS = 16  # RAIL's num_shots (and LADA's 16-shot setting)


class XTAILStreamParams(MTILStreamParams):
    """Arguments of the ``xtail`` stream (the ``mtil`` stream's, 16 shots by default)."""

    tasks: Optional[list[str]] = Field(None, description="subset of the 10 datasets (the order's sequence is kept)")
    shots: Optional[int] = Field(XTAIL_SHOTS, ge=1, description="training images per class (16 in RAIL / LADA; null: every image)")


def xtail_task_names(order: str = "I", tasks: list[str] | None = None) -> list[str]:
    """The X-TAIL datasets of an order, optionally restricted to ``tasks`` (order kept)."""
    if tasks is not None and any(t.casefold() == EXCLUDED.casefold() for t in tasks):
        raise ConfigError("stream.tasks", f"{EXCLUDED} is not part of X-TAIL (known: {', '.join(XTAIL_ORDERS[order])})")
    chosen = set(mtil_task_names("I", tasks))  # checks the names (unknown, duplicate)
    return [n for n in XTAIL_ORDERS[order] if n in chosen]


def xtail_shot_indices(targets: Sequence[int], shots: int, seed: int, num_classes: int, task: str = "") -> list[int]:
    """``shots`` training indices per class, seeded. A class with fewer images is drawn
    with replacement, as RAIL's and LADA's ``generate_fewshot_dataset(repeat=True)`` do
    (ZSCL's Flowers train split has 10 images per class). Without a short class the draw
    is exactly :func:`cl_proxyfda.benchmarks.stream.few_shot_indices`'s."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    chosen: list[int] = []
    for c in range(num_classes):
        idx = np.flatnonzero(targets == c)
        if len(idx) == 0:
            raise UserError(f"stream.shots: task {task!r} class {c} has no training images")
        chosen.extend(rng.choice(idx, size=shots, replace=len(idx) < shots).tolist())
    return sorted(chosen)


@STREAMS.register("xtail", XTAILStreamParams, help="X-TAIL: MTIL without CIFAR100, orders I/II, 16-shot; task-agnostic evaluation")
def build_xtail_stream(params: XTAILStreamParams, **context: Any) -> StreamData:
    """Build the X-TAIL tasks (and the optional ImageNet control set)."""
    names = xtail_task_names(params.order, params.tasks)
    if params.shots is None:
        return build_mtil_datasets(params, names)
    full = build_mtil_datasets(params.model_copy(update={"shots": None, "train_limit": None, "test_limit": None}), names)
    tasks = []
    for task in full.tasks:
        shots = xtail_shot_indices(dataset_targets(task.train), params.shots, params.seed, task.num_classes, task.name)
        task = replace(task, train=Subset(task.train, shots))
        tasks.append(subsample_task(task, seed=params.seed, train_limit=params.train_limit, test_limit=params.test_limit))
    return replace(full, tasks=tasks)
