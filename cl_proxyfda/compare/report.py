"""The comparison's report: per-variant aggregation over seeds, the table (markdown and
CSV), the frontier and curves plots, and the W&B summary run (see :mod:`cl_proxyfda.compare`)."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np

from cl_proxyfda.compare.plan import ComparisonPlan
from cl_proxyfda.io import write_atomic
from cl_proxyfda.results import RunResults

if TYPE_CHECKING:
    from cl_proxyfda.compare.run import RunOutcome

__all__ = [
    "COMPARISON_MD",
    "COMPARISON_CSV",
    "FRONTIER_PNG",
    "CURVES_PNG",
    "VariantRow",
    "METRIC_COLUMNS",
    "PROBE_COLUMNS",
    "TASK_AGNOSTIC_COLUMNS",
    "table_columns",
    "summarize_variants",
    "format_markdown",
    "format_csv",
    "table_lines",
    "csv_columns",
    "pareto_front",
    "mean_std",
    "run_values",
    "plot_frontier",
    "plot_curves",
    "write_report",
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
def plot_frontier(rows: Sequence[VariantRow], path: str | Path, title: str = "") -> Path:
    """Stability (y) vs plasticity (x), one labelled point per variant with std error
    bars; the Pareto front (no other variant better on both) is drawn as a line."""
    from matplotlib.figure import Figure

    from cl_proxyfda.plots import save_png

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
    return save_png(fig, Path(path))


def plot_curves(rows: Sequence[VariantRow], path: str | Path, title: str = "") -> Path:
    """Per experience (row 0 = zero-shot), one line per variant (mean over seeds):
    control retention (left; dotted: control probe accuracy when the runs have one) and
    mean accuracy on the tasks seen so far (right)."""
    from matplotlib.figure import Figure

    from cl_proxyfda.plots import save_png

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
    return save_png(fig, Path(path))


# ------------------------------------------------------------------------- writing
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


def write_report(plan: ComparisonPlan, rows: Sequence[VariantRow]) -> tuple[str, dict[str, Path]]:
    """Write comparison.md, comparison.csv, frontier.png and curves.png into the plan's
    folder (atomically) and log the W&B summary run; returns the markdown and the files."""
    out = plan.out_dir
    markdown = format_markdown(plan.name, rows, plan.description, plan.seeds)
    files = {
        "markdown": write_atomic(out / COMPARISON_MD, markdown),
        "csv": write_atomic(out / COMPARISON_CSV, format_csv(rows)),
        "frontier": plot_frontier(rows, out / FRONTIER_PNG, plan.name),
        "curves": plot_curves(rows, out / CURVES_PNG, plan.name),
    }
    _log_wandb_summary(plan, rows, files)
    return markdown, files
