"""Running a comparison's plan: every variant x seed one after another under the
comparison folder's lock, skipping finished runs and resuming started ones, then the
report (see :mod:`cl_proxyfda.compare`)."""
from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from cl_proxyfda.compare.plan import ComparisonPlan, PlannedRun, plan_comparison
from cl_proxyfda.compare.report import VariantRow, summarize_variants, write_report
from cl_proxyfda.errors import TrainingDiverged, UserError
from cl_proxyfda.results import METRICS_FILE, RunResults
from cl_proxyfda.runfolder import FolderLock, check_same_config, make_output_folder

__all__ = ["RunOutcome", "ComparisonResult", "run_comparison"]


# --------------------------------------------------------------------------- runs
@dataclass
class RunOutcome:
    """What happened to one planned run: ``ran``, ``resumed``, ``skipped`` or ``diverged``."""

    run: PlannedRun
    status: str
    results: Optional[RunResults] = None
    seconds: float = 0.0
    error: str = ""


def _check_same_config(run: PlannedRun) -> None:
    check_same_config(run.out_dir, run.config.to_dict(), what=f" of {run.variant!r} seed {run.seed}")


def _finished_results(run: PlannedRun) -> Optional[RunResults]:
    if not (run.out_dir / METRICS_FILE).is_file():
        return None
    try:
        results = RunResults.load(run.out_dir)
    except UserError:
        return None  # unreadable: resume from the checkpoint instead
    return results if results.complete else None


def _has_started(run: PlannedRun) -> bool:
    return run.out_dir.is_dir() and any(
        (run.out_dir / n).exists() for n in (METRICS_FILE, "checkpoints", "config.yaml")
    )


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _execute_plan(plan: ComparisonPlan, log: Any, report_only: bool = False) -> list[RunOutcome]:
    from cl_proxyfda.runner import run_config

    runs = plan.runs
    for run in runs:  # every folder is checked before the first run starts
        _check_same_config(run)
    outcomes = []
    for k, run in enumerate(runs, 1):
        tag = f"compare {plan.name}: [{k}/{len(runs)}] {run.variant} seed {run.seed}"
        done = _finished_results(run)
        if done is not None:
            log(f"{tag}: skipped (finished in {run.out_dir})")
            outcomes.append(RunOutcome(run, "skipped", done))
            continue
        if report_only:
            log(f"{tag}: not finished; left out of the table (--report-only)")
            outcomes.append(RunOutcome(run, "missing"))
            continue
        resume = _has_started(run)
        log(f"{tag}: {'resuming' if resume else 'starting'} -> {run.out_dir}")
        _free_memory()
        t0 = time.time()
        try:
            results = run_config(run.config, run.out_dir, resume=resume, quiet=True)
        except TrainingDiverged as exc:
            log(f"{tag}: diverged ({exc}); left out of the table")
            outcomes.append(RunOutcome(run, "diverged", None, time.time() - t0, str(exc)))
            continue
        outcomes.append(RunOutcome(run, "resumed" if resume else "ran", results, time.time() - t0))
    _free_memory()
    return outcomes


# ------------------------------------------------------------------------ results
@dataclass
class ComparisonResult:
    """A finished comparison: plan, per-run outcomes, the table and the files."""

    plan: ComparisonPlan
    outcomes: list[RunOutcome]
    rows: list[VariantRow]
    markdown: str
    files: dict[str, Path]

    @property
    def out_dir(self) -> Path:
        return self.plan.out_dir

    @property
    def started(self) -> list[tuple[str, int]]:
        """(variant, seed) of the runs trained in this call (fresh or resumed)."""
        return [(o.run.variant, o.run.seed) for o in self.outcomes if o.status in ("ran", "resumed")]

    @property
    def skipped(self) -> list[tuple[str, int]]:
        """(variant, seed) of the runs found finished and loaded."""
        return [(o.run.variant, o.run.seed) for o in self.outcomes if o.status == "skipped"]

    def row(self, name: str) -> VariantRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no variant {name!r} (variants: {', '.join(r.name for r in self.rows)})")


def run_comparison(
    path_or_mapping: str | Path | Mapping[str, Any],
    out_dir: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    *,
    log: Any = None,
    only: Sequence[str] | None = None,
    report_only: bool = False,
) -> ComparisonResult:
    """Validate, run (skipping finished runs, resuming partial ones) and tabulate.

    ``log``: a callable taking one line (default: print to stderr).
    """
    if log is None:
        def log(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

    plan = plan_comparison(path_or_mapping, out_dir, overrides, only)
    for run in plan.runs:  # every folder is checked before anything is written
        _check_same_config(run)
    make_output_folder(plan.out_dir, "comparison folder")
    with FolderLock(plan.out_dir, "comparison folder"):
        return _run_locked(plan, log, report_only)


def _run_locked(plan: ComparisonPlan, log: Any, report_only: bool) -> ComparisonResult:
    log(f"compare {plan.name}: {len(plan.variants)} variants x {len(plan.seeds)} seeds = {len(plan.runs)} runs -> {plan.out_dir}")
    outcomes = _execute_plan(plan, log, report_only)
    rows = summarize_variants(plan, outcomes)
    markdown, files = write_report(plan, rows)
    return ComparisonResult(plan, outcomes, rows, markdown, files)
