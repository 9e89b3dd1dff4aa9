"""PNG plots of a run: accuracy-matrix heatmap and stability-plasticity curves.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no change to
the global backend). Every PNG is written atomically. The module imports no other
part of the package than ``metrics`` and ``io``: plotting functions read a
:class:`~cl_proxyfda.results.RunResults`-shaped object (its matrices, names and control
values) and never reach back into ``results``. Partial runs (fewer rows than
T + 1) render too: missing rows are left blank.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cl_proxyfda import metrics
from cl_proxyfda.io import safe_name, write_atomic
from cl_proxyfda.metrics import MAX_MATRIX_TASKS

__all__ = ["plot_accuracy_matrix", "plot_stability_plasticity", "render_all", "save_png"]

DPI = 110
# Extra matrices that are accuracies in % (same 0..100 scale as the accuracy matrix).
PERCENT_MATRICES = {"task_agnostic": "Task-agnostic accuracy (%, union vocabulary)"}


class RunData(Protocol):
    """What the plots read of a run (:class:`cl_proxyfda.results.RunResults` has it)."""

    task_names: list[str]
    rows: list[list[float]]
    control: list[float]
    control_probe: list[float]
    extra_matrices: dict[str, list[list[float]]]
    meta: dict[str, Any]

    @property
    def num_tasks(self) -> int: ...
    @property
    def experiences_done(self) -> int: ...
    @property
    def complete(self) -> bool: ...
    def matrix(self, name: str | None = None) -> np.ndarray: ...
    def row_label(self, i: int) -> str: ...


def save_png(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` on the Agg canvas and write it to ``path`` as PNG, atomically."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return write_atomic(path, buf.getvalue())


def plot_accuracy_matrix(results: RunData, path: str | Path, name: str | None = None) -> Path:
    """Heatmap of the accuracy matrix (or extra matrix ``name``) with values.

    Rows 0..T (row 0 = zero-shot, rows not evaluated yet stay blank), one column per
    task, plus a ``control`` column when the run has a control set.
    """
    tasks = list(results.task_names)
    n_tasks = len(tasks)
    grid = np.full((n_tasks + 1, n_tasks), np.nan)
    have = results.matrix(name)
    grid[: have.shape[0]] = have
    columns = tasks
    if name is None and results.control:
        control = np.full((n_tasks + 1, 1), np.nan)
        control[: len(results.control), 0] = results.control
        grid = np.hstack([grid, control])
        columns = tasks + ["control"]

    n_rows, n_cols = grid.shape
    fig = Figure(figsize=(1.6 + 0.62 * n_cols, 1.2 + 0.45 * n_rows))
    ax = fig.add_subplot()
    if name is None or name in PERCENT_MATRICES:
        vmin, vmax, unit = 0.0, 100.0, "%"
    else:  # an extra matrix keeps its own scale
        finite = grid[np.isfinite(grid)]
        vmin = float(finite.min()) if finite.size else 0.0
        vmax = float(finite.max()) if finite.size else 1.0
        vmax = vmax if vmax > vmin else vmin + 1.0
        unit = name
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=vmin, vmax=vmax,
                      aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label=unit)
    font = max(5, 9 - n_cols // 6)
    for i in range(n_rows):
        for j in range(n_cols):
            value = grid[i, j]
            if np.isfinite(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=font,
                        color="black" if (value - vmin) > 0.6 * (vmax - vmin) else "white")
    if name is None and results.control:
        ax.axvline(n_tasks - 0.5, color="white", linewidth=2)
    ax.set_xticks(range(n_cols), labels=columns, rotation=45, ha="right", fontsize=font + 1)
    ax.set_yticks(range(n_rows),
                  labels=[f"{i} {results.row_label(i)}" for i in range(n_rows)],
                  fontsize=font + 1)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after experience")
    title = "Accuracy (%)" if name is None else PERCENT_MATRICES.get(name, name)
    if not results.complete:
        title += f"  ({max(results.experiences_done, 0)}/{n_tasks} experiences)"
    ax.set_title(title)
    return save_png(fig, path)


def plot_stability_plasticity(results: RunData, path: str | Path) -> Path:
    """Per experience: accuracy on the task just learned (plasticity), mean accuracy on
    tasks seen so far, control retention (stability) and, with ``eval.control_probe``,
    the control set's probe accuracy on frozen image features, all in %."""
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot()
    n_rows = len(results.rows)
    if n_rows:
        a = results.matrix()
        steps = list(range(1, n_rows))
        new_task = metrics.diagonal(a)
        seen = metrics.seen_accuracy(a)[1:]
        if steps:
            ax.plot(steps, [np.nan if v is None else v for v in new_task], marker="o",
                    label="accuracy on the task just learned")
            ax.plot(steps, [np.nan if v is None else v for v in seen], marker="s",
                    label="mean accuracy on tasks seen so far")
        if results.control:
            ax.plot(range(n_rows), results.control, marker="^", linestyle="--",
                    label="control retention")
        if results.control_probe:
            kind = (results.meta.get("control_probe") or {}).get("kind", "")
            ax.plot(range(n_rows), results.control_probe, marker="v", linestyle=":",
                    label=f"control {kind} probe (frozen image features)".replace("  ", " "))
        if not steps and not results.control and not results.control_probe:
            ax.plot([0], [float(np.mean(a[0]))], marker="o", label="zero-shot mean accuracy")
    else:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center",
                transform=ax.transAxes)
    total = results.num_tasks
    ax.set_xlim(-0.3, total + 0.3)
    ax.set_ylim(0.0, 102.0)
    if total <= MAX_MATRIX_TASKS:  # beyond, matplotlib's own integer ticks
        ax.set_xticks(range(total + 1),
                      labels=[f"{i}\n{results.row_label(i)}" for i in range(total + 1)],
                      fontsize=7, rotation=0 if total <= 6 else 45,
                      ha="center" if total <= 6 else "right")
    ax.set_xlabel("experience")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    title = "Stability-plasticity"
    if not results.complete:
        title += f"  ({max(results.experiences_done, 0)}/{total} experiences)"
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=8)
    return save_png(fig, path)


# Heatmaps grow with the task count (one labelled cell per row x task); past this many
# tasks they would be too large to draw and are left out (the CSV files hold the values).
MAX_HEATMAP_TASKS = MAX_MATRIX_TASKS


def plot_files(results: RunData, run_dir: str | Path) -> list[Path]:
    """The PNG files :func:`render_all` writes for ``results`` into ``run_dir``."""
    run_dir = Path(run_dir)
    files = [run_dir / "stability_plasticity.png"]
    if results.num_tasks <= MAX_HEATMAP_TASKS:
        files.insert(0, run_dir / "accuracy_matrix.png")
        files += [run_dir / f"{safe_name(name)}_matrix.png" for name in results.extra_matrices]
    return files


def render_all(results: RunData, run_dir: str | Path) -> list[Path]:
    """Write ``accuracy_matrix.png``, ``stability_plasticity.png`` and one
    ``<name>_matrix.png`` per extra matrix into ``run_dir``; returns their paths.
    Heatmaps are left out for more than :data:`MAX_HEATMAP_TASKS` tasks."""
    run_dir = Path(run_dir)
    written = []
    if results.num_tasks <= MAX_HEATMAP_TASKS:
        written.append(plot_accuracy_matrix(results, run_dir / "accuracy_matrix.png"))
    written.append(plot_stability_plasticity(results, run_dir / "stability_plasticity.png"))
    if results.num_tasks <= MAX_HEATMAP_TASKS:
        for name in results.extra_matrices:
            written.append(
                plot_accuracy_matrix(results, run_dir / f"{safe_name(name)}_matrix.png", name=name)
            )
    return written
