"""The bench's driver: run the chosen sections in one process and write the report."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cl_proxyfda.device import resolve_device
from cl_proxyfda.errors import UserError
from cl_proxyfda.io import write_atomic
from cl_proxyfda.tools.bench.awc import awc_section
from cl_proxyfda.tools.bench.context import DEMO_MODEL, DEMO_TAG, FULL, QUICK, TEST_MODEL, BenchContext, parse_sections
from cl_proxyfda.tools.bench.evaluation import eval_section
from cl_proxyfda.tools.bench.generation import generation_section
from cl_proxyfda.tools.bench.gpu import gpu_section
from cl_proxyfda.tools.bench.knn import knn_section
from cl_proxyfda.tools.bench.report import Section, machine_info, machine_line, report_markdown
from cl_proxyfda.tools.bench.steps import steps_section


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
        ctx = BenchContext(sizes, model, pretrained, resolve_device("auto"), Path(tmp), say)
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
        write_atomic(out_dir / "bench.json", json.dumps(report, indent=1))
        write_atomic(out_dir / "bench.md", markdown)
    report["markdown"] = markdown
    return report
