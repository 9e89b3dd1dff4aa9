"""Timing tools of the bench: ``torch.utils.benchmark.Timer`` for anything that is a
callable, and the two chores its Timer does not cover for the training-step timer
(:mod:`~cl_proxyfda.tools.bench.step_timer`): synchronising one device and keeping the
garbage collector off around a whole ``strategy.train`` call."""
from __future__ import annotations

import contextlib
import gc
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.benchmark import Measurement, Timer


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect, then keep Python's garbage collector off (as ``timeit`` does inside a Timer)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def timer_of(fn: Callable[[], Any], label: str = "") -> Timer:
    """A Timer that calls ``fn()`` with this process's torch thread count (Timer's own
    default is one thread, which would not be the setting the bench reports)."""
    return Timer(stmt="fn()", globals={"fn": fn}, label=label or getattr(fn, "__name__", "fn"), num_threads=torch.get_num_threads())


def seconds_per_call(fn: Callable[[], Any], min_run_time: float) -> float:
    """Median seconds per call of ``fn()``: ``Timer.blocked_autorange`` (its block-size
    estimate is the warm-up; accelerators synchronised around each block, gc off while timing)."""
    return float(timer_of(fn).blocked_autorange(min_run_time=min_run_time).median)


def interleaved(jobs: Sequence[tuple[str, Callable[[], Any]]], rounds: int, min_run_time: float,
                after: Callable[[str], None] | None = None) -> dict[str, Measurement]:
    """Measure several callables interleaved: every round runs ``Timer.blocked_autorange``
    (``min_run_time`` each) of every job, the order rotated by one each round so that no
    job always follows the same one; ``after(key)`` runs untimed after each job's
    measurement. A job's rounds are merged (``Measurement.merge``: seconds per call), so
    its ``.median`` pools every block of every round."""
    timers = [(key, timer_of(fn, key)) for key, fn in jobs]
    found: dict[str, list[Measurement]] = {key: [] for key, _ in jobs}
    for r in range(rounds):
        k = r % len(timers)
        for key, timer in timers[k:] + timers[:k]:
            found[key].append(timer.blocked_autorange(min_run_time=min_run_time))
            if after is not None:
                after(key)
    return {key: Measurement.merge(ms)[0] for key, ms in found.items()}
