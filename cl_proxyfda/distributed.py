"""Multi-process runs under ``torchrun`` (PyTorch's own distributed engine).

``torchrun --nproc_per_node=N -m cl_proxyfda run CONFIG.yaml`` starts N processes with
RANK / WORLD_SIZE / LOCAL_RANK set. Each process trains the DDP-wrapped model on its
slice of every global batch (so the global batch is ``train.batch_size`` whatever N is),
evaluates its share of every test set, and the counts are summed across processes, so
every rank reports the same numbers. Rank 0 alone writes files and logs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistContext:
    """Join the process group torchrun prepared (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world=world, local_rank=local_rank)


def current() -> DistContext:
    """The context of an already initialised process group (or a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sum_across(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of ``values`` over all processes (identity when alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters DDP does not own (a plugin's own) over all
    processes, so that every process takes the same optimizer step (no-op when alone).

    Every process must call it at the same point; a missing gradient counts as zero.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)


def broadcast_from_main(tensors: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values of ``tensors`` into every process (no-op when alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0)


class ShardedBatches:
    """Each process takes its contiguous share of every global batch: rank r gets items
    ``r * B / world`` to ``(r + 1) * B / world``.

    The class-balanced sampler lays a batch out class by class (m classes x n images),
    so with m divisible by the number of processes every process gets whole classes and
    can build a neighbourhood graph on its share (a strided ``batch[rank::world]`` would
    give it one image of each of m classes). Random batches are as random either way.
    """

    def __init__(self, batches: Iterable[list[int]], ctx: DistContext) -> None:
        self.batches, self.ctx = batches, ctx

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            size = -(-len(batch) // self.ctx.world)
            yield batch[self.ctx.rank * size : (self.ctx.rank + 1) * size]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
