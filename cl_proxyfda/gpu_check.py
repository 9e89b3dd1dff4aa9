"""``cl-proxyfda gpu-check``: one command that runs the GPU paths and writes what it measured.

Three phases, each reported with its wall time, written to ``gpu_check.md`` and
``gpu_check.json`` (atomically, after every phase, so a run cut short keeps what it did):

1. ``steps``: CLIP step time and peak memory of naive, FDA, Proxy-FDA, LDIFS, ZSCL and
   GIFT+AWC (the bench's presets and :func:`~cl_proxyfda.tools.bench.measure_steps`), bf16
   autocast; one strategy at a time so that ``torch.cuda.max_memory_allocated`` (reset
   before each) is that strategy's peak.
2. ``rehearsal``: a 2-task MTIL run (EuroSAT, MNIST) through the real runner
   (:func:`~cl_proxyfda.runner.run_config`), bf16 autocast, Proxy-FDA with the teacher in
   half precision (``run.teacher_half``), on miniature torchvision-layout copies of the
   two datasets written by the command (:func:`write_mtil_miniature`).
3. ``unet``: images per second of an SD-1.5-sized UNet in fp16
   (:func:`~cl_proxyfda.tools.bench.unet_images_per_second`).

On CUDA the full sizes (ViT-B/16 with random weights, batch 64, SD-1.5 UNet) aim to
finish within 8 minutes; ``tiny`` runs the same code with ``cl-test-tiny``, batch 8, a
tiny UNet and 2 iterations (the CPU mode; implied on CPU).
"""
from __future__ import annotations

import gc
import json
import math
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from cl_proxyfda.device import resolve_device
from cl_proxyfda.errors import UserError
from cl_proxyfda.io import write_atomic
from cl_proxyfda.results import to_jsonable
from cl_proxyfda.tools.bench import FULL, SD15_UNET, BenchContext, BenchSizes, machine_info, measure_steps, strategy_presets, unet_images_per_second

TARGET_SECONDS = 480
"""The full-size check is meant to finish within 8 minutes on one CUDA device."""

STEP_STRATEGIES = (
    ("naive", "naive"), ("FDA", "fda"), ("Proxy-FDA", "proxy_fda"), ("LDIFS", "ldifs (layers auto)"),
    ("ZSCL", "zscl"), ("GIFT+AWC", "gift + awc"),
)
"""(name in the report, label of the bench preset) of every strategy timed in phase 1."""

MTIL_TASKS = ("EuroSAT", "MNIST")
TINY_UNET = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64), "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 32,
}
"""The UNet of the tiny test pipeline (``build_tiny_pipeline``)."""


@dataclass(frozen=True)
class CheckSizes:
    """How much each phase does (``GPU`` on CUDA, ``TINY`` with ``--tiny`` and on CPU)."""

    clip_model: str
    batch_size: int
    bench: BenchSizes
    rehearsal_iterations: int
    eurosat_per_class: int  # EuroSAT images per class (80% train, 20% test, torchvision's random split)
    mnist_train: int
    mnist_test: int
    workers: int
    fda_k: int | None = None  # FDA / Proxy-FDA neighbours (None: the default 8, which needs batches of more than 8; with class-balanced batches of 4 images a class, K must exceed 4)
    unet_config: dict[str, Any] = field(default_factory=lambda: dict(SD15_UNET))
    unet_batch: int = 8
    unet_steps: int = 25


GPU = CheckSizes(
    "ViT-B-16", 64, replace(FULL, batch_size=64, warmup=2, iterations=10, repeats=2, gpu_batch_size=64), rehearsal_iterations=10,
    eurosat_per_class=16, mnist_train=128, mnist_test=64, workers=4,
)
TINY = CheckSizes(
    "cl-test-tiny", 8,
    BenchSizes(batch_size=8, warmup=1, iterations=2, prime_iterations=1, repeats=1, train_per_class=4, test_per_class=4,
               control_per_class=4, reference_size=16, synthetic_images=8, gpu_batch_size=8),
    rehearsal_iterations=2, eurosat_per_class=2, mnist_train=16, mnist_test=10, workers=0, fda_k=5,
    unet_config=dict(TINY_UNET), unet_batch=1, unet_steps=2,
)


# ------------------------------------------------------------------------ data
def _save_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file (big-endian int32 header, uint8 payload)."""
    header = np.array([0x0800 + array.ndim, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mtil_miniature(root: str | Path, eurosat_per_class: int = 4, mnist_train: int = 20, mnist_test: int = 10, seed: int = 0) -> Path:
    """Write miniature EuroSAT and MNIST copies in the on-disk layouts torchvision's
    dataset classes read (``root/eurosat/2750/CLASS/*.jpg``, 64x64 RGB;
    ``root/MNIST/raw/*-ubyte``, 28x28 grey), for ``stream: {name: mtil, format:
    torchvision, tasks: [EuroSAT, MNIST]}``. Images are class-dependent noise; labels of
    MNIST cycle 0..9. Returns ``root``."""
    from cl_proxyfda.benchmarks.mtil import EUROSAT_FOLDERS

    root = Path(root)
    rng = np.random.default_rng(seed)
    for k, folder in enumerate(EUROSAT_FOLDERS):
        out = root / "eurosat" / "2750" / folder
        out.mkdir(parents=True, exist_ok=True)
        base = np.array([25 * k % 256, 255 - 25 * k, 80 + 17 * k % 176], dtype=np.float32)
        for i in range(eurosat_per_class):
            pixels = np.clip(base + rng.normal(0, 25, size=(64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(out / f"{folder}_{i + 1}.jpg", quality=90)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", mnist_train), ("t10k", mnist_test)):
        labels = np.arange(n) % 10
        images = np.clip(labels[:, None, None] * 25 + rng.normal(0, 20, size=(n, 28, 28)), 0, 255)
        _save_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _save_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


# ---------------------------------------------------------------------- report
@dataclass
class Phase:
    """One phase's outcome: a table, its numbers, notes, wall time, or the error it hit."""

    name: str
    title: str
    status: str = "not run"  # not run | running (in a report written while it runs, or cut short) | ok | failed
    seconds: float = 0.0
    setting: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("title", "status", "seconds", "setting", "columns", "rows", "values", "notes", "error", "traceback")}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def report_markdown(report: dict[str, Any], phases: list[Phase]) -> str:
    lines = [
        "# cl-proxyfda gpu-check", "",
        f"- device: {report['device']} ({report['device_name']})",
        f"- torch {report['torch']}" + (f", CUDA {report['cuda']}" if report["cuda"] else "") + f"; Python {report['machine']['python']}",
        f"- command: `{report['command']}`",
        f"- process command line: `{report['process_command_line']}`",
        f"- sizes: {'tiny' if report['tiny'] else 'full'}; {report['seconds']:.1f} s in all"
        + ("" if report["complete"] else " (incomplete: see the phases below)"),
        "",
    ]
    lines += [f"note: {n}" for n in report["notes"]] + ([""] if report["notes"] else [])
    for i, p in enumerate(phases, 1):
        lines += [f"## {i}. {p.name}: {p.title}", "", f"status: **{p.status}**" + (f" ({p.seconds:.1f} s)" if p.status in ("ok", "failed") else ""), ""]
        if p.setting:
            lines += [p.setting, ""]
        if p.error:
            lines += [f"error: `{p.error}`", ""]
        if p.rows:
            lines.append("| " + " | ".join(p.columns) + " |")
            lines.append("|" + "|".join("---" for _ in p.columns) + "|")
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in p.rows]
            lines.append("")
        lines += [f"- {n}" for n in p.notes] + ([""] if p.notes else [])
    return "\n".join(lines)


def _with_k(strategies: list[dict[str, Any]], k: int | None) -> list[dict[str, Any]]:
    """The strategy entries with ``k`` set on FDA and Proxy-FDA (unchanged when ``k`` is None)."""
    return [{**s, "k": k} if k is not None and s["name"] in ("fda", "proxy_fda") else dict(s) for s in strategies]


# ---------------------------------------------------------------------- memory
def _reset_memory(device: torch.device) -> float | None:
    """Free what can be freed and reset the CUDA peak; returns the MB still allocated."""
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**20


def _peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


# ---------------------------------------------------------------------- phases
def steps_phase(phase: Phase, ctx: BenchContext, sizes: CheckSizes, echo: Callable[[str], None]) -> None:
    device = ctx.device
    presets = strategy_presets(ctx, sizes.batch_size)
    by_label = {e.label: e for e in presets}
    missing = [label for _, label in STEP_STRATEGIES if label not in by_label]
    if missing:
        raise RuntimeError(f"no bench preset labelled {missing} (registered strategies changed?)")
    s = sizes.bench
    phase.setting = (
        f"{sizes.clip_model} (open_clip, random weights), image tower trained, {ctx.describe_stream()}, batch {sizes.batch_size}, "
        f"bf16 autocast (run.precision: bf16), {device.type}; each strategy alone: built, primed for {s.prime_iterations} "
        f"iterations on the 1st experience, then {s.repeats} calls of {s.warmup} warm-up + {s.iterations} timed iterations on the "
        "2nd (bench.measure_steps); peak memory = torch.cuda.max_memory_allocated, reset before each strategy."
    )
    if sizes.fda_k is not None:
        phase.setting += f" FDA and Proxy-FDA with k = {sizes.fda_k} (the default 8 needs batches of more than 8)."
    phase.columns = ["strategy", "bench preset", "median ms", "mean ms", "x naive", "teacher fwd %", "peak GPU MB", "allocated before MB"]
    base = None
    failed = []
    for k, (name, label) in enumerate(STEP_STRATEGIES, 1):
        echo(f"[gpu-check] 1/3 steps: {name} ({k}/{len(STEP_STRATEGIES)})")
        before = _reset_memory(device)
        entry = replace(by_label[label], strategies=_with_k(by_label[label].strategies, sizes.fda_k))
        results, notes = measure_steps(ctx, [entry], batch_size=sizes.batch_size, precision="bf16", model=sizes.clip_model,
                                       pretrained=None, device=device)
        peak = _peak_mb(device)
        if not results:
            failed.append(name)
            phase.notes += [f"{name}: {n}" for n in notes] or [f"{name}: not measured"]
            phase.rows.append([name, label, None, None, None, None, peak, before])
            continue
        r = results[0]
        if name == "naive":
            base = r.median
        ratio = r.median / base if base else None
        phase.rows.append([name, label, 1000 * r.median, 1000 * r.mean, ratio, 100 * r.teacher_share, peak, before])
        phase.values[name] = {"median_ms": 1000 * r.median, "mean_ms": 1000 * r.mean, "x_naive": ratio, "teacher_share": r.teacher_share,
                              "timed_iterations": r.count, "peak_memory_mb": peak, "allocated_before_mb": before}
        phase.notes += [f"{name}: {n}" for n in notes]
        echo(f"[gpu-check]   {name}: {1000 * r.median:.1f} ms/step" + (f", peak {peak:.0f} MB" if peak is not None else ""))
    if device.type != "cuda":
        phase.notes.append("peak GPU memory: not measured on CPU")
    phase.notes.append("strategies run one after another, not interleaved (each needs its own memory peak); 'x naive' is a ratio of "
                       "medians measured minutes apart.")
    if failed:
        raise RuntimeError(f"not measured: {', '.join(failed)} (see the notes)")


def rehearsal_phase(phase: Phase, tmp: Path, sizes: CheckSizes, device: torch.device, echo: Callable[[str], None]) -> None:
    from cl_proxyfda.config import parse_config
    from cl_proxyfda.runner import run_config

    echo("[gpu-check] 2/3 rehearsal: writing miniature EuroSAT and MNIST (torchvision layouts)")
    t0 = time.perf_counter()
    root = write_mtil_miniature(tmp / "mtil", sizes.eurosat_per_class, sizes.mnist_train, sizes.mnist_test)
    write_seconds = time.perf_counter() - t0
    raw = {
        "run": {"name": "gpu-check-mtil", "seed": 0, "device": device.type, "precision": "bf16", "teacher_half": True,
                "output_dir": str(tmp / "runs")},
        "model": {"name": sizes.clip_model, "pretrained": None, "train_towers": ["image"]},
        "stream": {"name": "mtil", "root": str(root), "format": "torchvision", "order": "I", "tasks": list(MTIL_TASKS)},
        "train": {"lr": 1e-5, "iterations": sizes.rehearsal_iterations, "batch_size": sizes.batch_size, "workers": sizes.workers},
        "strategies": _with_k([{"name": "proxy_fda"}], sizes.fda_k),
        "eval": {"batch_size": 256},
        "logging": {"wandb": {"mode": "disabled"}, "plots": False, "progress": False},
        "checkpoint": {"enabled": False},
    }
    cfg = parse_config(raw)
    echo(f"[gpu-check] 2/3 rehearsal: {sizes.clip_model}, Proxy-FDA, {len(MTIL_TASKS)} tasks x {sizes.rehearsal_iterations} iterations")
    _reset_memory(device)
    t0 = time.perf_counter()
    results = run_config(cfg, tmp / "runs" / "mtil", quiet=True)
    total = time.perf_counter() - t0
    peak = _peak_mb(device)
    matrix = results.matrix()
    diags = results.diagnostics[1:]
    experiences = sum(d["seconds"] for d in diags)
    phase.setting = (
        f"stream mtil (format: torchvision, order I, tasks {', '.join(results.task_names)}) on miniature copies written by the command "
        f"(EuroSAT {10 * sizes.eurosat_per_class} images, 80/20 split; MNIST {sizes.mnist_train} train / {sizes.mnist_test} test), "
        f"{sizes.clip_model} random weights, image tower, Proxy-FDA, batch {sizes.batch_size}, {sizes.rehearsal_iterations} iterations "
        f"per experience, bf16 autocast, run.teacher_half: true, train.workers {sizes.workers}, {device.type}; "
        "through cl_proxyfda.runner.run_config."
    )
    phase.columns = ["phase", "wall s", "peak memory MB (cumulative)"]
    phase.rows.append(["write the miniature datasets", write_seconds, None])
    phase.rows.append(["build the run + zero-shot evaluation (row 0)", total - experiences, None])
    timings = {"write_data": write_seconds, "setup_and_row0": total - experiences}
    for name, d in zip(results.task_names, diags):
        phase.rows.append([f"{name}: train", d["train_seconds"], None])
        phase.rows.append([f"{name}: evaluate all tasks", d["seconds"] - d["train_seconds"], d.get("peak_memory_mb")])
        timings[f"{name}/train"] = d["train_seconds"]
        timings[f"{name}/evaluate"] = d["seconds"] - d["train_seconds"]
    phase.rows.append(["run_config in all", total, peak if peak is not None else results.meta.get("peak_memory_mb")])
    phase.values = {
        "accuracy_matrix": matrix.tolist(), "task_names": results.task_names, "timings_s": timings, "run_config_seconds": total,
        "peak_gpu_memory_mb": peak, "runner_peak_memory_mb": results.meta.get("peak_memory_mb"),
        "train_seconds_per_iteration": {n: d["train_seconds"] / sizes.rehearsal_iterations for n, d in zip(results.task_names, diags)},
    }
    phase.notes.append("accuracy matrix (rows: zero-shot, after " + ", after ".join(results.task_names) + "): "
                       + "; ".join("[" + ", ".join(f"{v:.1f}" for v in row) + "]" for row in matrix)
                       + " (random weights and noise images: the numbers only show the path runs)")
    if device.type == "cuda":
        phase.notes.append("peak memory: torch.cuda.max_memory_allocated since the start of the run (reset before it)")
    else:
        phase.notes.append("peak memory: the runner's process max RSS on CPU (not GPU memory); run.teacher_half applies on CUDA only, "
                           "so the teacher stays fp32 here")
    if matrix.shape != (len(MTIL_TASKS) + 1, len(MTIL_TASKS)) or not np.isfinite(matrix).all():
        raise RuntimeError(f"accuracy matrix of shape {matrix.shape} (expected {(len(MTIL_TASKS) + 1, len(MTIL_TASKS))}), finite: {np.isfinite(matrix).all()}")
    echo(f"[gpu-check]   rehearsal: {total:.1f} s" + (f", peak {peak:.0f} MB" if peak is not None else ""))


def unet_phase(phase: Phase, sizes: CheckSizes, device: torch.device, echo: Callable[[str], None]) -> None:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    config = sizes.unet_config
    which = "SD-1.5 UNet configuration" if config == dict(SD15_UNET) else "tiny UNet (build_tiny_pipeline's)"
    echo(f"[gpu-check] 3/3 unet: {which}, {str(dtype).replace('torch.', '')}, batch {sizes.unet_batch}, {sizes.unet_steps} steps")
    _reset_memory(device)
    ips = unet_images_per_second(config, device, dtype, sizes.unet_batch, sizes.unet_steps)
    peak = _peak_mb(device)
    if not (math.isfinite(ips) and ips > 0):
        raise RuntimeError(f"images per second = {ips}")
    phase.setting = (
        f"{which}, random weights, {str(dtype).replace('torch.', '')}, batch {sizes.unet_batch}, {sizes.unet_steps} DPM-Solver steps with "
        f"classifier-free guidance (UNet on 2 x batch latents of {config['sample_size']}x{config['sample_size']}), {device.type}; "
        "median generation of torch.utils.benchmark's Timer.blocked_autorange over 1 s after its warm-up call (bench.unet_images_per_second); "
        "UNet and scheduler only."
    )
    phase.columns = ["images/s", "s per image", "peak GPU MB"]
    phase.rows.append([ips, 1 / ips, peak])
    phase.values = {"images_per_second": ips, "dtype": str(dtype).replace("torch.", ""), "batch": sizes.unet_batch,
                    "steps": sizes.unet_steps, "peak_memory_mb": peak}
    if device.type != "cuda":
        phase.notes.append("fp16 UNet on CPU falls back to fp32")
    echo(f"[gpu-check]   unet: {ips:.2f} images/s")


# ---------------------------------------------------------------------- driver
def resolve_check_device(device: str | None, tiny: bool) -> tuple[torch.device, bool, list[str]]:
    """The device, whether tiny sizes apply, and notes saying what was implied."""
    if device not in (None, "cuda", "cpu"):
        raise UserError(f"--device: must be cuda or cpu (got {device!r})")
    notes: list[str] = []
    resolved = resolve_device(device or "auto", "--device")
    if device is None and resolved.type == "cpu":
        notes.append("no CUDA device: running on CPU")
    if resolved.type == "cpu" and not tiny:
        tiny = True
        notes.append("CPU: --tiny implied (the full sizes need a GPU)")
    return resolved, tiny, notes


def run_gpu_check(out: str | Path = "gpu_check", tiny: bool = False, device: str | None = None, command: str = "cl-proxyfda gpu-check",
                  echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the three phases and write ``gpu_check.md`` / ``gpu_check.json`` into ``out``
    (after every phase); returns the report (``report["complete"]``: every phase ran)."""
    dev, tiny, notes = resolve_check_device(device, tiny)
    out_dir = Path(out)
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"--out: {folder} exists and is not a folder")
            break
    say = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    sizes = TINY if tiny else GPU
    for n in notes:
        say(f"[gpu-check] note: {n}")
    info = machine_info()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU: {info['cpu']}"
    say(f"[gpu-check] {dev.type} ({name}), torch {torch.__version__}, {'tiny' if tiny else 'full'} sizes -> {out_dir}")
    phases = [Phase("steps", f"{sizes.clip_model} step time and peak memory, six strategies, bf16"),
              Phase("rehearsal", "2-task MTIL run through the runner, bf16, teacher in half precision"),
              Phase("unet", "SD-1.5-sized UNet images per second" + (" (tiny UNet)" if tiny else ""))]
    report: dict[str, Any] = {
        "command": command, "process_command_line": shlex.join(sys.argv), "device": dev.type, "device_name": name,
        "torch": torch.__version__, "cuda": torch.version.cuda if dev.type == "cuda" else None, "tiny": tiny, "notes": notes,
        "machine": info, "sizes": {"clip_model": sizes.clip_model, "batch_size": sizes.batch_size, "rehearsal_iterations": sizes.rehearsal_iterations,
                                   "unet_batch": sizes.unet_batch, "unet_steps": sizes.unet_steps, "bench": sizes.bench.__dict__},
        "seconds": 0.0, "complete": False, "failed": [], "phases": {},
    }
    t_start = time.perf_counter()

    def write() -> None:
        report["seconds"] = time.perf_counter() - t_start
        report["phases"] = {p.name: p.to_dict() for p in phases}
        report["complete"] = all(p.status == "ok" for p in phases)
        report["failed"] = [p.name for p in phases if p.status == "failed"]
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "gpu_check.json", json.dumps(to_jsonable(report), indent=1))
        write_atomic(out_dir / "gpu_check.md", report_markdown(report, phases))

    with tempfile.TemporaryDirectory(prefix="clpfda-gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        ctx = BenchContext(sizes.bench, sizes.clip_model, None, dev, tmp, lambda msg: say(f"[gpu-check] {msg.strip()}"))
        jobs: list[Callable[[Phase], None]] = [
            lambda p: steps_phase(p, ctx, sizes, say),
            lambda p: rehearsal_phase(p, tmp, sizes, dev, say),
            lambda p: unet_phase(p, sizes, dev, say),
        ]
        for phase, job in zip(phases, jobs):
            phase.status = "running"
            write()  # a run cut short (time limit, lost machine) still leaves the phases before
            t0 = time.perf_counter()
            try:
                job(phase)
                phase.status = "ok"
            except Exception as exc:  # recorded, the next phase still runs
                phase.status = "failed"
                phase.error = f"{type(exc).__name__}: " + ((str(exc).strip().splitlines() or [""])[0])
                phase.traceback = traceback.format_exc()
                say(f"[gpu-check] {phase.name} failed: {phase.error}")
            phase.seconds = time.perf_counter() - t0
            say(f"[gpu-check] {phase.name}: {phase.status} in {phase.seconds:.1f} s")
            write()
            _reset_memory(dev)
    if not tiny and report["seconds"] > TARGET_SECONDS:
        report["notes"].append(f"took {report['seconds']:.0f} s, more than the {TARGET_SECONDS} s target")
    write()
    report["markdown"] = report_markdown(report, phases)
    return report
