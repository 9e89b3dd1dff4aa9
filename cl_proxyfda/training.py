"""The Avalanche strategy the runner trains with.

``CLStrategy`` is Avalanche's ``SupervisedTemplate`` with four project rules:
- a fixed number of optimizer steps per experience, drawn by a seeded batch sampler
  (uniform, or class-balanced m x n with hard class mining);
- a fresh optimizer (AdamW/SGD over the trainable parameters only, per-task learning
  rate) and a warm-up + cosine schedule per experience;
- gradient clipping, and a NaN/inf guard naming the experience, iteration and terms;
- class heads recomputed after each step when the text tower trains.

Services the strategy holds for its plugins and its sampler are typed fields with a
default for a strategy built by hand: ``teachers`` (:class:`~cl_proxyfda.teacher.TeacherBank`,
the frozen references; :func:`~cl_proxyfda.teacher.teacher_bank` on any Avalanche
strategy), ``class_similarity`` (:class:`ClassSimilarity`, read by the batch sampler;
:func:`class_similarity_of`) and ``synthetic`` (the synthetic-loss channel,
:class:`~cl_proxyfda.synthetic_terms.SyntheticChannel`; :func:`~cl_proxyfda.synthetic_terms.synthetic_channel`).
Its ``criterion()`` obeys the strategy's ``criterion_gate``
(:mod:`cl_proxyfda.criterion_gate`): plugins whose own loss replaces the criterion on
some batches (Infusing) mute it there.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.utils.data import DataLoader, default_collate

from cl_proxyfda.criterion_gate import GatedCriterion
from cl_proxyfda.device import autocast_to
from cl_proxyfda.distributed import DistContext, ShardedBatches
from cl_proxyfda.errors import TrainingDiverged
from cl_proxyfda.services import service_of
from cl_proxyfda.synthetic_terms import SyntheticChannel
from cl_proxyfda.teacher import TeacherBank, unwrap


def warmup_cosine(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning-rate multiplier at ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class ClassSimilarity:
    """The class similarity of each experience, for the hard-mined class-balanced sampler.

    ``set(experience, matrix)`` stores a ``(C, C)`` similarity of the experience's classes,
    indexed by label value (the runner stores ``class_mean_similarity`` of pre-trained
    features before the experience trains, with ``train.hard_class_mining``);
    ``get(experience)`` is what the sampler mines with, ``None`` for an experience without
    one (then classes are drawn uniformly). Empty by default.
    """

    def __init__(self) -> None:
        self._matrices: dict[int, np.ndarray] = {}

    def set(self, experience: int, matrix: Any) -> None:
        """Store the similarity of ``experience``'s classes (replaces an earlier one)."""
        sim = np.asarray(matrix, dtype=np.float64)
        if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
            raise ValueError(f"class similarity of experience {experience} must be a square matrix, got shape {sim.shape}")
        self._matrices[int(experience)] = sim

    def get(self, experience: int) -> np.ndarray | None:
        """The similarity of ``experience``'s classes, or ``None`` when none was set."""
        return self._matrices.get(int(experience))

    def __contains__(self, experience: object) -> bool:
        return experience in self._matrices

    def __len__(self) -> int:
        return len(self._matrices)


def class_similarity_of(strategy: Any) -> ClassSimilarity:
    """The strategy's class-similarity service (an empty one is attached to a strategy
    that has none, such as a bare Avalanche ``SupervisedTemplate``)."""
    return service_of(strategy, "class_similarity", ClassSimilarity)


class WithIndex(torch.utils.data.Dataset):
    """A dataset whose items ``(x, y, ..., t)`` gain their index before the task label:
    ``(x, y, ..., index, t)`` (Avalanche reads the task label from the last position)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> list[Any]:
        item = list(self.dataset[index])
        return item[:-1] + [index, item[-1]]


class CollateWithIndex:
    """Collates ``WithIndex`` items: the dataset's own collate on the items without their
    index, then the indices as a tensor before the task labels (a class, so that data
    loader workers can pickle it)."""

    def __init__(self, collate: Callable[[list[Any]], Any] | None) -> None:
        self.collate = collate or default_collate

    def __call__(self, items: list[Any]) -> list[Any]:
        indices = torch.tensor([item[-2] for item in items], dtype=torch.long)
        batch = list(self.collate([item[:-2] + item[-1:] for item in items]))
        return batch[:-1] + [indices, batch[-1]]


class CLStrategy(GatedCriterion, SupervisedTemplate):
    """SupervisedTemplate with per-experience step budgets, samplers and schedules.

    Args beyond Avalanche's: ``lr_for_experience(i) -> lr``, ``iterations_for(n_items)``,
    ``batch_sampler(experience_index, targets, iterations, class_similarity) -> iterable
    of index lists`` (``class_similarity``: the experience's matrix from the
    ``class_similarity`` service, or ``None``), ``class_similarity`` (the service; an
    empty :class:`ClassSimilarity` by default), ``teachers`` (a default ``TeacherBank``:
    references copied from the model when first asked for).
    """

    class_similarity: ClassSimilarity
    teachers: TeacherBank
    synthetic: SyntheticChannel

    def __init__(
        self,
        *,
        model: nn.Module,
        criterion: nn.Module,
        train_mb_size: int,
        plugins: Sequence[Any],
        device: torch.device,
        lr_for_experience: Callable[[int], float],
        iterations_for: Callable[[int], int],
        batch_sampler: Callable[[int, list[int], int, np.ndarray | None], Iterable[list[int]]],
        optimizer: str = "adamw",
        weight_decay: float = 0.0,
        warmup: int = 0,
        schedule: str = "cosine",
        grad_clip: float | None = None,
        workers: int = 0,
        num_experiences: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        dist_context: DistContext | None = None,
        batch_indices: bool = False,
        class_similarity: ClassSimilarity | None = None,
        teachers: TeacherBank | None = None,
    ) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        placeholder = torch.optim.SGD(params, lr=1.0)
        super().__init__(
            model=model,
            optimizer=placeholder,
            criterion=criterion,
            train_mb_size=train_mb_size,
            train_epochs=1,
            eval_mb_size=train_mb_size,
            device=device,
            plugins=list(plugins),
            evaluator=None,
        )
        self.lr_for_experience = lr_for_experience
        self.iterations_for = iterations_for
        self.batch_sampler_factory = batch_sampler
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.warmup = warmup
        self.schedule = schedule
        self.grad_clip = grad_clip
        self.workers = workers
        self.num_experiences = num_experiences
        self.autocast_dtype = autocast_dtype
        self.dist = dist_context or DistContext()
        self.batch_indices = batch_indices
        self.class_similarity = class_similarity if class_similarity is not None else ClassSimilarity()
        self.teachers = teachers if teachers is not None else TeacherBank()
        self.synthetic = SyntheticChannel()
        self.experience_index = 0
        self.total_steps = 0
        self.base_lr = 0.0

    # ------------------------------------------------------------ data, optim
    def make_train_dataloader(self, num_workers: int = 0, shuffle: bool = True, pin_memory: Any = None, persistent_workers: bool = False, drop_last: bool = False, **kwargs: Any) -> None:
        dataset = self.adapted_dataset
        targets = [int(t) for t in dataset.targets]
        self.experience_index = int(self.experience.current_experience)
        self.total_steps = self.iterations_for(len(dataset))
        similarity = self.class_similarity.get(self.experience_index)
        sampler = self.batch_sampler_factory(self.experience_index, targets, self.total_steps, similarity)
        if self.dist.enabled:
            sampler = ShardedBatches(sampler, self.dist)
        collate = getattr(dataset, "collate_fn", None)
        if self.batch_indices:
            dataset, collate = WithIndex(dataset), CollateWithIndex(collate)
        self.dataloader = DataLoader(dataset, batch_sampler=sampler, num_workers=self.workers, collate_fn=collate, pin_memory=self.device.type == "cuda")

    @property
    def mb_indices(self) -> torch.Tensor | None:
        """Dataset indices of the current training mini-batch (with ``batch_indices=True``;
        they travel inside the batch, so they are right with any number of workers)."""
        if not self.batch_indices or not self.is_training or self.mbatch is None or len(self.mbatch) < 4:
            return None
        return self.mbatch[-2]

    def make_optimizer(self, **kwargs: Any) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.base_lr = self.lr_for_experience(self.experience_index)
        if self.optimizer_name == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=self.base_lr, momentum=0.9, weight_decay=self.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=self.base_lr, weight_decay=self.weight_decay)
        self._set_lr(0)

    def check_model_and_optimizer(self, **kwargs: Any) -> None:
        self.model = self.model_adaptation()
        self.make_optimizer(**kwargs)

    def _set_lr(self, step: int) -> None:
        factor = warmup_cosine(step, self.total_steps, self.warmup, self.schedule)
        for group in self.optimizer.param_groups:  # groups added by plugins carry their own base_lr
            group["lr"] = group.get("base_lr", self.base_lr) * factor

    # ---------------------------------------------------------------- steps
    def forward(self) -> Any:
        # Always pass the task labels (Avalanche's avalanche_forward would drop them for a
        # DDP-wrapped model, which is not a MultiTaskModule itself).
        with autocast_to(self.device, self.autocast_dtype):
            return self.model(self.mb_x, self.mb_task_id)

    def backward(self) -> None:
        loss = self.loss
        if not torch.isfinite(loss).all():
            terms = {}
            for p in self.plugins:
                terms.update(getattr(p, "loss_terms", {}))
            described = ", ".join(f"{k}={v:.4g}" for k, v in sorted(terms.items())) or "no plugin terms"
            raise TrainingDiverged(
                f"loss became {float(loss.detach())} at experience {self.experience_index + 1}, "
                f"iteration {self.clock.train_exp_iterations + 1} (plugin terms: {described})"
            )
        super().backward()

    def optimizer_step(self) -> None:
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.grad_clip)
        super().optimizer_step()

    def _after_update(self, **kwargs: Any) -> None:
        model = unwrap(self.model)
        if getattr(model, "text_trainable", False):
            model.text_changed()
        self._set_lr(self.clock.train_exp_iterations + 1)
        super()._after_update(**kwargs)
