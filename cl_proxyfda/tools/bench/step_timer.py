"""The training-step timer: one run per strategy entry through the real runner
(``build_run``), a plugin at each end of the plugin list timing every training
iteration, the frozen teacher's image forwards timed inside it, and the entries'
calls interleaved (optionally each between two calls of the baseline).

Why not ``torch.utils.benchmark.Timer``: a Timer times a statement as a whole, but a
step is one iteration inside Avalanche's training loop (data loading, callbacks and
the optimizer included), measured between two plugin callbacks with the teacher's
share nested inside it; and the paired ratio needs each entry's call bracketed by two
baseline calls in one schedule, which Timer's independent measurements cannot express.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from avalanche.core import SupervisedPlugin

from cl_proxyfda.teacher import TeacherBank
from cl_proxyfda.tools.bench.context import BenchContext
from cl_proxyfda.tools.bench.timing import gc_paused, sync


@dataclass
class StepEntry:
    """One row of the steps table: a list of strategies (run-file entries)."""

    label: str
    strategies: list[dict[str, Any]]
    cached_teacher: bool = False
    model: dict[str, Any] = field(default_factory=dict)
    precision: str | None = None  # None: measure_steps' own


@dataclass
class StepResult:
    """Pooled medians of one entry, and (``paired``) its ratios to the bracketing baseline calls."""

    label: str
    median: float
    mean: float
    teacher_share: float
    minus_teacher: float
    count: int
    bank: TeacherBank | None = None  # the run's teachers, for entries with train.teacher_table
    ratio: float | None = None
    ratio_minus_teacher: float | None = None


class StepTimer:
    """Times training iterations (a plugin at each end of the plugin list) and the frozen
    teacher image forwards inside them.

    ``start`` goes first in ``strategy.plugins`` (``before_training_iteration``), ``stop``
    last (``after_training_iteration``); on CUDA both synchronise, and teacher forwards are
    timed with CUDA events (no extra synchronisation inside the step).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.calls: list[list[tuple[float, float]]] = []
        self._t0 = 0.0
        self._teacher = 0.0
        self._events: list[tuple[Any, Any]] = []
        self._inside = False
        timer = self

        class _Start(SupervisedPlugin):
            def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
                sync(timer.device)
                timer._teacher, timer._events, timer._inside = 0.0, [], True
                timer._t0 = time.perf_counter()

        class _Stop(SupervisedPlugin):
            def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
                sync(timer.device)
                dt = time.perf_counter() - timer._t0
                teacher = timer._teacher + sum(a.elapsed_time(b) / 1000.0 for a, b in timer._events)
                timer._inside = False
                if timer.calls:
                    timer.calls[-1].append((dt, teacher))

        self.start, self.stop = _Start(), _Stop()

    def attach(self, strategy: Any) -> None:
        strategy.plugins.insert(0, self.start)
        strategy.plugins.append(self.stop)

    def new_call(self) -> None:
        self.calls.append([])

    @contextlib.contextmanager
    def teacher_span(self) -> Iterator[None]:
        if not self._inside:
            yield
            return
        if self.device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
            self._events.append((a, b))
        else:
            t0 = time.perf_counter()
            yield
            self._teacher += time.perf_counter() - t0

    def timed(self, warmup: int) -> list[tuple[float, float]]:
        """(step, teacher) seconds of every call's iterations after its first ``warmup``."""
        return [it for call in self.calls for it in call[warmup:]]


def time_teacher_forwards(bank: TeacherBank, timer: StepTimer) -> None:
    """Wrap the image encoder of every frozen teacher ``bank`` hands out, so that the time
    spent in teacher image forwards during a step is counted (TeacherBank.outputs, and the
    teachers GIFT and ZSCL run themselves)."""
    original_get = bank.get

    def get(student: Any, reference: str) -> Any:
        teacher = original_get(student, reference)
        if not getattr(teacher, "_bench_timed", False):
            encode = teacher.encode_image

            def timed_encode(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
                with timer.teacher_span():
                    return encode(x, normalize)

            teacher.encode_image = timed_encode
            teacher._bench_timed = True
        return teacher

    bank.get = get  # type: ignore[method-assign]


def measure_steps(ctx: BenchContext, entries: Sequence[StepEntry], *, batch_size: int, precision: str = "fp32",
                  model: str | None = None, pretrained: str | None | bool = False, device: torch.device | None = None,
                  repeats: int | None = None, paired: bool = False) -> tuple[list[StepResult], list[str]]:
    """Build one run per entry, prime it on experience 1, then time experience 2 (the
    last one when there is only one) ``repeats`` times, the entries interleaved.

    ``paired``: the first entry is the baseline, run before and after every other entry's
    call; each result then also carries its ratio to those bracketing baseline calls
    (median over calls), which cancels slow drifts of the machine's load."""
    from cl_proxyfda.runner import build_run

    dev = device or ctx.device
    s = ctx.sizes
    repeats = repeats or s.repeats
    notes: list[str] = []
    built: list[tuple[StepEntry, Any, StepTimer]] = []
    for i, entry in enumerate(entries):
        try:
            cfg = ctx.run_config(entry.strategies, batch_size=batch_size, precision=entry.precision or precision, model=model,
                                 pretrained=pretrained, device=dev, name=f"bench{i}", model_extra=entry.model, teacher_table=entry.cached_teacher)
            run = build_run(cfg)
            timer = StepTimer(run.device)
            time_teacher_forwards(run.strategy.teachers, timer)
            timer.attach(run.strategy)
            run.strategy.iterations_for = lambda n: s.prime_iterations  # noqa: B023
            run.strategy.train(run.benchmark.train_stream[0])
            bank = run.strategy.teachers
            if entry.cached_teacher and (bank.served_count == 0 or bank.forward_count > 0):
                # train.teacher_table is tested for exactness in tests/test_teacher_table.py; here: that it was used
                raise RuntimeError(f"teacher table unused: {bank.served_count} batches served, {bank.forward_count} teacher forwards")
            built.append((entry, run, timer))
            ctx.echo(f"  built and primed {entry.label}")
        except Exception as exc:  # reported, never silent
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            notes.append(f"{entry.label}: skipped: {type(exc).__name__}: {first}")
            ctx.echo(f"  skipped {entry.label}: {first}")
    # Schedule: plain interleaving, or (paired) the baseline (first entry) before and after
    # every other entry's call; odd repeats run the entries in reverse order.
    log: list[tuple[int, int]] = []  # (entry index, call index) in the order run
    for r in range(repeats):
        order = list(range(len(built))) if not paired else list(range(1, len(built)))
        order = order if r % 2 == 0 else order[::-1]
        if paired and built:
            order = [0] + [k for i in order for k in (i, 0)]
        for i in order:
            entry, run, timer = built[i]
            exp = run.benchmark.train_stream[min(1, len(run.benchmark.train_stream) - 1)]
            run.strategy.iterations_for = lambda n: s.warmup + s.iterations  # noqa: B023
            timer.new_call()
            log.append((i, len(timer.calls) - 1))
            with gc_paused():
                run.strategy.train(exp)
        ctx.echo(f"  repeat {r + 1}/{repeats} done")
    results = []
    for i, (entry, run, timer) in enumerate(built):
        timed = timer.timed(s.warmup)
        steps = [t for t, _ in timed]
        teacher = [tt for _, tt in timed]
        bank = run.strategy.teachers if entry.cached_teacher else None
        result = StepResult(
            entry.label, statistics.median(steps), statistics.fmean(steps), sum(teacher) / sum(steps),
            statistics.median([t - tt for t, tt in timed]), len(steps), bank,
        )
        if paired and built:
            result.ratio, result.ratio_minus_teacher = _paired_ratios(i, log, built, s.warmup)
        results.append(result)
        if bank is not None and bank.forward_count:
            notes.append(f"{entry.label}: {bank.forward_count} teacher calls could not be served from the table and ran a forward")
    return results, notes


def _paired_ratios(index: int, log: list[tuple[int, int]], built: list[Any], warmup: int) -> tuple[float, float]:
    """Median over the calls of entry ``index`` of its call median divided by the mean of the
    baseline call medians just before and after it (same for the step minus teacher time)."""
    def call_medians(i: int, c: int) -> tuple[float, float]:
        its = built[i][2].calls[c][warmup:]
        return statistics.median([t for t, _ in its]), statistics.median([t - tt for t, tt in its])

    if index == 0:
        return 1.0, 1.0
    ratios, ratios_sub = [], []
    for pos, (i, c) in enumerate(log):
        if i != index:
            continue
        around = [log[q] for q in (pos - 1, pos + 1) if 0 <= q < len(log) and log[q][0] == 0]
        step, sub = call_medians(i, c)
        base = [call_medians(*b) for b in around]
        ratios.append(step / statistics.fmean(b[0] for b in base))
        ratios_sub.append(sub / statistics.fmean(b[1] for b in base))
    return statistics.median(ratios), statistics.median(ratios_sub)
