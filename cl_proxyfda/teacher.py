"""Frozen reference models shared by all plugins of a strategy.

Two references exist: ``pretrained`` (the model before any training) and ``previous``
(the model at the start of the current experience). Each is a frozen copy of the task
model, created on first use. ``teacher_outputs`` runs one teacher forward per batch and
reference, whatever number of plugins ask for it (the result is cached on the strategy
under the training-iteration counter).

With ``table=True`` (``train.teacher_table``) a reference's final image embeddings of
the current experience's training images are computed once, in dataset order, on first
use in the experience, and each batch's rows are then looked up by the dataset indices
the batch carries (``CLStrategy.mb_indices``), with no teacher forward. This is exact
only when the training batches are eval-transformed (``train.augment: false``, which the
config enforces). Requests for intermediate layers still run the teacher.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from cl_proxyfda.services import service_of

REFERENCES = ("pretrained", "previous")


def unwrap(model: nn.Module) -> nn.Module:
    """The task model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


class TeacherBank:
    """Holds the frozen references of one strategy and a per-batch output cache."""

    def __init__(self, initial_state: dict[str, Tensor] | None = None, half: bool = False, table: bool = False, table_batch_size: int = 256) -> None:
        self.initial_state = initial_state
        self.half = half
        self.table = table
        self.table_batch_size = table_batch_size
        self.models: dict[str, nn.Module] = {}
        self._cache_key: Any = None
        self._cache: dict[str, dict[str, Any]] = {}
        self._tables: dict[tuple[str, int], Tensor] = {}
        self.forward_count = 0
        self.served_count = 0  # batches served from a table
        self.table_mb = 0.0  # largest table held (MB)
        self.table_seconds: list[float] = []  # time to compute each table

    def _freeze(self, model: nn.Module) -> nn.Module:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if self.half and next(model.parameters()).is_cuda:
            model.half()
        return model

    def get(self, student: nn.Module, reference: str) -> nn.Module:
        """The frozen model for ``reference`` (created from the student if missing)."""
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        if reference not in self.models:
            teacher = copy.deepcopy(unwrap(student))
            if reference == "pretrained" and self.initial_state is not None:
                teacher.load_state_dict(self.initial_state)
            self.models[reference] = self._freeze(teacher)
        return self.models[reference]

    def refresh_previous(self, student: nn.Module) -> None:
        """Make ``previous`` a copy of the student now (start of an experience)."""
        if "previous" in self.models:
            self.models["previous"].load_state_dict(unwrap(student).state_dict())
            self.models["previous"].text_changed()
        else:
            self.models["previous"] = self._freeze(copy.deepcopy(unwrap(student)))
        self._cache.clear()
        self._cache_key = None

    def _table_for(self, strategy: Any, reference: str) -> Tensor:
        """Final image embeddings of ``reference`` for every training image of the current
        experience, in dataset order (computed on first use in each experience)."""
        key = (reference, int(strategy.experience.current_experience))
        if key not in self._tables:
            self._tables = {k: v for k, v in self._tables.items() if k[1] == key[1]}  # drop earlier experiences'
            start = time.perf_counter()
            teacher = self.get(strategy.model, reference)
            param = next(teacher.parameters())
            loader = torch.utils.data.DataLoader(
                strategy.adapted_dataset, batch_size=self.table_batch_size, shuffle=False, num_workers=getattr(strategy, "workers", 0),
                collate_fn=getattr(strategy.adapted_dataset, "collate_fn", None),
            )
            rows = []
            with torch.no_grad():
                for batch in loader:
                    rows.append(teacher.encode_image(batch[0].to(param.device, param.dtype)).float())
            self._tables[key] = torch.cat(rows)
            if self._tables[key].is_cuda:
                torch.cuda.synchronize(self._tables[key].device)
            self.table_seconds.append(time.perf_counter() - start)
            self.table_mb = max(self.table_mb, sum(t.numel() * t.element_size() for t in self._tables.values()) / 2**20)
        return self._tables[key]

    def outputs(self, strategy: Any, reference: str, layers: Iterable[str] = ()) -> dict[str, Any]:
        """Teacher features of the current mini-batch: ``image_embeds`` and ``layers``.

        One forward per batch and reference: the teacher records every layer any plugin
        asked for (the union), so plugins needing different layers share it.
        """
        key = (id(strategy.mb_x), strategy.clock.train_iterations)
        if key != self._cache_key:
            self._cache_key = key
            self._cache.clear()
        wanted = set(layers)
        hit = self._cache.get(reference)
        if hit is not None and wanted <= set(hit["layers"]):
            return hit
        indices = getattr(strategy, "mb_indices", None) if self.table and not wanted else None
        if indices is not None:  # the table's rows for this batch: no teacher forward
            table = self._table_for(strategy, reference)
            out = {"image_embeds": table[indices.to(table.device)], "layers": {}}
            self.served_count += 1
            self._cache[reference] = out
            return out
        teacher = self.get(strategy.model, reference)
        teacher.capture_layers(sorted(wanted))  # names already recorded: nothing to do
        x = strategy.mb_x
        with torch.no_grad():
            param = next(teacher.parameters())
            feats = teacher.image_features(x.to(param.dtype))
        self.forward_count += 1
        out = {"image_embeds": feats["image_embeds"].float(), "layers": {k: v.float() for k, v in feats["layers"].items()}}
        self._cache[reference] = out
        return out


def teacher_bank(strategy: Any) -> TeacherBank:
    """The strategy's shared TeacherBank (created on first use)."""
    return service_of(strategy, "teachers", TeacherBank)


def teacher_outputs(strategy: Any, reference: str = "pretrained", layers: Iterable[str] = ()) -> dict[str, Any]:
    """Shortcut: the shared teacher features of the current batch."""
    return teacher_bank(strategy).outputs(strategy, reference, layers)


def student_outputs(strategy: Any) -> dict[str, Any]:
    """The student's features of the current batch, recorded by its forward:
    ``unwrap(strategy.model).last_features()`` (``image_embeds``, ``layers``)."""
    return unwrap(strategy.model).last_features()
