"""Weights & Biases logging of a run, on wandb's public API only.

Avalanche's ``WandBLogger`` does not work with wandb 0.31 (it calls removed functions),
so the runner uses this one. It logs per-experience scalars against an ``experience``
step metric, training scalars against ``global_step`` (optimizer steps since the start of
the run, across experiences; evaluation rows carry the ``global_step`` they were taken
at too, so both can be plotted on one axis), and at the end the accuracy matrix as a
table, the stability-plasticity curves as a line plot and the metric summary.

Modes: ``"offline"`` (default: local files under ``run_dir/wandb``, no key, no
network; upload later with ``wandb sync``), ``"online"`` and ``"disabled"``. If W&B
cannot start (no key, no network, bad key, timeout), one warning is logged and the
logger falls back to offline mode, then to disabled mode: logging never stops a run.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import wandb

from cl_proxyfda.errors import ConfigError
from cl_proxyfda.results import RunResults, safe_name, to_jsonable

__all__ = ["WandbLogger", "WANDB_MODES"]

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flatten(prefix: str, value: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, Mapping):
            out.update(_flatten(f"{name}/", item))
        else:
            out[name] = item
    return out


@contextlib.contextmanager
def _held_wandb_lines() -> Any:
    """Hold back the ``wandb`` logger's warnings and errors (``error in wandb.init()``)
    while an attempt that can fall back runs: the fallback warning says it in one line."""
    wandb_log = logging.getLogger("wandb")

    def below_warning(record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING

    wandb_log.addFilter(below_warning)
    try:
        yield
    finally:
        wandb_log.removeFilter(below_warning)


class WandbLogger:
    """One W&B run for one continual-learning run.

    Args:
        run_dir: the run's output folder; W&B writes under ``run_dir/wandb``.
        project, entity, group, name, tags: as in ``wandb.init``.
        config: the run configuration (JSON-able after Path/numpy conversion).
        mode: ``"offline"`` (default), ``"online"`` or ``"disabled"``.
        init_timeout: seconds ``wandb.init`` may take before giving up (online mode).

    Per-experience keys (step metric ``experience`` = row index, 0 = zero-shot):
    ``acc/<task>``, ``acc_all_mean``, ``acc_seen_mean`` and ``acc_new_task`` (rows >= 1),
    ``control_acc``, ``control_probe`` (``eval.control_probe``), ``diag/<name>`` and
    ``<extra matrix>/<task>``; each row also records ``global_step``.
    Training keys (step metric ``global_step``): ``train/loss``, ``train/lr``,
    ``train/lr_<group>`` and ``train/<plugin term>`` (see :mod:`cl_proxyfda.train_log`).
    """

    def __init__(
        self,
        run_dir: str | Path,
        project: str,
        *,
        config: Mapping[str, Any] | None = None,
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: Sequence[str] | None = None,
        mode: str = "offline",
        init_timeout: float = 30.0,
    ) -> None:
        if mode not in WANDB_MODES:
            raise ConfigError("wandb.mode", f"must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.requested_mode = mode
        self._step_globs: set[str] = set()
        self._finished = False
        init_kwargs = dict(
            project=project,
            entity=entity,
            group=group,
            name=name,
            tags=list(tags) if tags else None,
            config=to_jsonable(dict(config or {})),
            dir=str(self.run_dir),
            reinit="create_new",  # several loggers in one process never share a run
            settings=wandb.Settings(console="off", silent=True, init_timeout=init_timeout),
        )
        self.run, self.mode = self._start(mode, init_kwargs)
        self.run.define_metric("experience")
        self.run.define_metric("global_step")
        for glob in ("acc/*", "acc_*", "control_acc", "control_probe", "diag/*"):
            self._step_metric(glob, "experience")
        self._step_metric("train/*", "global_step")

    @staticmethod
    def _start(mode: str, init_kwargs: dict[str, Any]) -> tuple[Any, str]:
        chain = {"online": ["online", "offline", "disabled"], "offline": ["offline", "disabled"]}
        attempts = chain.get(mode, [mode])
        for attempt, next_mode in zip(attempts, attempts[1:] + [None]):
            try:
                with _held_wandb_lines() if next_mode is not None else contextlib.nullcontext():
                    return wandb.init(mode=attempt, **init_kwargs), attempt
            except Exception as exc:  # wandb raises several types: UsageError, CommError...
                if next_mode is None:
                    raise
                first_line = (str(exc).strip().splitlines() or [""])[0]
                log.warning(
                    "W&B could not start in %s mode (%s: %s); continuing in %s mode%s",
                    attempt, type(exc).__name__, first_line, next_mode,
                    " (upload later with `wandb sync`)" if next_mode == "offline" else "",
                )
        raise AssertionError("unreachable")

    def _step_metric(self, glob: str, step: str) -> None:
        if glob not in self._step_globs:
            self.run.define_metric(glob, step_metric=step)
            self._step_globs.add(glob)

    @property
    def local_dir(self) -> Path | None:
        """The folder of this run's ``.wandb`` file (``None`` when disabled)."""
        if self.mode == "disabled":
            return None
        return Path(self.run.dir).parent

    # -- logging ---------------------------------------------------------------------

    def row_scalars(self, results: RunResults, i: int) -> dict[str, float]:
        """The per-experience scalars :meth:`log_row` logs for row ``i``."""
        row = results.rows[i]
        data: dict[str, float] = {"experience": i}
        for task, value in zip(results.task_names, row):
            data[f"acc/{safe_name(task)}"] = value
        data["acc_all_mean"] = sum(row) / len(row)
        if i >= 1:
            data["acc_seen_mean"] = sum(row[:i]) / i
            data["acc_new_task"] = row[i - 1]
        if results.control:
            data["control_acc"] = results.control[i]
        if results.control_probe:
            data["control_probe"] = results.control_probe[i]
        if i < len(results.diagnostics):
            for key, value in results.diagnostics[i].items():
                data[f"diag/{safe_name(key)}"] = value
        for matrix_name, rows in results.extra_matrices.items():
            for task, value in zip(results.task_names, rows[i]):
                data[f"{safe_name(matrix_name)}/{safe_name(task)}"] = value
        return {k: float(v) for k, v in data.items() if _finite(v)}

    def log_row(self, results: RunResults, i: int, global_step: int | None = None) -> None:
        """Log row ``i`` of the results (0 = zero-shot) against ``experience = i``; with
        ``global_step`` (training steps done before the evaluation) on that axis too."""
        data = self.row_scalars(results, i)
        for matrix_name in results.extra_matrices:
            self._step_metric(f"{safe_name(matrix_name)}/*", "experience")
        data["experience"] = i
        if global_step is not None:
            data["global_step"] = global_step
        self.run.log(data)

    def log_training(self, values: Mapping[str, float], step: int) -> None:
        """Log training scalars (loss, learning rates, plugin terms) of optimizer step
        ``step`` (counted across experiences) as ``train/<name>``; non-finite ones are left out."""
        data: dict[str, float] = {
            f"train/{safe_name(k)}": float(v) for k, v in values.items() if _finite(float(v))
        }
        data["global_step"] = step
        self.run.log(data)

    def log_final(
        self,
        results: RunResults,
        config: Mapping[str, Any] | None = None,
        images: Sequence[str | Path] = (),
    ) -> None:
        """Log the accuracy matrix (``wandb.Table``), the stability-plasticity curves
        (line plot), the metric summary (``run.summary``; undefined metrics are left
        out), the run metadata and config
        (``run.config``) and optional PNG ``images`` (e.g. from ``plots.render_all``)."""
        payload: dict[str, Any] = {"accuracy_matrix": self._table(results, None)}
        for matrix_name in results.extra_matrices:
            payload[f"{safe_name(matrix_name)}_matrix"] = self._table(results, matrix_name)
        curves = self._curves(results)
        if curves is not None:
            payload["stability_plasticity"] = curves
        for path in images:
            payload[f"plots/{Path(path).stem}"] = wandb.Image(str(path))
        self.run.log(payload)

        summary = to_jsonable(results.summary())
        for key, value in _flatten("", summary).items():
            if value is not None:  # undefined metrics (e.g. Transfer with one task) stay absent
                self.run.summary[key] = value
        for key, value in (results.meta.get("ledger") or {}).items():  # the cost ledger, next to the scores
            self.run.summary[f"ledger/{key}"] = value
        update = {"meta": to_jsonable(results.meta)} if results.meta else {}
        update.update(to_jsonable(dict(config or {})))
        if update:
            self.run.config.update(update, allow_val_change=True)

    @staticmethod
    def _table(results: RunResults, name: str | None) -> "wandb.Table":
        matrix = results.matrix(name)
        with_control = name is None and bool(results.control)
        with_probe = name is None and bool(results.control_probe)
        columns = ["row", "after", *results.task_names] + (["control"] if with_control else []) + (["control_probe"] if with_probe else [])
        data = []
        for i, row in enumerate(matrix.tolist()):
            cells = [v if math.isfinite(v) else None for v in row]
            line = [i, results.row_label(i), *cells]
            if with_control:
                line.append(results.control[i])
            if with_probe:
                line.append(results.control_probe[i] if math.isfinite(results.control_probe[i]) else None)
            data.append(line)
        return wandb.Table(columns=columns, data=data)

    @staticmethod
    def _curves(results: RunResults) -> Any | None:
        summary = results.summary()
        if not summary or summary["experiences_done"] < 1:
            return None
        steps = list(range(1, summary["experiences_done"] + 1))
        xs: list[list[int]] = []
        ys: list[list[float]] = []
        keys: list[str] = []
        for key, values, x in (
            ("accuracy on the task just learned", summary["new_task_accuracy"], steps),
            ("mean accuracy on tasks seen so far", summary["seen_accuracy"][1:], steps),
            ("control retention", summary["control"], list(range(len(summary["control"])))),
            ("control probe", summary.get("control_probe", []), list(range(len(summary.get("control_probe", []))))),
        ):
            points = [(s, v) for s, v in zip(x, values) if v is not None]
            if points:
                xs.append([s for s, _ in points])
                ys.append([v for _, v in points])
                keys.append(key)
        return wandb.plot.line_series(
            xs=xs, ys=ys, keys=keys, title="Stability-plasticity", xname="experience"
        )

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (idempotent)."""
        if not self._finished:
            self._finished = True
            self.run.finish(exit_code=exit_code)

    def __enter__(self) -> "WandbLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
