"""Continual-learning metrics computed from the accuracy matrix.

The accuracy matrix ``A`` has shape ``(k + 1, T)``: ``T`` tasks (columns) and one row
per evaluation, row 0 = the untouched model (zero-shot), row ``i`` = after training
experience ``i`` (1-based, so row ``i`` is "after learning task ``i``", whose column is
``i - 1``). Values are top-1 accuracies in percent. A complete run has ``k = T``; a run
in progress has ``k < T`` and every metric that needs row ``T`` uses the last available
row ``k`` instead (``summarize(...)["complete"]`` is then ``False``).

Definitions (docs/protocol.md; 1-based rows and tasks, ``T`` = last row):

- Transfer = mean over j = 2..T of [mean over i = 1..j-1 of A[i, j]]
- Avg = mean of rows 1..T; Last = mean of row T
- Forgetting (Avalanche) of task j < T = A[j, j] - A[T, j]
- Forgetting (max) of task j < T = max over i in j..T-1 of A[i, j] - A[T, j]
- BWT = mean over j < T of A[T, j] - A[j, j]
- Plasticity = mean over j of A[j, j]
- Control retention = control accuracy at row T; its drop = control[0] - control[T]
- Stability = control retention at row T, or 100 - mean Avalanche forgetting without
  a control set.

Undefined values (e.g. Transfer with one task, forgetting before two experiences) are
``None`` so that the summary serialises to strict JSON.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Text tables and heatmaps show the matrix for at most this many tasks (the CSV files
# always hold every value).
MAX_MATRIX_TASKS = 100

__all__ = [
    "as_matrix",
    "experiences_done",
    "transfer",
    "average_accuracy",
    "last_accuracy",
    "diagonal",
    "seen_accuracy",
    "forgetting_avalanche",
    "forgetting_max",
    "backward_transfer",
    "plasticity",
    "summarize",
]


def as_matrix(matrix: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Validate and return the accuracy matrix as a float array of shape (k + 1, T)."""
    a = np.asarray(matrix, dtype=float)
    if a.ndim != 2:
        raise ValueError(f"accuracy matrix must be 2-D (rows x tasks), got shape {a.shape}")
    rows, tasks = a.shape
    if tasks < 1:
        raise ValueError("accuracy matrix needs at least one task (column)")
    if rows < 1 or rows > tasks + 1:
        raise ValueError(
            f"accuracy matrix with {tasks} tasks needs 1..{tasks + 1} rows "
            f"(row 0 = zero-shot), got {rows}"
        )
    return a


def experiences_done(matrix: np.ndarray) -> int:
    """Number of trained experiences in the matrix (rows after the zero-shot row)."""
    return as_matrix(matrix).shape[0] - 1


def _mean_or_none(values: Sequence[float] | np.ndarray) -> float | None:
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return None
    return _finite_or_none(float(values.mean()))


def _finite_or_none(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def transfer(matrix: np.ndarray) -> float | None:
    """Mean accuracy on tasks before they are learned (strict upper triangle).

    For a partial run with k experiences, column j uses rows 1..min(j-1, k).
    ``None`` with a single task or before the first experience.
    """
    a = as_matrix(matrix)
    k, tasks = a.shape[0] - 1, a.shape[1]
    if k < 1 or tasks < 2:
        return None
    per_task = [a[1 : min(j - 1, k) + 1, j - 1].mean() for j in range(2, tasks + 1)]
    return _mean_or_none(per_task)


def average_accuracy(matrix: np.ndarray) -> float | None:
    """Avg: mean of every entry of rows 1..k (all tasks, seen or not)."""
    a = as_matrix(matrix)
    if a.shape[0] < 2:
        return None
    return _mean_or_none(a[1:])


def last_accuracy(matrix: np.ndarray) -> float | None:
    """Last: mean of the last available row (row T for a complete run)."""
    a = as_matrix(matrix)
    return _mean_or_none(a[-1])


def diagonal(matrix: np.ndarray) -> list[float | None]:
    """A[i, i] for i = 1..k: accuracy on each task right after learning it."""
    a = as_matrix(matrix)
    k = a.shape[0] - 1
    return [_finite_or_none(float(a[i, i - 1])) for i in range(1, k + 1)]


def seen_accuracy(matrix: np.ndarray) -> list[float | None]:
    """Per row i = 0..k: mean accuracy on tasks 1..i (``None`` for row 0)."""
    a = as_matrix(matrix)
    return [None] + [_mean_or_none(a[i, :i]) for i in range(1, a.shape[0])]


def forgetting_avalanche(matrix: np.ndarray) -> list[float | None]:
    """Per task j = 1..T-1: A[j, j] - A[k, j] (Avalanche's definition).

    ``None`` for tasks not yet followed by another experience (j >= k).
    """
    a = as_matrix(matrix)
    k, tasks = a.shape[0] - 1, a.shape[1]
    out: list[float | None] = []
    for j in range(1, tasks):
        out.append(_finite_or_none(float(a[j, j - 1] - a[k, j - 1])) if j < k else None)
    return out


def forgetting_max(matrix: np.ndarray) -> list[float | None]:
    """Per task j = 1..T-1: max over i in j..k-1 of A[i, j] - A[k, j].

    The Mammoth / PyCIL / FACIL definition: the drop from the best accuracy ever
    reached after learning the task. ``None`` for tasks with j >= k.
    """
    a = as_matrix(matrix)
    k, tasks = a.shape[0] - 1, a.shape[1]
    out: list[float | None] = []
    for j in range(1, tasks):
        if j < k:
            best = float(a[j:k, j - 1].max())
            out.append(_finite_or_none(best - float(a[k, j - 1])))
        else:
            out.append(None)
    return out


def backward_transfer(matrix: np.ndarray) -> float | None:
    """BWT: mean over j < k of A[k, j] - A[j, j] (negative means forgetting)."""
    a = as_matrix(matrix)
    k = a.shape[0] - 1
    return _mean_or_none([a[k, j - 1] - a[j, j - 1] for j in range(1, min(k, a.shape[1]))])


def plasticity(matrix: np.ndarray) -> float | None:
    """Mean over learned tasks of A[j, j]."""
    values = [v for v in diagonal(matrix) if v is not None]
    return _mean_or_none(values)


def _list_or_none(values: Sequence[float | None]) -> list[float | None]:
    return [_finite_or_none(v) if v is not None else None for v in values]


def summarize(
    matrix: Sequence[Sequence[float]] | np.ndarray,
    control: Sequence[float] | None = None,
) -> dict[str, float | list | bool | int | None]:
    """All metrics of a (possibly partial) accuracy matrix as a JSON-ready dict.

    ``control``: control-set accuracy at every row (same length as the matrix's rows),
    or ``None`` / empty when the run has no control set.

    Keys: ``num_tasks``, ``experiences_done``, ``complete``, ``zero_shot``,
    ``transfer``, ``avg``, ``last``, ``bwt``, ``plasticity``, ``stability``,
    ``stability_from_control``, ``forgetting_avalanche`` / ``forgetting_max`` (means),
    ``forgetting_avalanche_per_task`` / ``forgetting_max_per_task`` (length T-1 lists),
    ``new_task_accuracy`` (A[i, i] per experience), ``seen_accuracy`` (per row),
    ``control`` (per row), ``control_retention`` and ``control_drop``.
    """
    a = as_matrix(matrix)
    k, tasks = a.shape[0] - 1, a.shape[1]
    control_values = [] if control is None else [float(c) for c in control]
    if control_values and len(control_values) != a.shape[0]:
        raise ValueError(
            f"control has {len(control_values)} values but the matrix has {a.shape[0]} rows"
        )

    forget_ava = forgetting_avalanche(a)
    forget_max = forgetting_max(a)
    forget_ava_mean = _mean_or_none([v for v in forget_ava if v is not None])
    forget_max_mean = _mean_or_none([v for v in forget_max if v is not None])

    if control_values:
        control_retention = _finite_or_none(control_values[-1])
        control_drop = _finite_or_none(control_values[0] - control_values[-1])
        stability = control_retention
    else:
        control_retention = None
        control_drop = None
        stability = None if forget_ava_mean is None else 100.0 - forget_ava_mean

    return {
        "num_tasks": tasks,
        "experiences_done": k,
        "complete": k == tasks,
        "zero_shot": _mean_or_none(a[0]),
        "transfer": transfer(a),
        "avg": average_accuracy(a),
        "last": last_accuracy(a),
        "bwt": backward_transfer(a),
        "forgetting_avalanche": forget_ava_mean,
        "forgetting_max": forget_max_mean,
        "forgetting_avalanche_per_task": forget_ava,
        "forgetting_max_per_task": forget_max,
        "plasticity": plasticity(a),
        "stability": stability,
        "stability_from_control": bool(control_values),
        "new_task_accuracy": diagonal(a),
        "seen_accuracy": seen_accuracy(a),
        "control": _list_or_none(control_values),
        "control_retention": control_retention,
        "control_drop": control_drop,
    }
