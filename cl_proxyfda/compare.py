"""Comparisons: several strategies / hyper-parameter values x seeds on one stream.

``cl-proxyfda compare CONFIG.yaml`` (or :func:`run_comparison` in Python) expands a
comparison file into one full :class:`~cl_proxyfda.config.RunConfig` per variant and
seed, validates them all before anything runs, runs them one after another with
:func:`cl_proxyfda.runner.run_config`, and writes a table, a frontier plot and curves.

The comparison file (YAML, read with a safe loader that refuses duplicate keys and
aliases that refer to themselves or expand past 100,000 values; unknown keys are errors)::

    name: l2sp_vs_naive           # default: the file's stem; OUT = output_dir/name
    description: naive vs L2-SP on the tiny stream   # optional, shown in comparison.md
    output_dir: runs              # default "runs"
    base_config: quickstart.yaml  # optional run file, relative to this file (paths
                                  # inside run configs stay relative to the cwd)
    base:                         # a run config (all sections of a run file); merged
      model: {name: cl-test-tiny} # over base_config when both are given
      stream: {name: image_folder, root: data/tiny, control: ctrl}
      train: {lr: 1.0e-3, iterations: 20, batch_size: 8}
      logging: {wandb: {mode: offline}}
    seeds: [0, 1, 2]              # run.seed of every run (default [0])
    variants:
      - name: naive
        strategies: [{name: naive}]          # default: the base's strategies
      - name: l2sp
        strategies: [{name: l2sp, weight: 1.0}]
        train: {lr: 5.0e-4}                  # partial mappings, merged into the base
        model: {train_towers: [image]}
        set: ["eval.batch_size=128"]         # key.path=value overrides, as with --set
        grid: {"strategies.0.weight": [0.1, 1, 10]}

Order of application for each variant: base (base_config, then ``base``) -> the
variant's ``strategies``, ``train`` and ``model`` -> its ``set`` overrides -> one grid
point -> ``run.seed`` and ``run.name``. A ``grid`` maps key paths (as in ``set``) to
lists of values; it expands to the Cartesian product of its lists, one variant per
point, named like ``l2sp[weight=0.1]`` (the last key component labels a value; the
full path when two keys end alike). ``--set`` / ``overrides`` apply to the comparison
file itself (``seeds=[0]``, ``base.train.iterations=5``, ``variants.1.train.lr=1e-4``).

The base must be a valid run config by itself (errors name ``base.<key>``); errors
that a variant introduces name ``variants[i].<key>``. Every run config is validated up
front: an invalid file writes nothing.

Output folder OUT (default ``output_dir/name``)::

    OUT/variants/<variant>/seed<seed>/   one ordinary run folder per variant x seed
    OUT/comparison.md, comparison.csv    one row per variant: mean ± std over seeds of
                                         Transfer, Avg, Last, both forgettings, BWT,
                                         plasticity, control retention (row T) and its
                                         drop, stability, trainable parameters, wall
                                         time (s, experiences 1..T) and peak memory (MB);
                                         Pareto-front variants are marked "*" in the .md
    OUT/frontier.png                     stability (y) vs plasticity (x), Pareto front
    OUT/curves.png                       control retention, mean seen-task accuracy

``std`` is the sample standard deviation (ddof = 1) over the seeds of a variant;
empty/"-" with a single seed. Stability is control retention at row T, or 100 - mean
(Avalanche) forgetting when the stream has no control set. On CPU, peak memory is the
process's high-water mark (``ru_maxrss``), so later runs of one process inherit the
peaks of earlier ones; on CUDA the peak counter is reset before every run.

Rerunning the same comparison skips the runs whose ``metrics.json`` is complete (their
saved results are loaded) and resumes unfinished runs from their last checkpoint
(``resume=True``). A run folder written with a different resolved config (anything but
:data:`cl_proxyfda.runfolder.RESULT_NEUTRAL_KEYS`: run name, output folder, device and
threads, workers, eval batch size, logging, checkpointing) is an error rather than
silently reused. OUT is locked (``OUT/.lock``) while the comparison runs, and each run
folder while its run does: a second comparison into OUT stops with an error.
A run that diverges is reported and left out of the table; the others still run (the
CLI then exits with code 3, as ``cl-proxyfda run`` does). Bad input exits with code 2.

With W&B on (``logging.wandb.mode`` not ``disabled``) every run logs its own W&B run in
group ``name`` (unless the base sets ``logging.wandb.group``), and one more run,
``<name>-summary``, logs the comparison table (``wandb.Table``), ``frontier.png`` and
``curves.png``.
"""
from __future__ import annotations

import copy
import csv
import gc
import io
import itertools
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cl_proxyfda.config import RunConfig, first_error, apply_overrides, parse_config, read_yaml
from cl_proxyfda.errors import ConfigError, TrainingDiverged, UserError
from cl_proxyfda.results import METRICS_FILE, RunResults, atomic_write_bytes, atomic_write_text
from cl_proxyfda.runfolder import FolderLock, check_same_config, make_output_folder

__all__ = [
    "ComparisonFile",
    "VariantSpec",
    "PlannedRun",
    "VariantPlan",
    "ComparisonPlan",
    "RunOutcome",
    "VariantRow",
    "ComparisonResult",
    "METRIC_COLUMNS",
    "TASK_AGNOSTIC_COLUMNS",
    "table_columns",
    "load_comparison",
    "plan_comparison",
    "run_comparison",
    "summarize_variants",
    "format_markdown",
    "format_csv",
    "table_lines",
    "csv_columns",
    "grid_points",
    "pareto_front",
    "mean_std",
    "run_values",
    "plot_frontier",
    "plot_curves",
]

COMPARISON_MD = "comparison.md"
COMPARISON_CSV = "comparison.csv"
FRONTIER_PNG = "frontier.png"
CURVES_PNG = "curves.png"

# (key, column title, digits): per-run values come from RunResults.summary() or meta.
METRIC_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("transfer", "Transfer", 1),
    ("avg", "Avg", 1),
    ("last", "Last", 1),
    ("forgetting_avalanche", "Forgetting (Avalanche)", 1),
    ("forgetting_max", "Forgetting (max)", 1),
    ("bwt", "BWT", 1),
    ("plasticity", "Plasticity", 1),
    ("control_retention", "Control retention", 1),
    ("control_drop", "Control drop", 1),
    ("stability", "Stability", 1),
    ("trainable_params", "Trainable params", 0),
    ("inference_params_added", "Params added at inference", 0),
    ("synthetic_images", "Synthetic images", 0),
    ("reference_images", "Reference images", 0),
    ("teacher_mb", "Teachers (MB)", 0),
    ("wall_seconds", "Wall time (s)", 1),
    ("device_hours", "Device-hours", 4),
    ("peak_memory_mb", "Peak memory (MB)", 0),
)
# Shown only when some variant has them (runs with eval.control_probe).
PROBE_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("control_probe_last", "Control probe", 1),
    ("control_probe_drop", "Control probe drop", 1),
)
META_KEYS = ("trainable_params", "wall_seconds", "peak_memory_mb")
LEDGER_KEYS = ("inference_params_added", "synthetic_images", "reference_images", "teacher_mb", "device_hours")
# Task-agnostic (X-TAIL, eval.task_agnostic) metrics: key -> the extra matrix's summary
# key; the table shows these columns only when some run has the matrix.
TASK_AGNOSTIC_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("ta_transfer", "TA Transfer", 1),
    ("ta_avg", "TA Avg", 1),
    ("ta_last", "TA Last", 1),
    ("ta_bwt", "TA BWT", 1),
)


# ------------------------------------------------------------------------- schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)


def _check_plain_name(v: str) -> str:
    if not v or "/" in v or "\\" in v or v in (".", "..") or v != v.strip():
        raise ValueError(f"must be a plain folder name (got {v!r})")
    return v


class VariantSpec(_Strict):
    """One entry of ``variants``: a strategy list and changes to the base."""

    name: str
    strategies: Optional[list[dict[str, Any]]] = Field(None, description="default: the base's strategies")
    train: Optional[dict[str, Any]] = Field(None, description="partial train section merged into the base")
    model: Optional[dict[str, Any]] = Field(None, description="partial model section merged into the base")
    overrides: list[str] = Field(default_factory=list, alias="set", description="key.path=value overrides")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="key.path -> values; one variant per point")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return _check_plain_name(v)

    @field_validator("strategies")
    @classmethod
    def _named_strategies(cls, v: Optional[list[dict[str, Any]]]) -> Optional[list[dict[str, Any]]]:
        if v is not None:
            if not v:
                raise ValueError("list at least one strategy (use naive for plain fine-tuning)")
            for i, item in enumerate(v):
                if "name" not in item:
                    raise ValueError(f"item {i} has no 'name'")
        return v

    @field_validator("grid")
    @classmethod
    def _grid_lists(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not [p for p in key.split(".") if p]:
                raise ValueError("empty key path")
            if not values:
                raise ValueError(f"{key!r} has no values")
        return v


class ComparisonFile(_Strict):
    """The top level of a comparison file."""

    name: Optional[str] = Field(None, description="comparison name (default: the file's stem)")
    description: Optional[str] = None
    output_dir: str = Field("runs", description="OUT = output_dir/name unless --out is given")
    base_config: Optional[str] = Field(None, description="run file, relative to the comparison file")
    base: Optional[dict[str, Any]] = Field(None, description="run config; merged over base_config")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    variants: list[VariantSpec] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _check_plain_name(v)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat: {v}")
        return v


# -------------------------------------------------------------------------- plans
@dataclass
class PlannedRun:
    """One variant x seed: a validated run config and its folder."""

    variant: str
    seed: int
    config: RunConfig
    out_dir: Path


@dataclass
class VariantPlan:
    """One variant after grid expansion."""

    name: str
    spec_name: str
    spec_index: int
    grid: dict[str, Any]
    folder: str
    runs: list[PlannedRun]


@dataclass
class ComparisonPlan:
    """Everything a comparison will run, validated; writes nothing."""

    name: str
    description: Optional[str]
    out_dir: Path
    seeds: list[int]
    variants: list[VariantPlan]
    source: dict[str, Any]

    @property
    def runs(self) -> list[PlannedRun]:
        return [r for v in self.variants for r in v.runs]


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in: mappings recursively, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_path(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set ``key.path`` (list items by index) to ``value``, creating missing sections."""
    parts = [p for p in key.split(".") if p]
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(where, f"{key}: no list item {part!r}")
            if last:
                node[int(part)] = copy.deepcopy(value)
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(where, f"{key}: {parts[i - 1]!r} is not a section")
        if last:
            node[part] = copy.deepcopy(value)
        else:
            if part not in node or node[part] is None:
                node[part] = [] if parts[i + 1].isdigit() else {}
            node = node[part]


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[tuple[dict[str, Any], str]]:
    """The Cartesian product of a grid: ``(key -> value, "label=value,...")`` per point.

    Points follow the keys' order, the last key varying fastest. A value is labelled by
    the last component of its key path, or the full path when two keys end alike.
    """
    if not grid:
        return [({}, "")]
    keys = list(grid)
    short = [[p for p in k.split(".") if p][-1] for k in keys]
    labels = [s if short.count(s) == 1 else k for s, k in zip(short, keys)]
    points = []
    for values in itertools.product(*(grid[k] for k in keys)):
        label = ",".join(f"{lab}={_format_value(v)}" for lab, v in zip(labels, values))
        points.append((dict(zip(keys, values)), label))
    return points


def folder_name(name: str) -> str:
    """A file-system-safe folder name for a variant (``[``, ``]``, ``=``, ``,`` kept)."""
    return re.sub(r"[^\w\-.=,\[\]+]+", "_", name).strip("_.") or "variant"


def load_comparison(
    source: str | Path | Mapping[str, Any], overrides: Sequence[str] | None = None
) -> tuple[ComparisonFile, dict[str, Any], str, dict[str, Any]]:
    """Read and validate a comparison file (or mapping).

    Returns the validated file, the resolved base run mapping (``base_config`` with
    ``base`` merged over it), the comparison name and the raw (overridden) mapping.
    """
    if isinstance(source, Mapping):
        raw: dict[str, Any] = copy.deepcopy(dict(source))
        folder, stem = Path.cwd(), "comparison"
    else:
        path = Path(source)
        raw = read_yaml(path)
        folder, stem = path.resolve().parent, path.stem
    if overrides:
        raw = apply_overrides(raw, list(overrides))
    try:
        spec = ComparisonFile(**raw)
    except ValidationError as exc:
        raise first_error(exc) from None
    except TypeError as exc:
        raise ConfigError("", f"invalid keys: {exc}") from None
    if spec.base is None and spec.base_config is None:
        raise ConfigError("base", "give a base run config (base: {...}) or base_config: path/to/run.yaml")
    base: dict[str, Any] = {}
    if spec.base_config is not None:
        base_path = Path(spec.base_config).expanduser()
        if not base_path.is_absolute():
            base_path = folder / base_path
        try:
            base = read_yaml(base_path)
        except ConfigError as exc:
            raise ConfigError("base_config", exc.problem) from None
    if spec.base is not None:
        base = _deep_merge(base, spec.base)
    name = spec.name or _check_name_or_error(stem)
    return spec, base, name, raw


def _check_name_or_error(stem: str) -> str:
    try:
        return _check_plain_name(folder_name(stem))
    except ValueError as exc:
        raise ConfigError("name", str(exc)) from None


def _variant_mapping(base: dict[str, Any], spec: VariantSpec, index: int) -> dict[str, Any]:
    data = copy.deepcopy(base)
    if spec.strategies is not None:
        data["strategies"] = copy.deepcopy(spec.strategies)
    for section in ("train", "model"):
        update = getattr(spec, section)
        if update:
            current = data.get(section)
            data[section] = _deep_merge(current if isinstance(current, dict) else {}, update)
    for j, item in enumerate(spec.overrides):
        try:
            data = apply_overrides(data, [item])
        except ConfigError as exc:
            raise ConfigError(f"variants[{index}].set[{j}]", exc.problem) from None
    return data


def _parse_run(data: dict[str, Any], prefix: str, note: str = "") -> RunConfig:
    try:
        return parse_config(data)
    except ConfigError as exc:
        path = f"{prefix}.{exc.path}" if exc.path else prefix
        raise ConfigError(path, exc.problem + note) from None


def plan_comparison(
    source: str | Path | Mapping[str, Any],
    out_dir: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    only: Sequence[str] | None = None,
) -> ComparisonPlan:
    """Expand and validate every variant x seed of a comparison; writes nothing.

    ``only`` keeps the variants with these names (a grid variant is kept by its base
    name or its full name); the others are validated but not planned.
    """
    spec, base, name, raw = load_comparison(source, overrides)
    _parse_run(base, "base")  # the base must be a valid run by itself
    out = Path(out_dir) if out_dir is not None else Path(spec.output_dir) / name
    variants: list[VariantPlan] = []
    seen_names: dict[str, str] = {}
    seen_folders: dict[str, str] = {}
    for i, vspec in enumerate(spec.variants):
        mapping = _variant_mapping(base, vspec, i)
        for values, label in grid_points(vspec.grid):
            vname = f"{vspec.name}[{label}]" if label else vspec.name
            where = f"variants[{i}]"
            if vname in seen_names:
                raise ConfigError(f"{where}.name", f"variant {vname!r} appears twice (also {seen_names[vname]})")
            folder = folder_name(vname)
            if folder in seen_folders:
                raise ConfigError(f"{where}.name", f"variants {vname!r} and {seen_folders[folder]!r} share the folder name {folder!r}")
            seen_names[vname], seen_folders[folder] = where, vname
            data = copy.deepcopy(mapping)
            for key, value in values.items():
                _set_path(data, key, value, f"{where}.grid")
            note = f" (variant {vname!r})" if label else ""
            runs = []
            for seed in spec.seeds:
                run_data = copy.deepcopy(data)
                run_section = run_data.get("run") if isinstance(run_data.get("run"), dict) else {}
                run_data["run"] = {**run_section, "seed": seed, "name": f"{folder}-seed{seed}"}
                log_section = run_data.get("logging") if isinstance(run_data.get("logging"), dict) else {}
                wandb_section = log_section.get("wandb") if isinstance(log_section.get("wandb"), dict) else {}
                if wandb_section.get("group") is None:
                    run_data["logging"] = {**log_section, "wandb": {**wandb_section, "group": name}}
                cfg = _parse_run(run_data, where, note)
                runs.append(PlannedRun(vname, seed, cfg, out / "variants" / folder / f"seed{seed}"))
            variants.append(VariantPlan(vname, vspec.name, i, dict(values), folder, runs))
    if only:
        known = {v.name for v in variants} | {v.spec_name for v in variants}
        unknown = [o for o in only if o not in known]
        if unknown:
            raise ConfigError("--only", f"unknown variant(s) {unknown} (known: {', '.join(sorted(known))})")
        variants = [v for v in variants if v.name in only or v.spec_name in only]
    return ComparisonPlan(name, spec.description, out, list(spec.seeds), variants, raw)


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


# -------------------------------------------------------------------- aggregation
def run_values(results: RunResults) -> dict[str, Optional[float]]:
    """The table's per-run numbers: summary metrics and run metadata."""
    summary = results.summary()
    out: dict[str, Optional[float]] = {}
    for key, _, _ in METRIC_COLUMNS + PROBE_COLUMNS:
        if key in LEDGER_KEYS:
            value = (results.meta.get("ledger") or {}).get(key)
        else:
            value = results.meta.get(key) if key in META_KEYS else summary.get(key)
        out[key] = None if value is None or not math.isfinite(float(value)) else float(value)
    agnostic = summary.get("extra", {}).get("task_agnostic", {})
    for key, _, _ in TASK_AGNOSTIC_COLUMNS:
        value = agnostic.get(key[len("ta_"):])
        out[key] = None if value is None or not math.isfinite(float(value)) else float(value)
    return out


def mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample std (ddof = 1) of the defined values; std ``None`` below 2 values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return None, None
    mean = float(np.mean(finite))
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return mean, std


@dataclass
class VariantRow:
    """One row of the comparison table: a variant's numbers over its finished seeds."""

    name: str
    spec_name: str
    grid: dict[str, Any]
    seeds: list[int]
    per_seed: dict[str, list[Optional[float]]]
    mean: dict[str, Optional[float]]
    std: dict[str, Optional[float]]
    curves: dict[str, list[Optional[float]]]
    stability_from_control: bool
    task_names: list[str] = field(default_factory=list)
    diverged: list[int] = field(default_factory=list)
    pareto: bool = False


def _curve_mean(curves: list[list[Optional[float]]]) -> list[Optional[float]]:
    if not curves:
        return []
    length = max(len(c) for c in curves)
    out = []
    for i in range(length):
        vals = [c[i] for c in curves if i < len(c) and c[i] is not None]
        out.append(float(np.mean(vals)) if vals else None)
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """True for points no other point beats on both x and y (higher is better)."""
    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (qx >= x and qy >= y and (qx > x or qy > y)) for j, (qx, qy) in enumerate(points) if j != i
        )
        flags.append(not dominated)
    return flags


def summarize_variants(plan: ComparisonPlan, outcomes: Sequence[RunOutcome]) -> list[VariantRow]:
    """Aggregate the finished runs of every variant (mean ± sample std over seeds)."""
    rows = []
    for variant in plan.variants:
        mine = [o for o in outcomes if o.run.variant == variant.name]
        done = [o for o in mine if o.results is not None]
        values = [run_values(o.results) for o in done]  # type: ignore[arg-type]
        per_seed = {key: [v[key] for v in values] for key, _, _ in METRIC_COLUMNS + PROBE_COLUMNS + TASK_AGNOSTIC_COLUMNS}
        stats = {key: mean_std(vals) for key, vals in per_seed.items()}
        summaries = [o.results.summary() for o in done]  # type: ignore[union-attr]
        curves = {
            "control": _curve_mean([list(s["control"]) for s in summaries if s["control"]]),
            "seen_accuracy": _curve_mean([list(s["seen_accuracy"]) for s in summaries]),
            "control_probe": _curve_mean([list(s["control_probe"]) for s in summaries if s.get("control_probe")]),
        }
        rows.append(
            VariantRow(
                name=variant.name,
                spec_name=variant.spec_name,
                grid=variant.grid,
                seeds=[o.run.seed for o in done],
                per_seed=per_seed,
                mean={k: m for k, (m, _) in stats.items()},
                std={k: s for k, (_, s) in stats.items()},
                curves=curves,
                stability_from_control=bool(summaries) and all(s["stability_from_control"] for s in summaries),
                task_names=list(done[0].results.task_names) if done else [],  # type: ignore[union-attr]
                diverged=[o.run.seed for o in mine if o.status == "diverged"],
            )
        )
    placed = [r for r in rows if r.mean["plasticity"] is not None and r.mean["stability"] is not None]
    for row, flag in zip(placed, pareto_front([(r.mean["plasticity"], r.mean["stability"]) for r in placed])):
        row.pareto = flag
    return rows


def table_columns(rows: Sequence[VariantRow] = ()) -> tuple[tuple[str, str, int], ...]:
    """The table's columns: :data:`METRIC_COLUMNS`, plus :data:`PROBE_COLUMNS` and
    :data:`TASK_AGNOSTIC_COLUMNS` when a variant in ``rows`` has their values."""
    columns = METRIC_COLUMNS
    for extra in (PROBE_COLUMNS, TASK_AGNOSTIC_COLUMNS):
        if any(row.mean.get(key) is not None for row in rows for key, _, _ in extra):
            columns = columns + extra
    return columns


def _fmt(value: Optional[float], digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if digits == 0 else f"{value:.{digits}f}"


def _cell(row: VariantRow, key: str, digits: int) -> str:
    mean, std = row.mean[key], row.std[key]
    if mean is None:
        return "-"
    if std is None or (key == "trainable_params" and std == 0):
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def format_markdown(name: str, rows: Sequence[VariantRow], description: Optional[str] = None, seeds: Sequence[int] = ()) -> str:
    """The comparison table as GitHub markdown (mean ± sample std over seeds)."""
    lines = [f"# Comparison: {name}", ""]
    if description:
        lines += [description, ""]
    lines += [
        f"Seeds: {', '.join(str(s) for s in seeds)}. Cells: mean ± sample std (ddof 1) over finished seeds; "
        "accuracies in %. Stability = control retention at row T "
        "(100 - mean Avalanche forgetting without a control set).",
        "",
    ]
    columns = table_columns(rows)
    if len(columns) > len(METRIC_COLUMNS):
        lines[-1:-1] = [
            "Control probe = probe accuracy (eval.control_probe) on the control set's frozen image features "
            "at row T; its drop = row 0 - row T.",
        ]
    header = ["Variant", "Seeds"] + [title for _, title, _ in columns]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in rows:
        seeds_cell = str(len(row.seeds)) + (f" ({len(row.diverged)} diverged)" if row.diverged else "")
        label = row.name.replace("|", "\\|") + (" *" if row.pareto else "")
        cells = [label, seeds_cell] + [_cell(row, key, digits) for key, _, digits in columns]
        lines.append("| " + " | ".join(cells) + " |")
    front = [r.name for r in rows if r.pareto]
    lines += ["", "\\* on the stability-plasticity Pareto front: " + (", ".join(front) if front else "-")]
    lines += ["", f"![frontier]({FRONTIER_PNG})", "", f"![curves]({CURVES_PNG})", ""]
    return "\n".join(lines)


def csv_columns(rows: Sequence[VariantRow] = ()) -> list[str]:
    """Column names of the CSV (probe columns when a variant of ``rows`` has them)."""
    cols = ["variant", "spec", "grid", "seeds", "n_seeds", "diverged_seeds", "pareto_front"]
    for key, _, _ in table_columns(rows):
        cols += [f"{key}_mean", f"{key}_std"]
    return cols


def table_lines(rows: Sequence[VariantRow]) -> list[list[Any]]:
    """The table as typed values in :func:`csv_columns` order (``None`` = undefined)."""
    lines = []
    columns = table_columns(rows)
    for row in rows:
        line: list[Any] = [
            row.name,
            row.spec_name,
            json.dumps(row.grid, sort_keys=True) if row.grid else "",
            ";".join(str(s) for s in row.seeds),
            len(row.seeds),
            ";".join(str(s) for s in row.diverged),
            row.pareto,
        ]
        for key, _, _ in columns:
            line += [row.mean[key], row.std[key]]
        lines.append(line)
    return lines


def format_csv(rows: Sequence[VariantRow]) -> str:
    """One line per variant; numbers at full precision, undefined values empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_columns(rows))
    for line in table_lines(rows):
        cells = []
        for value in line:
            if value is None:
                cells.append("")
            elif isinstance(value, bool):
                cells.append("true" if value else "false")
            elif isinstance(value, float):
                cells.append(repr(value))
            else:
                cells.append(value)
        writer.writerow(cells)
    return buf.getvalue()


# -------------------------------------------------------------------------- plots
def _save_png(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from cl_proxyfda.plots import DPI

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def plot_frontier(rows: Sequence[VariantRow], path: str | Path, title: str = "") -> Path:
    """Stability (y) vs plasticity (x), one labelled point per variant with std error
    bars; the Pareto front (no other variant better on both) is drawn as a line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 5.0))
    ax = fig.add_subplot()
    placed = [r for r in rows if r.mean["plasticity"] is not None and r.mean["stability"] is not None]
    labelled: list[tuple[float, float]] = []
    for k, row in enumerate(placed):
        x, y = row.mean["plasticity"], row.mean["stability"]
        ax.errorbar(
            [x], [y], xerr=[row.std["plasticity"] or 0.0], yerr=[row.std["stability"] or 0.0],
            fmt="o", color=f"C{k % 10}", capsize=3, markersize=7 if row.pareto else 5,
        )
        stacked = sum(1 for p in labelled if abs(p[0] - x) < 0.5 and abs(p[1] - y) < 0.5)
        labelled.append((x, y))
        ax.annotate(row.name, (x, y), textcoords="offset points", xytext=(5, 5 + 11 * stacked), fontsize=8, color=f"C{k % 10}")
    front = sorted((r.mean["plasticity"], r.mean["stability"]) for r in placed if r.pareto)
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="0.3", linewidth=1, label="Pareto front")
        ax.legend(loc="lower left", fontsize=8)
    if not placed:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    from_control = [r.stability_from_control for r in placed]
    if from_control and all(from_control):
        ylabel = "control retention at row T (%)"
    elif from_control and not any(from_control):
        ylabel = "100 - mean forgetting (%)"
    else:
        ylabel = "stability (%)"
    ax.set_xlabel("plasticity: mean accuracy on each task right after learning it (%)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(f"Stability-plasticity frontier{': ' + title if title else ''}")
    ax.margins(0.15)
    return _save_png(fig, Path(path))


def plot_curves(rows: Sequence[VariantRow], path: str | Path, title: str = "") -> Path:
    """Per experience (row 0 = zero-shot), one line per variant (mean over seeds):
    control retention (left; dotted: control probe accuracy when the runs have one) and
    mean accuracy on the tasks seen so far (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.0, 4.5))
    left, right = fig.subplots(1, 2)
    any_control = False
    for k, row in enumerate(rows):
        colour = f"C{k % 10}"
        control = row.curves["control"]
        if control:
            any_control = True
            left.plot(range(len(control)), [np.nan if v is None else v for v in control], marker="^", color=colour, label=row.name)
        probe = row.curves.get("control_probe") or []
        if probe:
            any_control = True
            left.plot(range(len(probe)), [np.nan if v is None else v for v in probe], marker="v", linestyle=":", color=colour, label=f"{row.name} (probe)")
        seen = row.curves["seen_accuracy"]
        if seen:
            right.plot(range(len(seen)), [np.nan if v is None else v for v in seen], marker="o", color=colour, label=row.name)
    if not any_control:
        left.text(0.5, 0.5, "no control set", ha="center", va="center", transform=left.transAxes)
    for ax, label in ((left, "control retention (%)"), (right, "mean accuracy on tasks seen so far (%)")):
        ax.set_xlabel("after experience (0 = zero-shot)")
        ax.set_ylabel(label)
        ax.set_ylim(0.0, 102.0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower left")
    names = next((r.task_names for r in rows if r.task_names), [])
    if names:
        ticks = ["0\nzero-shot"] + [f"{i}\n{t}" for i, t in enumerate(names, 1)]
        for ax in (left, right):
            ax.set_xticks(range(len(ticks)), labels=ticks, fontsize=7, rotation=0 if len(ticks) <= 7 else 45)
    fig.suptitle(f"Curves{': ' + title if title else ''} (mean over seeds)")
    return _save_png(fig, Path(path))


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


def _log_wandb_summary(plan: ComparisonPlan, rows: Sequence[VariantRow], files: Mapping[str, Path]) -> None:
    wb = plan.runs[0].config.logging.wandb
    if wb.mode == "disabled":
        return
    import wandb

    from cl_proxyfda.wandb_logger import WandbLogger

    table = wandb.Table(columns=csv_columns(rows), data=table_lines(rows))
    logger = WandbLogger(
        plan.out_dir, project=wb.project, entity=wb.entity, group=wb.group or plan.name,
        name=f"{plan.name}-summary", mode=wb.mode, config={"comparison": plan.source},
    )
    try:
        logger.run.log({
            "comparison": table,
            "frontier": wandb.Image(str(files["frontier"])),
            "curves": wandb.Image(str(files["curves"])),
        })
    finally:
        logger.finish()


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
    out = plan.out_dir
    markdown = format_markdown(plan.name, rows, plan.description, plan.seeds)
    files = {
        "markdown": atomic_write_text(out / COMPARISON_MD, markdown),
        "csv": atomic_write_text(out / COMPARISON_CSV, format_csv(rows)),
        "frontier": plot_frontier(rows, out / FRONTIER_PNG, plan.name),
        "curves": plot_curves(rows, out / CURVES_PNG, plan.name),
    }
    _log_wandb_summary(plan, rows, files)
    return ComparisonResult(plan, outcomes, rows, markdown, files)
