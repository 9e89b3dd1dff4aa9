"""The results of one run: the accuracy matrix row by row, saved as JSON + CSV.

A run directory holds (all written atomically with :func:`cl_proxyfda.io.write_atomic`):

- ``metrics.json``: every row, control accuracies, per-row diagnostics, extra matrices,
  the metric summary and run metadata;
- ``accuracy_matrix.csv``: header ``row,<task names>,control``, one line per row;
- ``<name>_matrix.csv`` for each extra matrix (e.g. retrieval mAP);
- ``summary.txt``: the plain-text table of :meth:`RunResults.format_table`.

:func:`report` re-renders the table and the plots of a saved run (``cl-proxyfda report``).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cl_proxyfda import metrics
from cl_proxyfda.errors import UserError
from cl_proxyfda.io import safe_name, write_atomic
from cl_proxyfda.ledger import format_ledger
from cl_proxyfda.metrics import MAX_MATRIX_TASKS

__all__ = [
    "RunResults",
    "report",
    "METRICS_FILE",
    "MATRIX_CSV",
    "SUMMARY_TXT",
]

METRICS_FILE = "metrics.json"
MATRIX_CSV = "accuracy_matrix.csv"
SUMMARY_TXT = "summary.txt"
FORMAT = "cl-proxyfda.results/1"
EXTRA_SUMMARY_KEYS = (
    "transfer", "avg", "last", "bwt", "forgetting_avalanche", "forgetting_max", "plasticity",
)
# Titles of known extra matrices in the text table (others show their name).
EXTRA_TITLES = {
    "task_agnostic": "Task-agnostic accuracy (%, union of all tasks' classes, no task label)",
}


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, paths and tuples to JSON types; NaN/inf -> None."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _float_or_nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


@dataclass
class RunResults:
    """Accuracy matrix and companions of one run, filled one evaluation row at a time.

    ``rows[0]`` is the zero-shot row (before any training), ``rows[i]`` the accuracies
    (%) on every task after experience ``i``. ``control`` has one value per row or is
    empty; ``diagnostics`` one dict of extra scalars per row; ``extra_matrices`` maps a
    name (e.g. ``"retrieval_map"``) to a matrix shaped like the accuracy matrix.
    ``control_probe`` has one probe accuracy (%) of the control set's frozen image
    features per row (``eval.control_probe``) or is empty.
    """

    task_names: list[str]
    rows: list[list[float]] = field(default_factory=list)
    control: list[float] = field(default_factory=list)
    diagnostics: list[dict[str, float]] = field(default_factory=list)
    extra_matrices: dict[str, list[list[float]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    control_probe: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.task_names = [str(t) for t in self.task_names]
        self.validate()

    # -- filling ---------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def experiences_done(self) -> int:
        """Rows after the zero-shot row (-1 when even row 0 is missing)."""
        return len(self.rows) - 1

    @property
    def complete(self) -> bool:
        return len(self.rows) == self.num_tasks + 1

    def _ordered(self, values: Sequence[float] | Mapping[str, float], what: str) -> list[float]:
        if isinstance(values, Mapping):
            missing = [t for t in self.task_names if t not in values]
            unknown = [t for t in values if t not in self.task_names]
            if missing or unknown:
                raise ValueError(f"{what}: missing tasks {missing}, unknown tasks {unknown}")
            return [float(values[t]) for t in self.task_names]
        values = [float(v) for v in values]
        if len(values) != self.num_tasks:
            raise ValueError(f"{what}: expected {self.num_tasks} values, got {len(values)}")
        return values

    def add_row(
        self,
        accs: Sequence[float] | Mapping[str, float],
        control: float | None = None,
        diagnostics: Mapping[str, float] | None = None,
        extra: Mapping[str, Sequence[float] | Mapping[str, float]] | None = None,
        control_probe: float | None = None,
    ) -> int:
        """Append the evaluation after the next experience; returns the row index.

        ``accs``: one accuracy (%) per task, as a list in task order or a dict by task
        name. ``control``: control-set accuracy, given for every row or for none.
        ``extra``: one row for each extra matrix (same names at every row).
        ``control_probe``: probe accuracy of the control set, for every row or for none.
        """
        index = len(self.rows)
        if index > self.num_tasks:
            raise ValueError(f"run already has all {self.num_tasks + 1} rows")
        row = self._ordered(accs, f"row {index}")
        if index > 0 and (control is not None) != bool(self.control):
            raise ValueError(
                f"row {index}: control accuracy must be given for every row or for none"
            )
        if index > 0 and (control_probe is not None) != bool(self.control_probe):
            raise ValueError(
                f"row {index}: control probe accuracy must be given for every row or for none"
            )
        extra = dict(extra or {})
        if index > 0 and set(extra) != set(self.extra_matrices):
            raise ValueError(
                f"row {index}: extra matrices {sorted(extra)} differ from earlier rows' "
                f"{sorted(self.extra_matrices)}"
            )
        extra_rows = {name: self._ordered(v, f"row {index} of {name}") for name, v in extra.items()}

        self.rows.append(row)
        if control is not None:
            self.control.append(float(control))
        if control_probe is not None:
            self.control_probe.append(float(control_probe))
        self.diagnostics.append({str(k): float(v) for k, v in (diagnostics or {}).items()})
        for name, values in extra_rows.items():
            self.extra_matrices.setdefault(name, []).append(values)
        return index

    def validate(self) -> None:
        """Check shapes; raises ``ValueError`` naming the inconsistency."""
        if not self.task_names:
            raise ValueError("task_names is empty")
        if len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"task names are not unique: {self.task_names}")
        if len(self.rows) > self.num_tasks + 1:
            raise ValueError(f"{len(self.rows)} rows for {self.num_tasks} tasks (at most T+1)")
        for i, row in enumerate(self.rows):
            if len(row) != self.num_tasks:
                raise ValueError(f"row {i} has {len(row)} values, expected {self.num_tasks}")
        if self.control and len(self.control) != len(self.rows):
            raise ValueError(f"control has {len(self.control)} values for {len(self.rows)} rows")
        if self.control_probe and len(self.control_probe) != len(self.rows):
            raise ValueError(
                f"control_probe has {len(self.control_probe)} values for {len(self.rows)} rows"
            )
        if self.diagnostics and len(self.diagnostics) != len(self.rows):
            raise ValueError(
                f"diagnostics has {len(self.diagnostics)} entries for {len(self.rows)} rows"
            )
        for name, mat in self.extra_matrices.items():
            if len(mat) != len(self.rows) or any(len(r) != self.num_tasks for r in mat):
                raise ValueError(f"extra matrix {name!r} is not shaped like the accuracy matrix")

    # -- metrics ---------------------------------------------------------------------

    def matrix(self, name: str | None = None) -> np.ndarray:
        """The accuracy matrix (or extra matrix ``name``), shape (rows so far, T)."""
        rows = self.rows if name is None else self.extra_matrices[name]
        if not rows:
            return np.zeros((0, self.num_tasks))
        return np.asarray(rows, dtype=float)

    def summary(self) -> dict[str, Any]:
        """:func:`metrics.summarize` of the matrix (and control); ``{}`` with no rows.

        With a control probe (:func:`probe_summary`): ``control_probe`` (per row),
        ``control_probe_initial`` (row 0), ``control_probe_last`` (last row) and
        ``control_probe_drop`` (initial - last, the paper's delta-LP); absent without.
        Extra matrices are summarised under ``summary()["extra"][name]`` with the keys
        of :data:`EXTRA_SUMMARY_KEYS`.
        """
        if not self.rows:
            return {}
        out: dict[str, Any] = dict(metrics.summarize(self.matrix(), self.control or None))
        out.update(probe_summary(self.control_probe))
        if self.extra_matrices:
            out["extra"] = {}
            for name in self.extra_matrices:
                full = metrics.summarize(self.matrix(name))
                out["extra"][name] = {key: full[key] for key in EXTRA_SUMMARY_KEYS}
        return out

    # -- files -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Everything in ``metrics.json`` (strict JSON: NaN becomes null)."""
        data = {
            "format": FORMAT,
            "task_names": self.task_names,
            "rows": self.rows,
            "control": self.control,
            "diagnostics": self.diagnostics,
            "extra_matrices": self.extra_matrices,
            "summary": self.summary(),
            "meta": self.meta,
        }
        if self.control_probe:  # absent without eval.control_probe: older files stay as they were
            data["control_probe"] = self.control_probe
        return to_jsonable(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunResults":
        """Inverse of :meth:`to_dict` (the stored summary is recomputed, not trusted)."""

        def matrix(rows: Any) -> list[list[float]]:
            return [[_float_or_nan(v) for v in row] for row in rows]

        return cls(
            task_names=list(data["task_names"]),
            rows=matrix(data.get("rows", [])),
            control=[_float_or_nan(v) for v in data.get("control", [])],
            diagnostics=[
                {str(k): _float_or_nan(v) for k, v in d.items()}
                for d in data.get("diagnostics", [])
            ],
            extra_matrices={
                str(k): matrix(v) for k, v in data.get("extra_matrices", {}).items()
            },
            meta=dict(data.get("meta", {})),
            control_probe=[_float_or_nan(v) for v in data.get("control_probe", None) or []],
        )

    def _matrix_csv(self, rows: list[list[float]], with_control: bool) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["row", *self.task_names] + (["control"] if with_control else []))
        for i, row in enumerate(rows):
            cells = ["" if not math.isfinite(v) else repr(float(v)) for v in row]
            if with_control:
                has = bool(self.control) and math.isfinite(self.control[i])
                cells.append(repr(float(self.control[i])) if has else "")
            writer.writerow([i, *cells])
        return buf.getvalue()

    def save(self, run_dir: str | Path) -> list[Path]:
        """Write metrics.json, accuracy_matrix.csv, extra matrix CSVs and summary.txt."""
        run_dir = Path(run_dir)
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        written = [write_atomic(run_dir / METRICS_FILE, text)]
        written.append(write_atomic(run_dir / MATRIX_CSV, self._matrix_csv(self.rows, True)))
        for name, rows in self.extra_matrices.items():
            path = run_dir / f"{safe_name(name)}_matrix.csv"
            written.append(write_atomic(path, self._matrix_csv(rows, False)))
        written.append(write_atomic(run_dir / SUMMARY_TXT, self.format_table() + "\n"))
        return written

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunResults":
        """Read ``metrics.json`` from a run directory (or the file itself).

        Raises :class:`UserError` naming the file when it is missing or malformed.
        """
        path = Path(run_dir)
        if path.is_dir() or path.name != METRICS_FILE:
            path = path / METRICS_FILE
        if not path.is_file():
            raise UserError(f"{path}: no such file (is this a cl-proxyfda run directory?)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read ({exc})") from exc
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from exc
        except RecursionError:
            raise UserError(f"{path}: not a cl-proxyfda metrics file (it nests too deeply)") from None
        if not isinstance(data, dict) or not isinstance(data.get("task_names"), list):
            raise UserError(f"{path}: not a cl-proxyfda metrics file (no 'task_names' list)")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError, RecursionError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"{path}: malformed results ({first})") from None

    # -- display ---------------------------------------------------------------------

    def row_label(self, i: int) -> str:
        """``"zero-shot"`` for row 0, else the task learned in experience ``i``."""
        return "zero-shot" if i == 0 else self.task_names[i - 1]

    def format_table(self) -> str:
        """Plain-text accuracy matrix with task names, then the summary metrics."""
        name = self.meta.get("run_name") or self.meta.get("name") or "run"
        lines = [
            f"{name}: {max(self.experiences_done, 0)}/{self.num_tasks} experiences"
            + ("" if self.complete else " (incomplete)")
        ]
        if not self.rows:
            lines.append("no evaluation rows yet")
            return "\n".join(lines)

        lines.append("")
        wide = self.num_tasks > MAX_MATRIX_TASKS
        if wide:
            lines.append(f"Accuracy matrix: {len(self.rows)} rows x {self.num_tasks} tasks, too wide to show (see {MATRIX_CSV})")
        else:
            lines.extend(self._format_matrix(self.rows, "Accuracy (%)", with_control=True))
        s = self.summary()
        lines.append("")
        lines.extend(_format_summary(s))
        lines.extend(format_ledger(self.meta.get("ledger") or {}))
        for extra_name, rows in self.extra_matrices.items():
            lines.append("")
            if not wide:
                lines.extend(self._format_matrix(rows, EXTRA_TITLES.get(extra_name, extra_name), with_control=False))
            es = s["extra"][extra_name]
            lines.append(
                f"  Transfer {_fmt(es['transfer'])}   Avg {_fmt(es['avg'])}   "
                f"Last {_fmt(es['last'])}"
                + (f"   BWT {_fmt(es['bwt'])}" if extra_name in EXTRA_TITLES else "")
            )
        return "\n".join(lines)

    def _format_matrix(self, rows: list[list[float]], title: str, with_control: bool) -> list[str]:
        label_w = max(len(f"{i} {self.row_label(i)}") for i in range(len(rows)))
        label_w = max(label_w, len("after"))
        col_w = [max(len(t), 6) for t in self.task_names]
        show_control = with_control and bool(self.control)
        header = f"{'after':<{label_w}}  " + "  ".join(
            f"{t:>{w}}" for t, w in zip(self.task_names, col_w)
        )
        if show_control:
            header += f"  {'control':>7}"
        show_probe = with_control and bool(self.control_probe)
        if show_probe:
            header += f"  {'probe':>7}"
        out = [f"{title}: row i = after experience i, row 0 = zero-shot", header]
        for i, row in enumerate(rows):
            line = f"{f'{i} {self.row_label(i)}':<{label_w}}  " + "  ".join(
                f"{_fmt(v):>{w}}" for v, w in zip(row, col_w)
            )
            if show_control:
                line += f"  {_fmt(self.control[i]):>7}"
            if show_probe:
                line += f"  {_fmt(self.control_probe[i]):>7}"
            out.append(line)
        return out


def _format_summary(s: Mapping[str, Any]) -> list[str]:
    def per_task(values: Sequence[float | None]) -> str:
        return "[" + ", ".join(_fmt(v) for v in values) + "]"

    rows = [
        ("Transfer", _fmt(s["transfer"])),
        ("Avg", _fmt(s["avg"])),
        ("Last", _fmt(s["last"])),
        ("BWT", _fmt(s["bwt"])),
        (
            "Forgetting (Avalanche)",
            f"{_fmt(s['forgetting_avalanche'])}  per task {per_task(s['forgetting_avalanche_per_task'])}",
        ),
        (
            "Forgetting (max)",
            f"{_fmt(s['forgetting_max'])}  per task {per_task(s['forgetting_max_per_task'])}",
        ),
        ("Plasticity", _fmt(s["plasticity"])),
        (
            "Stability",
            f"{_fmt(s['stability'])}  "
            + ("(control retention)" if s["stability_from_control"] else "(100 - forgetting)"),
        ),
    ]
    if s["control"]:
        rows.append(
            (
                "Control retention",
                f"{_fmt(s['control_retention'])}  (zero-shot {_fmt(s['control'][0])}, "
                f"drop {_fmt(s['control_drop'])})",
            )
        )
    else:
        rows.append(("Control retention", "- (no control set)"))
    if s.get("control_probe"):
        rows.append(
            (
                "Control probe",
                f"{_fmt(s['control_probe_last'])}  (row 0 {_fmt(s['control_probe_initial'])}, "
                f"drop {_fmt(s['control_probe_drop'])}; probe on frozen image features)",
            )
        )
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


def probe_summary(values: Sequence[float]) -> dict[str, Any]:
    """Summary of the per-row control probe accuracies (``{}`` without a probe)."""
    finite = lambda v: v if v is not None and math.isfinite(v) else None  # noqa: E731
    if not values:
        return {}
    first, last = float(values[0]), float(values[-1])
    return {
        "control_probe": [finite(float(v)) for v in values],
        "control_probe_initial": finite(first),
        "control_probe_last": finite(last),
        "control_probe_drop": finite(first - last),
    }


def report(run_dir: str | Path) -> tuple[str, list[Path]]:
    """Re-render ``summary.txt`` and the plots of a saved run from its ``metrics.json``.

    Returns the table text and the files written. Backs ``cl-proxyfda report RUN_DIR``.
    """
    from cl_proxyfda import plots  # matplotlib only when plotting

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory")
    results = RunResults.load(run_dir)
    for target in [run_dir / SUMMARY_TXT, *plots.plot_files(results, run_dir)]:
        if target.is_symlink() or (target.exists() and not target.is_file()):
            raise UserError(f"{target}: exists and is not a regular file; move it away to re-render the report")
    table = results.format_table()
    written = [write_atomic(run_dir / SUMMARY_TXT, table + "\n")]
    written.extend(plots.render_all(results, run_dir))
    return table, written
