"""``cl-proxyfda bench``: micro-benchmarks reported as ratios measured in one process.

Absolute times depend on the machine and on its load; ratios of two things measured in
the same process, interleaved, are what carries over. Every section prints a markdown
table labelled with the machine (CPU model, cores, torch version, CUDA device).

Sections (``--sections``, default: all):

- ``steps``: the training-step time of every registered strategy relative to naive
  fine-tuning, through the real runner (``build_run``; a timing plugin around each
  training iteration, median after warm-up), with the share of the step spent in frozen
  teacher image forwards; FDA and Proxy-FDA also with the teacher features served from a
  per-experience cache (see :class:`IndexedTeacherBank`).
- ``eval``: zero-shot evaluation of every test set with the text-embedding cache versus
  without it; evaluation after an experience versus one image forward pass.
- ``knn``: neighbour search, torch top-k versus faiss (:class:`~cl_proxyfda.knn.FeatureBank`).
- ``awc``: AWC's per-iteration importance (and penalty) cost relative to a naive step.
- ``generation``: the tiny diffusers pipeline batched versus one image at a time, and the
  synthetic cache's hit path versus generation.
- ``gpu`` (CUDA only): CLIP ViT-B/16 naive / Proxy-FDA / GIFT step times in fp32 and bf16,
  and an SD-1.5-sized UNet's images per second.

Python: ``run_bench(out=..., quick=True, sections=["knn"])`` returns the report (a dict,
also written as ``bench.json`` and ``bench.md`` when ``out`` is given).
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from cl_proxyfda.benchmarks.colour_folders import write_image_folder_stream
from cl_proxyfda.errors import UserError
from cl_proxyfda.teacher import TeacherBank

SECTIONS = ("steps", "eval", "knn", "awc", "generation", "gpu")
DEMO_MODEL, DEMO_TAG = "demo-clip-tiny", "demo"
TEST_MODEL = "cl-test-tiny"
CACHE_CHECK_TOLERANCE = 1e-4
"""Largest |cached - forward| teacher feature difference accepted by the cache check."""


# ----------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class BenchSizes:
    """How much each section measures (``FULL`` by default, ``QUICK`` for tests)."""

    batch_size: int = 64
    warmup: int = 2
    iterations: int = 10
    prime_iterations: int = 2
    repeats: int = 4
    train_per_class: int = 32
    test_per_class: int = 20
    control_per_class: int = 20
    reference_size: int = 256
    synthetic_images: int = 128
    knn_sizes: tuple[int, ...] = (1_000, 10_000, 50_000)
    knn_dim: int = 512
    knn_queries: int = 64
    knn_k: int = 8
    micro_repeats: int = 20
    generation_batch: int = 8
    generation_steps: int = 10
    cache_images: int = 16
    gpu_model: str = "ViT-B-16"
    gpu_batch_size: int = 64
    gpu_unet_batch: int = 8
    gpu_unet_steps: int = 25


FULL = BenchSizes()
QUICK = BenchSizes(
    batch_size=16, warmup=1, iterations=3, prime_iterations=1, repeats=1, train_per_class=4, test_per_class=4,
    control_per_class=4, reference_size=32, synthetic_images=16, knn_sizes=(500, 2_000), knn_queries=32,
    micro_repeats=5, generation_batch=4, generation_steps=2, cache_images=4, gpu_batch_size=16, gpu_unet_batch=2,
    gpu_unet_steps=5,
)


# ---------------------------------------------------------------------- report
@dataclass
class Target:
    """A performance target: ``ratio <= limit``."""

    label: str
    ratio: float
    limit: float

    @property
    def met(self) -> bool:
        return self.ratio <= self.limit


@dataclass
class Section:
    """One section's table, its ratios (all finite and positive), targets and notes."""

    name: str
    title: str
    setting: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def add_ratio(self, key: str, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise RuntimeError(f"bench {self.name}: ratio {key} = {value} is not a finite positive number")
        self.ratios[key] = float(value)
        return value

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title, "setting": self.setting, "columns": self.columns, "rows": self.rows, "ratios": self.ratios,
            "targets": [{"label": t.label, "ratio": t.ratio, "limit": t.limit, "met": t.met} for t in self.targets],
            "notes": self.notes, "skipped": self.skipped, "seconds": self.seconds, **({"extra": self.extra} if self.extra else {}),
        }


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch version and threads, CUDA device (if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda_device": cuda, "python": platform.python_version(), "system": f"{platform.system()} {platform.release()}",
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def machine_line(info: dict[str, Any]) -> str:
    cuda = f"CUDA device: {info['cuda_device']}" if info["cuda_device"] else "CUDA device: none"
    return (f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), torch {info['torch']} "
            f"({info['torch_threads']} threads), {cuda}; Python {info['python']}, {info['system']}"
            + (f"; load average {info['load_average']} at start" if info.get("load_average") is not None else ""))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value == 0:
            return "0"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def section_markdown(section: Section, machine: str) -> str:
    """The markdown of one section: title, setting, table, targets, notes."""
    lines = [f"## {section.name}: {section.title}", "", f"_{machine}_", ""]
    if section.setting:
        lines += [section.setting, ""]
    if section.skipped:
        lines += [f"skipped: {section.skipped}", ""]
        return "\n".join(lines)
    if section.rows:
        lines.append("| " + " | ".join(section.columns) + " |")
        lines.append("|" + "|".join("---" for _ in section.columns) + "|")
        for row in section.rows:
            lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
        lines.append("")
    if section.targets:
        lines += ["| target | ratio | limit | met |", "|---|---|---|---|"]
        for t in section.targets:
            lines.append(f"| {t.label} | {t.ratio:.3f} | {t.limit:.2f} | {'yes' if t.met else 'NO'} |")
        lines.append("")
    for note in section.notes:
        lines.append(f"- {note}")
    if section.notes:
        lines.append("")
    lines.append(f"(section time {section.seconds:.1f} s)")
    lines.append("")
    return "\n".join(lines)


def report_markdown(report: dict[str, Any], sections: Sequence[Section]) -> str:
    head = [
        "# cl-proxyfda bench", "",
        report["machine_line"], "",
        f"command: `{report['command']}` ({report['mode']} sizes), {report['seconds']:.0f} s in all. "
        "Ratios are measured in one process, interleaved; absolute times are for this machine only.", "",
    ] + [f"warning: {w}" for w in report.get("warnings", [])] + ([""] if report.get("warnings") else [])
    return "\n".join(head) + "\n" + "\n".join(section_markdown(s, report["machine_line"]) for s in sections)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def parse_sections(text: str | Sequence[str] | None) -> list[str]:
    """``"a,b"`` (or a list) -> the section names in the order given; all when empty."""
    if text is None:
        return list(SECTIONS)
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if not names:
        raise UserError(f"--sections: no section named (known: {', '.join(SECTIONS)})")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise UserError(f"--sections: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------- context
@dataclass
class BenchContext:
    """What every section shares: sizes, model, device, a scratch folder."""

    sizes: BenchSizes
    model: str
    pretrained: str | None
    device: torch.device
    tmp: Path
    echo: Callable[[str], None]
    stream: str = "auto"  # auto: demo when registered, else image_folder
    _stream: dict[str, Any] | None = None

    @property
    def pretrained_label(self) -> str:
        return self.pretrained if self.pretrained else "random weights"

    def stream_config(self) -> dict[str, Any]:
        """The bench's stream: the offline demo stream (2 tasks) when registered, else an
        image-folder stream the bench writes itself."""
        if self._stream is None:
            from cl_proxyfda.registry import STREAMS, load_builtin_components

            load_builtin_components()
            s = self.sizes
            if self.stream not in ("auto", "demo", "image_folder"):
                raise UserError(f"bench: unknown stream choice {self.stream!r} (auto, demo, image_folder)")
            if self.stream == "demo" or (self.stream == "auto" and "demo" in STREAMS):
                self._stream = {
                    "name": "demo", "seed": 0, "tasks": ["outline-colours", "counting"], "train_per_class": s.train_per_class,
                    "test_per_class": s.test_per_class, "control_per_class": s.control_per_class, "reference_size": s.reference_size,
                }
            else:
                per_class = max(s.train_per_class, s.batch_size // 4)  # 4 classes a task: at least one batch
                root = write_image_folder_stream(self.tmp / "stream", BENCH_TASKS, train_per_class=per_class, test_per_class=s.test_per_class)
                self._stream = {"name": "image_folder", "root": str(root), "tasks": list(BENCH_TASKS)}
        return dict(self._stream)

    def describe_stream(self) -> str:
        cfg = self.stream_config()
        if cfg["name"] == "demo":
            return f"demo stream ({', '.join(cfg['tasks'])}; {cfg['train_per_class']} train images per class)"
        return f"image-folder stream written by the bench ({', '.join(cfg['tasks'])})"

    def run_config(self, strategies: list[dict[str, Any]], *, batch_size: int | None = None, precision: str = "fp32",
                   model: str | None = None, pretrained: str | None | bool = False, device: torch.device | None = None,
                   name: str = "bench", model_extra: dict[str, Any] | None = None) -> Any:
        from cl_proxyfda.config import parse_config

        dev = device or self.device
        raw = {
            "run": {"name": name, "seed": 0, "device": dev.type, "precision": precision, "output_dir": str(self.tmp / "runs")},
            "model": {"name": model or self.model, "pretrained": self.pretrained if pretrained is False else pretrained, "train_towers": ["image"],
                      **(model_extra or {})},
            "stream": self.stream_config(),
            "train": {"lr": 1e-5, "iterations": self.sizes.warmup + self.sizes.iterations, "batch_size": batch_size or self.sizes.batch_size,
                      "augment": False, "schedule": "constant"},
            "strategies": strategies,
            "eval": {"batch_size": 256},
            "logging": {"wandb": {"mode": "disabled"}, "plots": False, "progress": False},
            "checkpoint": {"enabled": False},
        }
        return parse_config(raw)



BENCH_TASKS = {"warm": ["red", "orange", "yellow", "purple"], "cool": ["blue", "cyan", "green", "gray"]}


# ---------------------------------------------------------------- timing tools
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect, then keep Python's garbage collector off while timing (as ``timeit`` does)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    with gc_paused():
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
                _sync(timer.device)
                timer._teacher, timer._events, timer._inside = 0.0, [], True
                timer._t0 = time.perf_counter()

        class _Stop(SupervisedPlugin):
            def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
                _sync(timer.device)
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


# ------------------------------------------------------------ teacher from a cache
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
        _sync(strategy.device)
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
        _sync(strategy.device)
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


# ----------------------------------------------------------------------- steps
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
    bank: IndexedTeacherBank | None = None
    ratio: float | None = None
    ratio_minus_teacher: float | None = None


def strategy_presets(ctx: BenchContext, batch_size: int) -> tuple[list[StepEntry], list[str]]:
    """Bench presets for every registered strategy, and skip notes (with the reason)."""
    from cl_proxyfda.registry import STRATEGIES, load_builtin_components

    load_builtin_components()
    stream = ctx.stream_config()
    demo = stream["name"] == "demo"
    tmp = ctx.tmp
    if demo:
        generator = {"name": "world", "image_size": 32}
    else:
        from cl_proxyfda.generators.diffusers_backend import build_tiny_pipeline

        pipe = tmp / "tiny_pipeline"
        if not pipe.is_dir():
            build_tiny_pipeline(pipe)
        generator = {"name": "diffusers", "model": str(pipe), "steps": 2, "progress": False, "dtype": "fp32"}
    gift = {"name": "gift", "generator": generator, "images_per_experience": ctx.sizes.synthetic_images,
            "synthetic_batch_size": batch_size, "cache_dir": str(tmp / "synthetic")}
    if not demo:
        gift["base_concepts"] = ["red circle", "blue square", "green star"]
    zscl: dict[str, Any] = {"name": "zscl", "batch_size": batch_size}
    generic: dict[str, Any] = {"source": "reference"}
    if not demo:
        zscl.update(reference="folder", reference_folder=stream["root"])
        generic = {"source": "folder", "root": stream["root"]}
    presets: dict[str, list[StepEntry]] = {
        "naive": [StepEntry("naive", [{"name": "naive"}]), StepEntry("naive (second run: noise check)", [{"name": "naive"}])],
        "l2sp": [StepEntry("l2sp", [{"name": "l2sp"}])],
        "ewc": [StepEntry("ewc", [{"name": "ewc"}])],
        "lwf": [StepEntry("lwf", [{"name": "lwf"}])],
        "wiseft": [StepEntry("wiseft", [{"name": "wiseft"}])],
        "ldifs": [StepEntry("ldifs (layers auto)", [{"name": "ldifs"}]), StepEntry("ldifs layers=embed", [{"name": "ldifs", "layers": "embed"}])],
        "fda": [StepEntry("fda", [{"name": "fda"}]), StepEntry("fda, teacher from cache", [{"name": "fda"}], cached_teacher=True)],
        "proxy_fda": [StepEntry("proxy_fda", [{"name": "proxy_fda"}]),
                      StepEntry("proxy_fda, teacher from cache", [{"name": "proxy_fda"}], cached_teacher=True)],
        "zscl": [StepEntry("zscl", [zscl])],
        "gift": [StepEntry("gift", [gift])],
        "awc": [StepEntry("gift + awc", [gift, {"name": "awc"}])],
        "infusing": [StepEntry("infusing", [{"name": "infusing", "generic": generic, "select": {"every": 10_000}}])],
        "infusing_head": [StepEntry("infusing_head", [{"name": "infusing_head"}])],
        "infusing_generic": [StepEntry("infusing_generic", [{"name": "infusing_generic", **generic}])],
        "infusing_l2": [StepEntry("infusing_l2", [{"name": "infusing_l2"}])],
        "infusing_select": [StepEntry("infusing_select", [{"name": "infusing_select", "every": 10_000}])],
    }
    from cl_proxyfda.config import ModelSection

    unavailable: dict[str, str] = {}
    if "prompt_learner" in ModelSection.model_fields:
        n_ctx = 16 if _context_length(ctx.model) >= 64 else 4
        prompt = {"prompt_learner": {"n_ctx": n_ctx}}
        presets["coop"] = [StepEntry(f"coop (prompt learner, n_ctx {n_ctx})", [{"name": "coop"}], model=prompt)]
        presets["prompt_fda"] = [StepEntry("coop + prompt_fda", [{"name": "coop"}, {"name": "prompt_fda"}], model=prompt)]
    else:
        unavailable["coop"] = unavailable["prompt_fda"] = "needs model.prompt_learner, which this version's run config does not offer"
    entries: list[StepEntry] = []
    notes: list[str] = []
    registered = STRATEGIES.names()
    for name in registered:
        if name in presets:
            entries.extend(presets[name])
        elif name in unavailable:
            notes.append(f"{name}: skipped: {unavailable[name]}")
        else:
            notes.append(f"{name}: skipped: no bench preset for this strategy")
    for name in ("coop", "prompt_fda"):
        if name not in registered:
            notes.append(f"{name}: skipped: not registered (`cl-proxyfda list` does not show it)")
    if "naive" not in registered:
        raise UserError("bench steps: the naive strategy is not registered")
    entries.sort(key=lambda e: e.label != "naive")  # the baseline first
    return entries, notes


def _embed_dim(model: str) -> int:
    import open_clip

    from cl_proxyfda.models import register_model_configs

    register_model_configs()
    return int((open_clip.get_model_config(model) or {}).get("embed_dim", 512))


def _context_length(model: str) -> int:
    import open_clip

    from cl_proxyfda.models import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(model) or {}
    return int(cfg.get("text_cfg", {}).get("context_length", 77))


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
    built: list[tuple[StepEntry, Any, StepTimer, IndexedTeacherBank | None]] = []
    for i, entry in enumerate(entries):
        try:
            cfg = ctx.run_config(entry.strategies, batch_size=batch_size, precision=entry.precision or precision, model=model,
                                 pretrained=pretrained, device=dev, name=f"bench{i}", model_extra=entry.model)
            run = build_run(cfg)
            timer = StepTimer(run.device)
            bank = use_cached_teacher(run) if entry.cached_teacher else None
            time_teacher_forwards(run.strategy.teachers, timer)
            timer.attach(run.strategy)
            if bank is not None:
                bank.verify = True
            run.strategy.iterations_for = lambda n: s.prime_iterations  # noqa: B023
            run.strategy.train(run.benchmark.train_stream[0])
            if bank is not None:
                bank.verify = False
                if bank.served == 0 or bank.max_difference > CACHE_CHECK_TOLERANCE:
                    raise RuntimeError(f"cache check failed: {bank.served} batches served, max |cached - forward| = {bank.max_difference:.2e}")
            built.append((entry, run, timer, bank))
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
            entry, run, timer, bank = built[i]
            exp = run.benchmark.train_stream[min(1, len(run.benchmark.train_stream) - 1)]
            run.strategy.iterations_for = lambda n: s.warmup + s.iterations  # noqa: B023
            timer.new_call()
            log.append((i, len(timer.calls) - 1))
            with gc_paused():
                run.strategy.train(exp)
        ctx.echo(f"  repeat {r + 1}/{repeats} done")
    results = []
    for i, (entry, run, timer, bank) in enumerate(built):
        timed = timer.timed(s.warmup)
        steps = [t for t, _ in timed]
        teacher = [tt for _, tt in timed]
        result = StepResult(
            entry.label, statistics.median(steps), statistics.fmean(steps), sum(teacher) / sum(steps),
            statistics.median([t - tt for t, tt in timed]), len(steps), bank,
        )
        if paired and built:
            result.ratio, result.ratio_minus_teacher = _paired_ratios(i, log, built, s.warmup)
        results.append(result)
        if bank is not None and bank.forwarded:
            notes.append(f"{entry.label}: {bank.forwarded} teacher calls could not be served from the cache and ran a forward")
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


def fda_loss_seconds(dim: int, batch: int, proxies: bool, device: torch.device, repeats: int) -> float:
    """Median time of the FDA (``proxies=False``) or Proxy-FDA loss alone on CLIP-like
    features: graph, generator, proxies, both losses, their backward down to the (leaf)
    features and the plugin's own AdamW step, as ``ProxyFDAPlugin.before_backward`` +
    ``after_update`` do, without any backbone (the model's own step is what the
    ``steps`` rows measure)."""
    from cl_proxyfda.strategies.proxy_fda import ProxyFDAParams, ProxyFDAPlugin
    from cl_proxyfda.testing import clip_like_features

    params = ProxyFDAParams(proxies=proxies, k=min(ProxyFDAParams().k, batch - 1))
    plugin = ProxyFDAPlugin(params)
    x = clip_like_features(batch, dim, seed=0)[0].to(device).requires_grad_(True)
    zh = clip_like_features(batch, dim, seed=1)[0].to(device)

    def step() -> None:
        loss, gen_loss = plugin.losses(F.normalize(x, dim=1), zh)
        total = params.weight * loss + (gen_loss if gen_loss is not None else 0.0)
        total.backward()
        x.grad = None
        plugin.after_update(None)

    return median_seconds(step, repeats, device, warmup=2)


def steps_section(ctx: BenchContext) -> Section:
    s = ctx.sizes
    section = Section("steps", "training-step time relative to naive fine-tuning")
    entries, notes = strategy_presets(ctx, s.batch_size)
    results, more = measure_steps(ctx, entries, batch_size=s.batch_size, paired=True)
    notes += more
    by_label = {r.label: r for r in results}
    if "naive" not in by_label:
        raise RuntimeError("bench steps: the naive baseline could not be measured: " + "; ".join(notes))
    base = by_label["naive"]
    section.setting = (
        f"model {ctx.model} ({ctx.pretrained_label}), image tower trained, {ctx.describe_stream()}, batch {s.batch_size}, "
        f"fp32, {ctx.device.type}, train.augment false; {s.iterations} timed iterations (after {s.warmup} warm-up) per call, "
        f"{s.repeats} calls per strategy, each between two naive calls; 'x naive' = median over calls of the call's median step "
        "over the mean median of the two naive calls around it (cancels drifts of the machine's load); times on the 2nd "
        "experience after a short 1st one."
    )
    section.columns = ["strategy", "median ms", "mean ms", "+ms vs naive", "x naive", "teacher fwd %", "x naive, teacher cost subtracted"]
    for r in results:
        assert r.ratio is not None and r.ratio_minus_teacher is not None
        ratio = section.add_ratio(f"step/{r.label}", r.ratio)
        sub = section.add_ratio(f"step_minus_teacher/{r.label}", r.ratio_minus_teacher)
        section.rows.append([r.label, 1000 * r.median, 1000 * r.mean, 1000 * (r.ratio - 1) * base.median, ratio, 100 * r.teacher_share, sub])
    check = by_label.get("naive (second run: noise check)")
    if check is not None and check.ratio is not None:
        section.extra["noise_check_ratio"] = check.ratio
        if abs(check.ratio - 1) > 0.03:
            notes.append(
                f"measurement noise: the second naive run measures {check.ratio:.3f}x the first; ratios closer to 1 than that are not "
                "resolved (on a shared machine, OMP_NUM_THREADS=1 avoids oversubscribed OpenMP threads)."
            )
    ratio_of = {r.label: r.ratio for r in results}
    coop = next((r.label for r in results if r.label.startswith("coop (")), None)
    if coop is not None and "coop + prompt_fda" in ratio_of:
        value = section.add_ratio("coop_prompt_fda_over_coop", ratio_of["coop + prompt_fda"] / ratio_of[coop])
        section.notes.append(f"coop + prompt_fda / coop (both prompt tuning): {value:.3f}")
    ldifs = ratio_of.get("ldifs layers=embed")
    for method, limit in (("fda", 1.07), ("proxy_fda", 1.15)):
        cached = ratio_of.get(f"{method}, teacher from cache")
        if cached is not None:
            section.targets.append(Target(f"{method}, teacher from cache / naive", cached, limit))
    if ldifs is not None:
        for method in ("fda", "proxy_fda"):
            fwd = ratio_of.get(method)
            if fwd is not None:
                ratio = section.add_ratio(f"{method}_over_ldifs_embed", fwd / ldifs)
                section.targets.append(Target(f"{method} / ldifs layers=embed (both run a teacher forward)", ratio, 1.10))
    model_dim = _embed_dim(ctx.model)
    for method, proxies, limit in (("fda", False, 1.07), ("proxy_fda", True, 1.15)):
        parts = []
        for dim in dict.fromkeys((model_dim, 512)):
            t = fda_loss_seconds(dim, s.batch_size, proxies, ctx.device, s.micro_repeats)
            section.extra[f"{method}_loss_ms/dim{dim}"] = 1000 * t
            parts.append(f"{1000 * t:.1f} ms at dim {dim} (break-even naive step for the {limit:.2f}x target: {t / (limit - 1) * 1000:.0f} ms)")
        section.notes.append(
            f"{method} loss alone at batch {s.batch_size} (graph{', generator, proxies' if proxies else ''}, losses, backward, own AdamW "
            f"step; no backbone): " + "; ".join(parts) + ". This cost does not grow with the backbone."
        )
    for r in results:
        if r.bank is not None and r.bank.precompute_seconds:
            pre = statistics.median(r.bank.precompute_seconds)
            section.notes.append(
                f"{r.label}: the table of teacher embeddings is computed once per experience (eval transform, whole training set): "
                f"{1000 * pre:.0f} ms = {pre / base.median:.1f} naive steps; cache check while priming: max |cached - forward| = {r.bank.max_difference:.1e}"
            )
    section.notes += [
        "teacher fwd % = time in frozen-teacher image forwards during the step (TeacherBank's, and those GIFT and ZSCL run "
        "themselves); LwF's previous model is Avalanche's own and is not counted.",
        "'teacher from cache': the runner's sampler indices of each batch are recorded and the pretrained teacher's embeddings "
        "are served from a per-experience table (bench-side IndexedTeacherBank, see cl_proxyfda/bench.py); core has no such option.",
        "wiseft works only at the end of an experience: its ratio, like the second naive run's, shows the measurement noise.",
        "ewc and lwf (Avalanche's plugins) cost more with every experience seen: the bench re-trains the 2nd experience, so they "
        "see 1 earlier experience in the first timed call and 2 from the second on. Avalanche's EWC sums its penalty over every "
        "parameter of the model, the frozen text tower included.",
    ] + notes
    return section


# ------------------------------------------------------------------------ eval
def eval_section(ctx: BenchContext) -> Section:
    from cl_proxyfda.runner import build_run, evaluate_row

    s = ctx.sizes
    section = Section("eval", "zero-shot evaluation: text-embedding cache, and evaluation vs a bare forward pass")
    run = build_run(ctx.run_config([{"name": "naive"}]))
    model, device = run.model, run.device
    model.to(device)
    evaluate_row(run)  # row 0: fills the evaluator's input cache and the class heads
    run.strategy.iterations_for = lambda n: s.prime_iterations
    run.strategy.train(run.benchmark.train_stream[0])
    evaluator = run.evaluator
    sets = len(evaluator.datasets)
    n_images = sum(len(d) for d in evaluator.datasets)
    batches = []
    for ds in evaluator.datasets:
        xs = [evaluator.transform(ds[i][0]) for i in range(len(ds))]
        batches += [torch.stack(xs[j : j + evaluator.batch_size]) for j in range(0, len(xs), evaluator.batch_size)]

    def forward_pass() -> None:
        model.eval()
        with torch.no_grad():
            for x in batches:
                if run.amp is not None:
                    with torch.autocast(device.type, dtype=run.amp):
                        model.encode_image(x.to(device))
                else:
                    model.encode_image(x.to(device))
        model.train()

    def refill_heads() -> None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for t in range(len(model.tasks)):
                model.class_embeddings(t)
        model.train(was_training)

    def all_heads() -> None:
        model.text_changed()
        refill_heads()

    def row_cached() -> None:
        evaluate_row(run)

    def row_uncached() -> None:
        handle = model.register_forward_pre_hook(lambda m, args: m.text_changed())
        try:
            evaluate_row(run)
        finally:
            handle.remove()
            model.text_changed()

    calls_before = model.text_encode_calls
    row_cached()
    cached_calls = model.text_encode_calls - calls_before
    calls_before = model.text_encode_calls
    row_uncached()
    uncached_calls = model.text_encode_calls - calls_before
    refill_heads()
    jobs = [("cached", row_cached), ("uncached", row_uncached), ("forward", forward_pass), ("heads", all_heads)]
    times: dict[str, list[float]] = {key: [] for key, _ in jobs}
    rounds = max(4, s.repeats * 3)
    with gc_paused():
        for r in range(rounds):
            for key, fn in jobs[r % len(jobs):] + jobs[: r % len(jobs)]:  # rotated: no order bias
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[key].append(time.perf_counter() - t0)
                if key in ("uncached", "heads"):
                    refill_heads()  # untimed: the next cached row finds the heads in the cache
    med = {k: statistics.median(v) for k, v in times.items()}
    n_batches = len(batches)
    section.setting = (
        f"model {ctx.model} ({ctx.pretrained_label}) after one experience (image tower trained), {ctx.describe_stream()}: "
        f"{sets} test sets (tasks{' + control' if run.stream.control is not None else ''}), {n_images} images in {n_batches} batches "
        f"of up to {evaluator.batch_size}, {device.type}; median of {rounds} rounds, order rotated; preprocessed inputs are in "
        "the evaluator's memory cache."
    )
    section.columns = ["what", "median ms", "ratio", "class-head computations"]
    r_text = section.add_ratio("eval_without_text_cache_over_with", med["uncached"] / med["cached"])
    r_fwd = section.add_ratio("eval_row_over_forward_pass", med["cached"] / med["forward"])
    section.rows = [
        ["evaluation row after an experience, text cache on", 1000 * med["cached"], 1.0, cached_calls],
        ["evaluation row, text cache off (text_changed() before each batch)", 1000 * med["uncached"], r_text, uncached_calls],
        ["one image forward pass over the same test sets (encode_image only)", 1000 * med["forward"], 1 / r_fwd, 0],
        ["class heads of every test set's vocabulary, computed once", 1000 * med["heads"], med["heads"] / med["cached"], len(model.tasks)],
    ]
    section.targets.append(Target("evaluation row after an experience / one forward pass", r_fwd, 1.10))
    section.notes.append(
        f"without the cache every batch recomputes its task's class heads ({uncached_calls} computations per row instead of "
        f"{cached_calls}); here that costs {r_text:.2f}x. The saving grows with batches per test set and with prompts per head "
        "(ImageNet-sized vocabularies: 1000 classes x 80 templates)."
    )
    return section


# ------------------------------------------------------------------------- knn
def knn_section(ctx: BenchContext) -> Section:
    from cl_proxyfda.knn import FeatureBank

    s = ctx.sizes
    section = Section("knn", "neighbour search: torch top-k vs faiss FeatureBank")
    gen = torch.Generator().manual_seed(0)
    section.columns = ["bank size", "torch top-k ms", "faiss search ms", "faiss / torch", "faiss, BLAS path ms", "BLAS path / torch",
                       "faiss build ms", "neighbours agree"]
    agreements: dict[str, float] = {}
    agreements_blas: dict[str, float] = {}
    default_threshold = blas_threshold()
    for n in s.knn_sizes:
        bank = torch.randn(n, s.knn_dim, generator=gen)
        queries = torch.randn(s.knn_queries, s.knn_dim, generator=gen)
        t0 = time.perf_counter()
        fbank = FeatureBank(bank)
        build = time.perf_counter() - t0
        bank_n = F.normalize(bank, dim=1)

        def torch_search() -> tuple[torch.Tensor, torch.Tensor]:
            sims = F.normalize(queries, dim=1) @ bank_n.t()
            return sims.topk(s.knn_k, dim=1)

        def faiss_search() -> tuple[torch.Tensor, torch.Tensor]:
            return fbank.search(queries, s.knn_k)

        def faiss_blas_search() -> tuple[torch.Tensor, torch.Tensor]:
            with faiss_blas_threshold(1):
                return fbank.search(queries, s.knn_k)

        jobs = [("torch", torch_search), ("faiss", faiss_search), ("blas", faiss_blas_search)]
        times: dict[str, list[float]] = {k: [] for k, _ in jobs}
        with gc_paused():
            for r in range(s.micro_repeats):
                for key, fn in jobs[r % 3:] + jobs[: r % 3]:
                    t0 = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t0)
        _, idx_t = torch_search()
        agree = {key: float(np.mean([set(a.tolist()) == set(b.tolist()) for a, b in zip(idx_t, fn()[1])])) for key, fn in jobs[1:]}
        agreements[str(n)], agreements_blas[str(n)] = agree["faiss"], agree["blas"]
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = section.add_ratio(f"faiss_over_torch/{n}", med["faiss"] / med["torch"])
        ratio_blas = section.add_ratio(f"faiss_blas_over_torch/{n}", med["blas"] / med["torch"])
        shown = "100%" if min(agree.values()) == 1.0 else f"{100 * agree['faiss']:.0f}% / {100 * agree['blas']:.0f}%"
        section.rows.append([n, 1000 * med["torch"], 1000 * med["faiss"], ratio, 1000 * med["blas"], ratio_blas, 1000 * build, shown])
    section.extra["agreement"] = agreements
    section.extra["agreement_blas_path"] = agreements_blas
    section.setting = (
        f"{s.knn_queries} queries, dim {s.knn_dim}, k = {s.knn_k}, exact cosine search (random Gaussian features, L2-normalised); "
        f"median of {s.micro_repeats} rounds, order rotated; CPU, {torch.get_num_threads()} torch threads, faiss {faiss_threads()} threads."
    )
    section.notes += [
        "neighbours agree = share of queries whose k neighbour sets are identical in torch and faiss (both faiss paths).",
        f"faiss searches with its BLAS (matrix-product) path only when queries x dim reaches faiss.cvar.distance_compute_blas_threshold "
        f"({default_threshold} in this faiss build; {s.knn_queries} x {s.knn_dim} = {s.knn_queries * s.knn_dim}), else query by query; "
        "'BLAS path' sets the threshold to 1 for the call (restored afterwards).",
    ]
    return section


def blas_threshold() -> int | None:
    import faiss

    cvar = getattr(faiss, "cvar", None)
    return int(cvar.distance_compute_blas_threshold) if cvar is not None and hasattr(cvar, "distance_compute_blas_threshold") else None


@contextlib.contextmanager
def faiss_blas_threshold(value: int) -> Iterator[None]:
    """Temporarily set faiss's query-count threshold for its BLAS search path."""
    import faiss

    old = blas_threshold()
    if old is None:
        yield
        return
    faiss.cvar.distance_compute_blas_threshold = value
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


def faiss_threads() -> int:
    import faiss

    return int(faiss.omp_get_max_threads())


# ------------------------------------------------------------------------- awc
def awc_section(ctx: BenchContext) -> Section:
    from cl_proxyfda.losses.awc import awc_penalty, importance_from_grads, snapshot
    from cl_proxyfda.strategies.anchors import trainable_named_parameters

    s = ctx.sizes
    section = Section("awc", "AWC's per-iteration cost relative to a naive step")
    results, notes = measure_steps(ctx, [StepEntry("naive", [{"name": "naive"}])], batch_size=s.batch_size)
    if not results:
        raise RuntimeError("bench awc: the naive step could not be measured: " + "; ".join(notes))
    step = results[0].median
    from cl_proxyfda.runner import build_run

    run = build_run(ctx.run_config([{"name": "naive"}]))
    run.strategy.iterations_for = lambda n: 1
    run.strategy.train(run.benchmark.train_stream[0])  # leaves the last step's gradients in .grad
    named = trainable_named_parameters(run.strategy)
    grads = {n: p.grad for n, p in named}
    if any(g is None for g in grads.values()):
        raise RuntimeError("bench awc: some trainable parameters have no gradient after a step")
    params = dict(named)
    anchor = {n: (p.detach() + 1e-3 * torch.randn_like(p)) for n, p in named}
    importance = importance_from_grads(grads, params)
    device = run.device

    def penalty_forward_backward() -> None:
        loss = awc_penalty(named, anchor, importance)
        torch.autograd.grad(loss, [p for _, p in named])

    t_imp = median_seconds(lambda: importance_from_grads(grads, params), s.micro_repeats, device)
    t_pen = median_seconds(penalty_forward_backward, s.micro_repeats, device)
    t_snap = median_seconds(lambda: snapshot(named), s.micro_repeats, device)
    n_params = sum(p.numel() for _, p in named)
    section.setting = (
        f"model {ctx.model} ({ctx.pretrained_label}), image tower trained ({n_params:,} parameters in {len(named)} tensors), "
        f"batch {s.batch_size}, {device.type}; naive step: median as in the steps section; AWC parts: median of {s.micro_repeats} calls."
    )
    section.columns = ["what", "median ms", "x naive step"]
    section.rows.append(["naive step", 1000 * step, 1.0])
    for label, key, t in (("importance_from_grads (all trainable tensors)", "importance", t_imp),
                          ("awc_penalty forward + backward", "penalty", t_pen),
                          ("anchor snapshot (once per experience)", "snapshot", t_snap)):
        section.rows.append([label, 1000 * t, section.add_ratio(f"awc_{key}_over_naive_step", t / step)])
    section.notes.append("AWC's gradient of the synthetic loss is shared with the update (reuse_gradient), so it is not counted here; "
                         "see the steps section's 'gift + awc' row for the whole step.")
    section.notes += notes
    return section


# ------------------------------------------------------------------ generation
def generation_section(ctx: BenchContext) -> Section:
    from cl_proxyfda.generators.cache import SyntheticCache
    from cl_proxyfda.generators.diffusers_backend import DiffusersGenerator, build_tiny_pipeline

    s = ctx.sizes
    section = Section("generation", "tiny diffusers pipeline: batched vs one at a time; synthetic cache hit vs generation")
    pipe = ctx.tmp / "tiny_pipeline"
    if not pipe.is_dir():
        build_tiny_pipeline(pipe)
    dev = "cuda" if ctx.device.type == "cuda" else "cpu"
    common = {"model": str(pipe), "steps": s.generation_steps, "device": dev, "drop_black": False, "progress": False}
    batched = DiffusersGenerator(batch_size=s.generation_batch, **common)
    single = DiffusersGenerator(batch_size=1, **common)
    n = s.generation_batch
    prompts = [f"a photo of a {c} circle." for c in ("red", "green", "blue", "yellow", "purple", "cyan", "orange", "gray")]
    prompts = (prompts * (n // len(prompts) + 1))[:n]
    seeds = list(range(n))
    batched.generate(prompts[:1], seeds[:1])
    single.generate(prompts[:1], seeds[:1])
    tb, ts = [], []
    for _ in range(s.repeats):
        for gen, store in ((batched, tb), (single, ts)):
            _sync(ctx.device)
            t0 = time.perf_counter()
            images = gen.generate(prompts, seeds)
            _sync(ctx.device)
            store.append(time.perf_counter() - t0)
            if len(images) != n:
                raise RuntimeError(f"bench generation: {len(images)} images for {n} prompts")
    ips_b, ips_s = n / statistics.median(tb), n / statistics.median(ts)
    section.columns = ["what", "median ms", "images/s", "ratio"]
    r_batch = section.add_ratio("generation_batched_over_single_images_per_s", ips_b / ips_s)
    section.rows += [
        [f"batch of {n} in one pipeline call", 1000 * statistics.median(tb), ips_b, r_batch],
        [f"{n} calls of one image", 1000 * statistics.median(ts), ips_s, 1.0],
    ]
    m = s.cache_images
    cprompts = (prompts * (m // len(prompts) + 1))[:m]
    cseeds = list(range(100, 100 + m))
    tg, th = [], []
    for r in range(s.repeats):
        cache = SyntheticCache(ctx.tmp / f"cache_{r}")
        t0 = time.perf_counter()
        cache.ensure(cprompts, cseeds, batched, progress=False)
        tg.append(time.perf_counter() - t0)
        if cache.stats.get("generated") != m:
            raise RuntimeError(f"bench generation: expected {m} generated images, got {cache.stats}")
        t0 = time.perf_counter()
        cache.ensure(cprompts, cseeds, batched, progress=False)
        data = cache.load(cprompts, cseeds)
        _ = [data[i][0].size for i in range(len(data))]
        th.append(time.perf_counter() - t0)
        if cache.stats.get("reused") != m:
            raise RuntimeError(f"bench generation: expected {m} reused images, got {cache.stats}")
    mg, mh = statistics.median(tg), statistics.median(th)
    r_cache = section.add_ratio("cache_generation_over_hit", mg / mh)
    section.rows += [
        [f"SyntheticCache.ensure, {m} images generated and written", 1000 * mg, m / mg, r_cache],
        [f"cache hit: ensure (all reused, SHA-256 checked) + load + decode {m} images", 1000 * mh, m / mh, 1.0],
    ]
    section.setting = (
        f"tiny random Stable Diffusion pipeline (build_tiny_pipeline, 32x32 images), {s.generation_steps} steps, guidance 7.5, "
        f"{dev}, fp32 on CPU / fp16 on CUDA; median of {s.repeats} interleaved repeats (after one warm-up call each)."
    )
    return section


# ------------------------------------------------------------------------- gpu
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
"""Stable Diffusion 1.5's UNet configuration (random weights are enough for timings)."""


def unet_images_per_second(config: dict[str, Any], device: torch.device, dtype: torch.dtype, batch: int, steps: int,
                           text_len: int = 77) -> float:
    """Images per second of ``steps`` denoising steps with classifier-free guidance
    (UNet on 2 x batch latents per step, DPM-Solver scheduler); no VAE or text encoder."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device=device, dtype=dtype).eval()
    size = int(config["sample_size"])
    cond = torch.randn(2 * batch, text_len, int(config["cross_attention_dim"]), device=device, dtype=dtype)

    def generate(n_steps: int) -> None:
        scheduler = DPMSolverMultistepScheduler()
        scheduler.set_timesteps(n_steps)
        latents = torch.randn(batch, int(config["in_channels"]), size, size, device=device, dtype=dtype)
        with torch.no_grad():
            for t in scheduler.timesteps:
                noise = unet(torch.cat([latents, latents]), t, encoder_hidden_states=cond).sample
                uncond, text = noise.chunk(2)
                latents = scheduler.step(uncond + 7.5 * (text - uncond), t, latents).prev_sample

    generate(2)
    seconds = median_seconds(lambda: generate(steps), 3, device, warmup=0)
    del unet
    return batch / seconds


def gpu_section(ctx: BenchContext, device: torch.device | None = None, clip_model: str | None = None,
                unet_config: dict[str, Any] | None = None, unet_dtype: torch.dtype | None = None) -> Section:
    """CLIP step times at both precisions and the UNet's images/s (CUDA; the arguments let
    the same code run on small stand-ins)."""
    section = Section("gpu", "CLIP ViT-B/16 step times (fp32, bf16) and an SD-1.5-sized UNet")
    if device is None:
        if not torch.cuda.is_available():
            section.skipped = "no CUDA device"
            return section
        device = torch.device("cuda")
    s = ctx.sizes
    clip_model = clip_model or s.gpu_model
    gift = next(e for e in strategy_presets(ctx, s.gpu_batch_size)[0] if e.label == "gift")
    kinds = [("naive", [{"name": "naive"}]), ("proxy_fda (teacher forward)", [{"name": "proxy_fda"}]),
             ("gift (synthetic batch + distillation)", gift.strategies)]
    precisions = ("fp32", "bf16")
    entries = [StepEntry(f"{p} {label}", strategies, precision=p) for p in precisions for label, strategies in kinds]
    results, notes = measure_steps(ctx, entries, batch_size=s.gpu_batch_size, model=clip_model, pretrained=None, device=device)
    section.notes += notes
    section.columns = ["precision", "strategy", "median ms", "x naive (same precision)", "teacher fwd %", "bf16 speed-up"]
    by = {r.label: r for r in results}
    for p in precisions:
        base = by.get(f"{p} naive")
        for label, _ in kinds:
            r = by.get(f"{p} {label}")
            if base is None or r is None:
                continue
            ratio = section.add_ratio(f"{p}/{label}", r.median / base.median)
            fp32 = by.get(f"fp32 {label}")
            speed = section.add_ratio(f"bf16_speedup/{label}", fp32.median / r.median) if p == "bf16" and fp32 is not None else None
            section.rows.append([p, label, 1000 * r.median, ratio, 100 * r.teacher_share, speed])
    del results, by
    if device.type == "cuda":
        torch.cuda.empty_cache()
    config = unet_config or SD15_UNET
    dtype = unet_dtype or torch.float16
    ips = unet_images_per_second(config, device, dtype, s.gpu_unet_batch, s.gpu_unet_steps)
    section.extra["unet_images_per_second"] = ips
    section.notes.append(
        f"SD-1.5-sized UNet ({'SD 1.5 config' if unet_config is None else 'given config'}, random weights, {str(dtype).replace('torch.', '')}): "
        f"{ips:.2f} images/s at {s.gpu_unet_steps} steps with classifier-free guidance, batch {s.gpu_unet_batch}, "
        f"{config['sample_size']}x{config['sample_size']} latents; "
        "UNet and scheduler only (no text encoder, no VAE decode)."
    )
    section.setting = (
        f"{clip_model} (open_clip, random weights), image tower trained, {ctx.describe_stream()} (images resized by the model's transform), "
        f"batch {s.gpu_batch_size}, {device.type}; median of {s.iterations} timed iterations x {s.repeats} repeats, all six runs interleaved; "
        "bf16 = torch.autocast (run.precision: bf16)."
    )
    return section


# ---------------------------------------------------------------------- driver
SECTION_FUNCTIONS: dict[str, Callable[[BenchContext], Section]] = {
    "steps": steps_section, "eval": eval_section, "knn": knn_section, "awc": awc_section,
    "generation": generation_section, "gpu": gpu_section,
}


def default_model() -> tuple[str, str | None]:
    """The demo model with its shipped weights when present, else the random test model."""
    from cl_proxyfda.models import SHIPPED_WEIGHTS

    return (DEMO_MODEL, DEMO_TAG) if SHIPPED_WEIGHTS[DEMO_TAG].is_file() else (TEST_MODEL, None)


def run_bench(
    out: str | Path | None = None,
    quick: bool = False,
    sections: str | Sequence[str] | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    repeats: int | None = None,
    echo: Callable[[str], None] | None = None,
    command: str = "cl-proxyfda bench",
) -> dict[str, Any]:
    """Run the chosen sections and return the report; with ``out`` also write
    ``bench.json`` and ``bench.md`` there (each atomically).

    ``model``/``pretrained``: default the demo model with ``pretrained: demo`` when its
    weights are shipped, else ``cl-test-tiny`` with random weights; a model given without
    ``pretrained`` has random weights.
    """
    names = parse_sections(sections)
    if repeats is not None and repeats < 1:
        raise UserError(f"--repeats: must be >= 1 (got {repeats})")
    if model is None:
        model, default_tag = default_model()
        pretrained = default_tag if pretrained is None else pretrained
    from cl_proxyfda.models import list_model_names

    if model not in list_model_names():
        raise UserError(f"--model: unknown open_clip model {model!r} (see `cl-proxyfda list`)")
    if pretrained in ("", "none", "random"):
        pretrained = None
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out: {out_dir} exists and is not a folder")
    say = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    sizes = QUICK if quick else FULL
    if repeats is not None:
        sizes = replace(sizes, repeats=repeats)
    info = machine_info()
    line = machine_line(info)
    say(line)
    warnings_: list[str] = []
    load, cores = info.get("load_average"), info["usable_cores"] or 1
    if load is not None and info["torch_threads"] > 1 and load >= cores:
        warnings_.append(
            f"the machine is busy (load average {load} on {cores} cores) and torch uses {info['torch_threads']} threads: "
            "oversubscribed OpenMP threads make step times erratic; OMP_NUM_THREADS=1 gives steadier ratios"
        )
    for w in warnings_:
        say(f"warning: {w}")
    t_start = time.perf_counter()
    done: list[Section] = []
    with tempfile.TemporaryDirectory(prefix="clpfda-bench-") as tmp:
        ctx = BenchContext(sizes, model, pretrained, torch.device("cuda" if torch.cuda.is_available() else "cpu"), Path(tmp), say)
        for name in names:
            say(f"[bench] {name} ...")
            t0 = time.perf_counter()
            section = SECTION_FUNCTIONS[name](ctx)
            section.seconds = time.perf_counter() - t0
            done.append(section)
            say(f"[bench] {name}: {section.seconds:.1f} s" + (f" (skipped: {section.skipped})" if section.skipped else ""))
    report: dict[str, Any] = {
        "machine": info, "machine_line": line, "command": command, "mode": "quick" if quick else "full",
        "options": {"sections": names, "model": model, "pretrained": pretrained, "repeats": sizes.repeats, "quick": quick},
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.__dict__.items()},
        "seconds": time.perf_counter() - t_start, "warnings": warnings_,
        "sections": {s.name: s.to_dict() for s in done},
    }
    markdown = report_markdown(report, done)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(out_dir / "bench.json", json.dumps(report, indent=1))
        _write_atomic(out_dir / "bench.md", markdown)
    report["markdown"] = markdown
    return report
