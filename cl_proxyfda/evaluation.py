"""Zero-shot evaluation of the task model on every task of a stream.

One row of the accuracy matrix = top-1 accuracy (%) on each task's test set, each task
scored with its own class vocabulary. Preprocessed test inputs are kept in memory when
they fit the budget (the eval transform is deterministic), so rows after the first cost
one forward pass over the test sets and nothing else.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cl_proxyfda.device import autocast_to
from cl_proxyfda.distributed import DistContext, sum_across
from cl_proxyfda.teacher import unwrap


class _Transformed(Dataset):
    """``(transform(item[0]), int(item[1]))``; items already transformed pass as they are
    (``transform`` None), and fields after the label (a task label) are left out."""

    def __init__(self, base: Dataset, transform: Callable | None) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        item = self.base[i]
        x = item[0] if self.transform is None else self.transform(item[0])
        return x, int(item[1])


def keep_if_fits(batches: Iterable[tuple[Tensor, Tensor]], budget_bytes: float, keep: Callable[[Tensor, Tensor], None]) -> Iterator[tuple[Tensor, Tensor]]:
    """Pass ``(inputs, keys)`` batches through; after the last one, hand their
    concatenation to ``keep`` when the inputs of all of them fit ``budget_bytes``.

    The preprocessed-input cache of evaluation passes: the first pass reads and
    transforms the data, later ones replay the kept tensors with :func:`replay_batches`.
    """
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    size, fits = 0, True
    for x, y in batches:
        if fits:
            size += x.numel() * x.element_size()
            fits = size <= budget_bytes
            xs.append(x)
            ys.append(y)
        yield x, y
    if fits and xs:
        keep(torch.cat(xs), torch.cat(ys))


def replay_batches(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Kept inputs and keys again, ``batch_size`` at a time, in their order."""
    for i in range(0, len(y), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


class TaskEvaluator:
    """Evaluates a ``CLIPTaskModel`` on a fixed list of test sets.

    Args:
        datasets: one test set per task id, yielding (PIL image, label); with
            ``transform=None``, (input tensor, key) items already transformed (a plugin's
            held-out sets: Infusing's validation splits, keyed by label or position).
        transform: the model's eval transform.
        batch_size: evaluation batch size.
        cache_mb: keep preprocessed inputs in memory up to this many MB in total.
        own_rng: loaders draw their seed from a generator of their own, so that an
            evaluation inside training leaves the global RNG as it was.
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        transform: Callable | None,
        batch_size: int = 256,
        cache_mb: float = 1024,
        workers: int = 0,
        dist_context: DistContext | None = None,
        own_rng: bool = False,
    ) -> None:
        self.datasets = list(datasets)
        self.transform = transform
        self.batch_size = batch_size
        self.cache_mb = cache_mb
        self.workers = workers
        self.dist = dist_context or DistContext()
        self.own_rng = own_rng
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}
        self._cache_bytes = 0

    def _share(self, task_id: int, device: torch.device) -> Any:
        """This process's share of the batches of test set ``task_id``, inputs on ``device``."""
        for b, (x, y) in enumerate(self._batches(task_id)):
            if b % self.dist.world == self.dist.rank:  # each process scores its share
                yield x.to(device, non_blocking=True), y

    def _batches(self, task_id: int) -> Iterator[tuple[Tensor, Tensor]]:
        if task_id in self._cache:
            return replay_batches(*self._cache[task_id], self.batch_size)

        def keep(x: Tensor, y: Tensor) -> None:
            self._cache[task_id] = (x, y)
            self._cache_bytes += x.numel() * x.element_size()

        loader = DataLoader(
            _Transformed(self.datasets[task_id], self.transform), batch_size=self.batch_size, shuffle=False, num_workers=self.workers,
            generator=torch.Generator() if self.own_rng else None,
        )
        return keep_if_fits(loader, self.cache_mb * 2**20 - self._cache_bytes, keep)

    @torch.no_grad()
    def accuracy(self, model: torch.nn.Module, task_id: int, vocab_task: int | None = None, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> float:
        """Top-1 accuracy (%) on test set ``task_id`` with the vocabulary of ``vocab_task``."""
        net = unwrap(model)
        was_training = net.training
        net.eval()
        device = torch.device(device)
        vocab = task_id if vocab_task is None else vocab_task
        correct = total = 0
        try:
            for x, y in self._share(task_id, device):
                with autocast_to(device, autocast_dtype):
                    logits = net(x, vocab)
                correct += int((logits.argmax(dim=1).cpu() == y).sum())
                total += len(y)
        finally:
            net.train(was_training)
        correct, total = sum_across([correct, total], device if self.dist.enabled and device.type == "cuda" else "cpu")
        return 100.0 * correct / max(total, 1)

    @torch.no_grad()
    def accuracy_with_union(
        self,
        model: torch.nn.Module,
        task_id: int,
        union: Any,
        templates: str = "task",
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ) -> tuple[float, float]:
        """Top-1 accuracy (%) on test set ``task_id`` with its own vocabulary and, from the
        same image forward, over the union vocabulary of the stream (no task label).

        ``union``: a :class:`cl_proxyfda.union.UnionVocabulary`; an image counts as
        correct task-agnostically iff its arg-max union class is its true class name.
        """
        from cl_proxyfda.union import union_correct

        net = unwrap(model)
        was_training = net.training
        net.eval()
        device = torch.device(device)
        mapping = union.task_maps[task_id]
        correct = correct_union = total = 0
        try:
            head = net.class_embeddings(task_id)
            union_head = net.union_embeddings(union, templates)
            for x, y in self._share(task_id, device):
                # the task head's logits exactly as forward_single_task computes them
                with autocast_to(device, autocast_dtype):
                    feats = net.encode_image(x)
                    logits = net.logit_scale * feats @ head.t()
                    union_logits = feats @ union_head.t()
                correct += int((logits.argmax(dim=1).cpu() == y).sum())
                correct_union += union_correct(union_logits, y, mapping)
                total += len(y)
        finally:
            net.train(was_training)
        on = device if self.dist.enabled and device.type == "cuda" else "cpu"
        correct, correct_union, total = sum_across([correct, correct_union, total], on)
        return 100.0 * correct / max(total, 1), 100.0 * correct_union / max(total, 1)

    @torch.no_grad()
    def features(self, model: torch.nn.Module, task_id: int, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Normalised image embeddings (CPU, float) and labels (keys) of test set ``task_id``."""
        net = unwrap(model)
        was_training = net.training
        net.eval()
        device = torch.device(device)
        feats, labels = [], []
        try:
            for x, y in self._batches(task_id):
                with autocast_to(device, autocast_dtype):
                    feats.append(net.encode_image(x.to(device)).float().cpu())
                labels.append(y)
        finally:
            net.train(was_training)
        return torch.cat(feats), torch.cat(labels)

    def row(self, model: torch.nn.Module, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> list[float]:
        """Accuracy on every task (its own vocabulary): one row of the matrix."""
        return [self.accuracy(model, t, device=device, autocast_dtype=autocast_dtype) for t in range(len(self.datasets))]
