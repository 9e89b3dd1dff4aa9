"""Side data shared by the plugins that train on images besides the task's own batches
(GIFT's synthetic set, ZSCL's reference images, Infusing's generic images):

- :class:`SideBatches`: seeded, endless ``(x, index)`` batches of a fixed dataset. The
  index plan is :func:`cl_proxyfda.synthetic.seeded_batches` (passes over seeded
  permutations) for ``period`` batches, then the same ``period`` batches again; under
  ``torch.distributed`` each process takes its contiguous share of every global batch
  (:class:`cl_proxyfda.distributed.ShardedBatches`). With ``keep_mb`` the dataset's items
  (a deterministic transform's output) are read once and the batches are cut from memory:
  the same tensors, without reading and transforming files at every iteration;
- :func:`embed_images`: a frozen encoder's embeddings of a whole fixed set, in dataset
  order (the teacher table a plugin computes once).

The position in the plan is not checkpointed: every plugin rebuilds its batches at the
start of an experience, which is where a run resumes.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cl_proxyfda.distributed import DistContext, ShardedBatches
from cl_proxyfda.synthetic import BatchPlan


class SideBatches:
    """``next()`` gives the next ``(x, index)`` batch forever: ``x`` on ``device``,
    ``index`` (dataset positions, CPU) for per-item tables.

    ``seed`` seeds numpy's generator (an int or a sequence of ints); the plan is
    ``period`` global batches of ``batch_size``, repeated. With ``dist`` enabled each
    process gets items ``rank * B / world`` to ``(rank + 1) * B / world`` of every batch;
    ``index`` always holds positions in the whole dataset (a per-item table computed on
    every rank is indexed by it as it is).

    ``keep_mb``: when the whole dataset's inputs fit this many MB, they are read once (with
    a private generator: the global torch RNG is left alone) and every batch is cut from
    memory; only for datasets whose items never change (an eval transform). The batches
    are identical, and so are the global RNG draws (the loader still starts the same way).
    ``items`` is the dataset item by item (the kept tensors when kept), for a table.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int | Sequence[int],
        workers: int = 0,
        *,
        period: int,
        dist: DistContext | None = None,
        device: torch.device | str = "cpu",
        keep_mb: float = 0.0,
    ) -> None:
        self.device = torch.device(device)
        self.batch_size, self.workers = batch_size, workers
        sampler: Any = BatchPlan(len(dataset), batch_size, max(1, int(period)), seed)  # type: ignore[arg-type]
        if dist is not None and dist.enabled:
            sampler = ShardedBatches(sampler, dist)
        pin = self.device.type == "cuda"
        self.kept = read_if_fits(dataset, keep_mb * 2**20, batch_size, workers)
        self.items: Dataset = dataset
        if self.kept is None:
            self.loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin)
        else:
            self.items = TensorDataset(self.kept, torch.arange(len(self.kept)))
            # whole batches from memory: the sampler's index lists go to the dataset as they are
            self.loader = DataLoader(_KeptBatches(self.kept), sampler=sampler, batch_size=None, pin_memory=pin)
        # started now, as the plugins always did: the loader draws its base seed from the
        # global torch RNG here, not at the first batch
        self._batches: Any = iter(self.loader)
        self.drawn = 0  # batches handed out so far

    def next(self) -> tuple[Tensor, Tensor]:
        """The next batch; after ``period`` batches the plan starts again."""
        if self._batches is None:
            raise RuntimeError("SideBatches.next() after close()")
        try:
            x, index = next(self._batches)
        except StopIteration:
            self._batches = iter(self.loader)
            x, index = next(self._batches)
        self.drawn += 1
        return x.to(self.device, non_blocking=True), torch.as_tensor(index)

    def table(self, encoder: nn.Module, generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        """``(embeddings, forwards)``: ``encoder``'s embeddings of the whole set in dataset
        order (:func:`embed_images` over :attr:`items`; no loader workers for kept inputs),
        a table the ``index`` of every batch addresses."""
        workers = 0 if self.kept is not None else self.workers
        return embed_images(encoder, self.items, self.batch_size, workers, generator=generator)

    def close(self) -> None:
        """Drop the running iterator (stops loader workers)."""
        self._batches = None


class _KeptBatches(Dataset):
    """``dataset[positions] = (x[positions], positions)`` over inputs kept in memory."""

    def __init__(self, x: Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, positions: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(positions, dtype=torch.long)
        return self.x[index], index


def read_if_fits(dataset: Dataset, budget_bytes: float, batch_size: int, workers: int = 0) -> Tensor | None:
    """The inputs (first field) of every item of ``dataset`` stacked in order, or None when
    they would not fit ``budget_bytes`` (judged from the first item). The loader has its
    own generator, so the global torch RNG is not drawn from."""
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0 or budget_bytes <= 0:
        return None
    first = dataset[0][0]
    if not isinstance(first, Tensor) or n * first.numel() * first.element_size() > budget_bytes:
        return None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, generator=torch.Generator())
    return torch.cat([batch[0] for batch in loader])


def embed_images(
    encoder: nn.Module,
    dataset: Dataset,
    batch_size: int,
    workers: int = 0,
    *,
    out_device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """``(embeddings, forwards)``: ``encoder.encode_image`` of every ``(x, ...)`` item of
    ``dataset`` in order (float, no gradient), on the encoder's device or ``out_device``,
    and the number of encoder forwards. ``generator``: the loader's own generator (else
    the loader draws its base seed from the global torch RNG)."""
    param = next(encoder.parameters())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, generator=generator)
    out, forwards = [], 0
    with torch.no_grad():
        for batch in loader:
            e = encoder.encode_image(batch[0].to(param.device, param.dtype)).float()  # type: ignore[operator]
            out.append(e if out_device is None else e.to(out_device))
            forwards += 1
    return torch.cat(out), forwards
