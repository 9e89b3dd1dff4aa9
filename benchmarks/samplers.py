"""Batch samplers for training: class-balanced with hard class mining, and plain random
(over :func:`seeded_batches`, the endless seeded stream side-data loaders also use).

Both are iterables of ``iterations`` lists of dataset indices, usable as
``DataLoader(dataset, batch_sampler=sampler)``. Both are deterministic for a seed: a
fresh sampler with the same arguments yields the same sequence of passes (each call of
``iter`` starts the next pass, seeded by ``(seed, pass number)``; ``set_epoch`` picks
the pass explicitly).
"""
from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def class_mean_similarity(features: Tensor | np.ndarray, targets: Sequence[int] | np.ndarray | Tensor) -> np.ndarray:
    """Cosine similarity of the class-mean features, indexed by label value.

    Features are L2-normalised, averaged per class, the means normalised again. The
    result is ``(C, C)`` with ``C = max(label) + 1``; rows/columns of labels that do not
    occur are 0.
    """
    f = F.normalize(torch.as_tensor(features).detach().double().cpu(), dim=1)
    y = torch.as_tensor(np.asarray(targets)).long().view(-1)
    if len(y) != len(f):
        raise ValueError(f"{len(y)} targets for {len(f)} feature rows")
    c = int(y.max()) + 1
    sums = torch.zeros(c, f.shape[1], dtype=f.dtype).index_add_(0, y, f)
    present = torch.bincount(y, minlength=c) > 0
    means = F.normalize(sums, dim=1) * present.unsqueeze(1)
    return (means @ means.t()).numpy()


class ClassBalancedBatchSampler:
    """Batches of ``m_classes`` classes x ``n_per_class`` images, optionally hard-mined.

    Args:
        targets: label of every dataset item.
        m_classes, n_per_class: batch layout (default 16 x 4 = 64, docs/methods.md section 1, step 8).
        iterations: batches per pass (``len(sampler)``).
        seed: random seed.
        class_similarity: ``(C, C)`` similarity of classes indexed by label value, e.g.
            ``class_mean_similarity`` of pre-trained features.
        hard_mining: group similar classes into the same batch. Active only when
            ``class_similarity`` is given (``hard_mining_active``); otherwise the
            classes of a batch are drawn uniformly.
        mining_temperature: softness of hard mining, in standard deviations of the seed
            class's similarities (see below).

    Class choice with hard mining: a seed class is drawn uniformly; the other m - 1
    classes are drawn without replacement with probability proportional to
    ``exp(z(seed, c) / mining_temperature)``, where ``z`` is the seed's row of class
    similarities standardised (minus its mean, over its standard deviation), so the most
    similar classes are the likeliest but the batch keeps some randomness (temperature
    -> 0: always the nearest classes; large: uniform). Standardising makes the
    temperature mean the same thing on CLIP features, whose class means all sit at
    cosines around 0.75-0.8 with a spread of a few hundredths (a raw temperature of 0.1
    there was nearly uniform: 17% of a batch's classes among the seed's 15 nearest of
    100, against 15% by chance).

    Images within a class are taken from a per-class shuffled queue, reshuffled when it
    runs out, so every image is seen before any repeats (and a batch repeats an image
    only when its class has fewer images than it must contribute). A class with fewer images than
    it must contribute repeats images within the batch (sampling with replacement).
    When fewer than ``m_classes`` classes exist, every class is used in every batch and
    the batch size ``m x n`` is kept by giving the classes more images each (as evenly as
    possible: ``m*n // C`` each, one more for ``m*n % C`` randomly chosen classes).
    """

    def __init__(
        self,
        targets: Sequence[int] | np.ndarray | Tensor,
        m_classes: int = 16,
        n_per_class: int = 4,
        iterations: int = 100,
        seed: int = 0,
        class_similarity: np.ndarray | None = None,
        hard_mining: bool = True,
        mining_temperature: float = 0.5,
    ) -> None:
        self.targets = np.asarray(torch.as_tensor(np.asarray(targets)).long()).reshape(-1)
        if len(self.targets) == 0:
            raise ValueError("ClassBalancedBatchSampler needs a non-empty dataset")
        if m_classes < 1 or n_per_class < 1 or iterations < 1:
            raise ValueError("m_classes, n_per_class and iterations must be positive")
        if mining_temperature <= 0:
            raise ValueError(f"mining_temperature must be positive, got {mining_temperature}")
        self.m_classes = m_classes
        self.n_per_class = n_per_class
        self.iterations = iterations
        self.seed = seed
        self.mining_temperature = mining_temperature
        self.classes = np.unique(self.targets)
        self.class_items = {int(c): np.flatnonzero(self.targets == c) for c in self.classes}
        self.hard_mining_active = bool(hard_mining and class_similarity is not None)
        self.class_similarity: np.ndarray | None = None
        if class_similarity is not None:
            sim = np.asarray(class_similarity, dtype=np.float64)
            top = int(self.classes.max())
            if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] <= top:
                raise ValueError(f"class_similarity must be square and cover labels 0..{top}, got shape {sim.shape}")
            self.class_similarity = sim
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        return self.m_classes * self.n_per_class

    def __len__(self) -> int:
        return self.iterations

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter`` produce pass number ``epoch``."""
        self.epoch = epoch

    def _pick_classes(self, rng: np.random.Generator) -> np.ndarray:
        if len(self.classes) <= self.m_classes:
            return self.classes
        if not self.hard_mining_active:
            return rng.choice(self.classes, size=self.m_classes, replace=False)
        seed_class = rng.choice(self.classes)
        others = self.classes[self.classes != seed_class]
        sims = self.class_similarity[seed_class, others]
        logits = (sims - sims.mean()) / (sims.std() + 1e-12) / self.mining_temperature
        # Gumbel top-k = sampling without replacement proportional to exp(logits).
        keys = logits + rng.gumbel(size=len(others))
        chosen = others[np.argsort(-keys)[: self.m_classes - 1]]
        return np.concatenate([[seed_class], chosen])

    def _counts(self, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if len(classes) == self.m_classes:
            return np.full(len(classes), self.n_per_class)
        base, extra = divmod(self.batch_size, len(classes))
        counts = np.full(len(classes), base)
        counts[rng.choice(len(classes), size=extra, replace=False)] += 1
        return counts

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        queues: dict[int, list[int]] = {}

        def take(c: int, count: int) -> list[int]:
            out: list[int] = []
            while len(out) < count:
                if not queues.get(c):
                    fresh = rng.permutation(self.class_items[c]).tolist()
                    taken = set(out)  # refilled mid-batch: images already in this batch go last
                    queues[c] = [i for i in fresh if i not in taken] + [i for i in fresh if i in taken]
                queue = queues[c]
                step = min(count - len(out), len(queue))
                out.extend(queue[:step])
                del queue[:step]
            return out

        for _ in range(self.iterations):
            classes = self._pick_classes(rng)
            counts = self._counts(classes, rng)
            yield [i for c, n in zip(classes, counts) for i in take(int(c), int(n))]


class RandomBatchSampler:
    """``iterations`` batches of ``batch_size`` indices drawn uniformly from ``n_items``.

    Items are drawn without replacement within a pass over the data (a random
    permutation), and a new permutation starts when one runs out; a batch that straddles
    two permutations is filled from the next one (so with ``n_items < 2 * batch_size`` an
    item can occur twice in that batch).
    """

    def __init__(self, n_items: int, batch_size: int, iterations: int, seed: int = 0) -> None:
        if n_items < 1 or batch_size < 1 or iterations < 1:
            raise ValueError("n_items, batch_size and iterations must be positive")
        self.n_items = n_items
        self.batch_size = batch_size
        self.iterations = iterations
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.iterations

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        yield from itertools.islice(seeded_batches(self.n_items, self.batch_size, [self.seed, epoch]), self.iterations)


def seeded_batches(n_items: int, batch_size: int, seed: int | Sequence[int]) -> Iterator[list[int]]:
    """Endless batches of indices: passes over seeded permutations of ``range(n_items)``
    (one ``numpy.random.default_rng(seed)`` for all passes).

    A batch larger than what is left of a pass is completed from the next pass, so with
    ``n_items < batch_size`` items repeat within a batch.
    """
    if n_items < 1 or batch_size < 1:
        raise ValueError("seeded_batches needs n_items >= 1 and batch_size >= 1")
    rng = np.random.default_rng(seed)
    queue: list[int] = []
    while True:
        batch: list[int] = []
        while len(batch) < batch_size:
            if not queue:
                queue = rng.permutation(n_items).tolist()
            take = min(batch_size - len(batch), len(queue))
            batch.extend(queue[:take])
            del queue[:take]
        yield batch
