"""The bench's cached teacher: the pretrained teacher's embeddings of each batch served
from a per-experience table, looked up by the batch's dataset indices (bench only; core
has no such option). Kept in its own module so that a core service can replace it."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import torch
from avalanche.core import SupervisedPlugin

from cl_proxyfda.errors import UserError
from cl_proxyfda.teacher import TeacherBank
from cl_proxyfda.tools.bench.timing import sync

CACHE_CHECK_TOLERANCE = 1e-4
"""Largest |cached - forward| teacher feature difference accepted by the cache check."""


class BatchIndexRecorder:
    """Wraps the runner's batch-sampler factory; ``current`` holds the dataset indices of
    the batch the data loader drew last (exact with ``train.workers: 0``, no prefetching)."""

    def __init__(self, factory: Callable[[int, list[int], int], Any]) -> None:
        self.factory = factory
        self.current: list[int] | None = None

    def __call__(self, exp_index: int, targets: list[int], iterations: int) -> Any:
        return _RecordingSampler(self.factory(exp_index, targets, iterations), self)


class _RecordingSampler:
    def __init__(self, sampler: Any, recorder: BatchIndexRecorder) -> None:
        self.sampler, self.recorder = sampler, recorder

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            self.recorder.current = [int(i) for i in batch]
            yield batch

    def __len__(self) -> int:
        return len(self.sampler)


class IndexedTeacherBank(TeacherBank):
    """A TeacherBank that serves the ``pretrained`` reference's final embeddings of the
    current batch from a table computed once per experience (eval transform, dataset
    order), looked up by the batch's dataset indices. Anything else (other references,
    intermediate layers) falls back to a teacher forward.

    With ``train.augment: false`` the batch is the eval-transformed images, so a served
    row equals the teacher forward it replaces; ``verify`` runs that forward as well and
    records the largest difference (the bench checks it while priming).
    """

    def __init__(self, base: TeacherBank, recorder: BatchIndexRecorder) -> None:
        super().__init__(initial_state=base.initial_state, half=base.half)
        self.models = base.models
        self.recorder = recorder
        self.table: torch.Tensor | None = None
        self.verify = False
        self.max_difference = 0.0
        self.served = 0
        self.forwarded = 0
        self.precompute_seconds: list[float] = []

    def fill(self, strategy: Any, batch_size: int = 256) -> None:
        """Compute the table for the current experience's training set."""
        sync(strategy.device)
        t0 = time.perf_counter()
        teacher = self.get(strategy.model, "pretrained")
        dataset = strategy.experience.dataset.eval()
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
        param = next(teacher.parameters())
        feats = []
        with torch.no_grad():
            for batch in loader:
                feats.append(teacher.encode_image(batch[0].to(param.device, param.dtype)).float())
        self.table = torch.cat(feats)
        sync(strategy.device)
        self.precompute_seconds.append(time.perf_counter() - t0)

    def outputs(self, strategy: Any, reference: str, layers: Any = ()) -> dict[str, Any]:
        idx = self.recorder.current
        usable = reference == "pretrained" and not tuple(layers) and self.table is not None and idx is not None and len(idx) == strategy.mb_x.shape[0]
        if not usable:
            self.forwarded += 1
            return super().outputs(strategy, reference, layers)
        assert self.table is not None and idx is not None
        embeds = self.table[torch.as_tensor(idx, device=self.table.device)]
        self.served += 1
        if self.verify:
            real = super().outputs(strategy, reference, layers)["image_embeds"]
            self.max_difference = max(self.max_difference, float((real - embeds).abs().max()))
        return {"image_embeds": embeds, "layers": {}}


class _FillTeacherTable(SupervisedPlugin):
    """Fills the IndexedTeacherBank at the start of every experience (first plugin)."""

    def __init__(self, bank: IndexedTeacherBank) -> None:
        super().__init__()
        self.bank = bank

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.bank.fill(strategy)


def use_cached_teacher(run: Any) -> IndexedTeacherBank:
    """Replace the run's TeacherBank by an IndexedTeacherBank (bench only; see the class)."""
    if run.config.train.workers != 0:
        raise UserError("bench: a cached teacher needs train.workers: 0 (the batch indices are read from the sampler)")
    if run.config.train.augment:
        raise UserError("bench: a cached teacher needs train.augment: false (the table holds eval-transform features)")
    recorder = BatchIndexRecorder(run.strategy.batch_sampler_factory)
    run.strategy.batch_sampler_factory = recorder
    bank = IndexedTeacherBank(run.strategy.teachers, recorder)
    run.strategy.teachers = bank
    run.strategy.plugins.insert(0, _FillTeacherTable(bank))
    return bank
