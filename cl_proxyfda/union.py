"""Task-agnostic (X-TAIL) evaluation: one class vocabulary for the whole stream.

With ``eval.task_agnostic`` every test image of every task is classified over the
UNION of the class names of all tasks of the stream (seen and unseen), with no task
label, as in the X-TAIL setting of RAIL (Xu et al., NeurIPS 2024) and LADA (ICML 2025).

- The union keeps the stream order: the classes of task 0, then the classes of task 1
  that are new, and so on. A class name that several tasks share (exact string match)
  is ONE union class; an image of any of those tasks is correct when it is predicted
  as that class.
- Each union class has one text embedding. ``templates: task`` (the default): the class
  row of the per-task head of the FIRST task that names it (that task's template
  ensemble, learned prompts included), so for a stream without shared names the union
  head is the per-task heads stacked, and task-agnostic errors are exactly the
  cross-task confusions. ``templates: single``: every class with the one template
  ``"a photo of a {}."``, as RAIL's official code builds its union head.
- An image is correct iff the arg-max union class is its true class name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

from cl_proxyfda.models import TaskVocabulary

UnionTemplates = Literal["task", "single"]
# RAIL's union head (primal_RAIL.py / dual_RAIL.py: ``template = ['a photo of a {}.']``).
SINGLE_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class UnionVocabulary:
    """The merged class list of a stream and where each task's labels land in it.

    ``classnames[j]``: union class j. ``source[j]``: (task, label) of its first
    occurrence, whose head row is its embedding under ``templates: task``.
    ``task_maps[t][y]``: union index of label ``y`` of task ``t``.
    """

    classnames: tuple[str, ...]
    source: tuple[tuple[int, int], ...]
    task_maps: tuple[tuple[int, ...], ...]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def shared(self) -> dict[str, list[int]]:
        """Class names that more than one task uses -> the tasks using them."""
        users: dict[int, list[int]] = {}
        for t, mapping in enumerate(self.task_maps):
            for j in dict.fromkeys(mapping):
                users.setdefault(j, []).append(t)
        return {self.classnames[j]: ts for j, ts in users.items() if len(ts) > 1}


def build_union(vocabularies: Sequence[TaskVocabulary]) -> UnionVocabulary:
    """Merge the class names of ``vocabularies`` (identical names become one class)."""
    index: dict[str, int] = {}
    names: list[str] = []
    source: list[tuple[int, int]] = []
    maps: list[tuple[int, ...]] = []
    for t, vocab in enumerate(vocabularies):
        mapping = []
        for y, name in enumerate(vocab.classnames):
            if name not in index:
                index[name] = len(names)
                names.append(name)
                source.append((t, y))
            mapping.append(index[name])
        maps.append(tuple(mapping))
    return UnionVocabulary(tuple(names), tuple(source), tuple(maps))


def union_head_from_task_heads(union: UnionVocabulary, heads: Sequence[Tensor] | Mapping[int, Tensor]) -> Tensor:
    """``templates: task``: row j is row ``label`` of the head of the task that first names class j."""
    return torch.stack([heads[t][y] for t, y in union.source])


def union_correct(union_logits: Tensor, labels: Tensor, task_map: Sequence[int]) -> int:
    """How many images' arg-max union class (columns of ``union_logits``) is their true
    class ``task_map[label]``."""
    pred = union_logits.argmax(dim=1).cpu()
    truth = torch.as_tensor(task_map, dtype=torch.long)[labels.cpu().long()]
    return int((pred == truth).sum())


__all__ = ["UnionVocabulary", "build_union", "union_head_from_task_heads", "union_correct", "SINGLE_TEMPLATE", "UnionTemplates"]
