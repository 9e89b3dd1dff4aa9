"""Per-iteration training curves: ``train_log.csv`` in the run folder and ``train/<name>``
in W&B.

Columns: ``experience`` (1-based, as W&B's ``experience`` axis), ``iteration`` (1-based
within the experience), ``global_step`` (optimizer steps since the start of the run,
across experiences: the W&B step axis of ``train/*``), ``loss`` (the total loss of the
step, plugin terms included; rank 0's under DDP), ``lr`` (the first parameter group's
rate used by the step), ``lr_<group>`` for groups plugins add, then one column per plugin
loss term in order of first appearance. A term the step did not compute is empty.

Cost: the loss stays a device tensor until a flush every ``logging.train_every`` steps
(one host sync per flush, none per step); plugin terms are floats already. A flush
writes its rows with one ``write`` call on an append-mode file, so a killed run leaves
whole lines; a new term column rewrites the file under the wider header (temp file, then
rename). On ``--resume`` :meth:`TrainLog.open` keeps only the rows of the experiences the
checkpoint holds.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from avalanche.core import SupervisedPlugin

from cl_proxyfda.io import write_atomic

__all__ = ["TRAIN_LOG", "FIXED_COLUMNS", "TrainLog", "read_train_log", "steps_before"]

TRAIN_LOG = "train_log.csv"
FIXED_COLUMNS = ("experience", "iteration", "global_step", "loss", "lr")


def read_train_log(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a train log; a last line without its newline is left out."""
    if not path.is_file():
        return [], []
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    return header, [dict(zip(header, line)) for line in reader if len(line) == len(header)]


def steps_before(strategy: Any, train_stream: Any, experiences: int) -> int:
    """Optimizer steps of the first ``experiences`` experiences (the budget of each)."""
    return sum(strategy.iterations_for(len(train_stream[k].dataset)) for k in range(experiences))


def _csv_text(columns: list[str], rows: list[Mapping[str, Any]], header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class TrainLog(SupervisedPlugin):
    """Records every training step; writes ``every`` steps at a time to ``path`` and to
    ``logger`` (a :class:`~cl_proxyfda.wandb_logger.WandbLogger`, or ``None``).

    ``global_step`` counts the steps done so far (start it with :func:`steps_before` on
    resume). Plugins publish ``loss_terms`` (name -> float, last value of each); a term
    counts for a step when the plugin stored a new value during it: each computation
    stores a fresh float object, so a value object seen at the previous step is stale.
    """

    def __init__(self, path: Path, every: int = 10, logger: Any = None, global_step: int = 0) -> None:
        super().__init__()
        self.path, self.every, self.logger = Path(path), every, logger
        self.global_step = global_step
        self.columns: list[str] = []
        self.pending: list[dict[str, Any]] = []
        self._seen: dict[int, dict[str, float]] = {}
        self._lrs: dict[str, float] = {}
        self._experience = self._iteration = 0

    # ------------------------------------------------------------------ file
    def open(self, keep_experiences: int | None = None) -> "TrainLog":
        """Start the file: empty for a new run; for a resumed one, only the rows of the
        first ``keep_experiences`` experiences (rewritten whole)."""
        header, rows = read_train_log(self.path) if keep_experiences else ([], [])
        kept = [r for r in rows if r.get("experience", "").isdigit() and int(r["experience"]) <= (keep_experiences or 0)]
        self.columns = header if kept else []
        write_atomic(self.path, _csv_text(self.columns, kept, header=True) if kept else "")
        return self

    def _write(self, rows: list[dict[str, Any]]) -> None:
        new = [k for row in rows for k in row if k not in self.columns]
        if new or not self.columns:
            _, old = read_train_log(self.path)
            self.columns = list(dict.fromkeys([*FIXED_COLUMNS, *self.columns, *new]))
            write_atomic(self.path, _csv_text(self.columns, [*old, *rows], header=True))
            return
        data = _csv_text(self.columns, rows, header=False).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)  # one call: a killed process leaves no half line
        finally:
            os.close(fd)

    def flush(self) -> None:
        """Write the pending steps (one host sync for all their losses)."""
        if not self.pending:
            return
        rows, self.pending = self.pending, []
        losses = torch.stack([r["loss"].float().reshape(()) for r in rows]).tolist()
        for row, loss in zip(rows, losses):
            row["loss"] = loss
        self._write(rows)
        if self.logger is not None:
            for row in rows:
                values = {k: v for k, v in row.items() if k not in ("experience", "iteration", "global_step")}
                self.logger.log_training(values, step=row["global_step"])

    def close(self) -> None:
        self.flush()

    # ------------------------------------------------------------- callbacks
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._experience = int(strategy.experience.current_experience) + 1
        self._iteration = 0

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        groups = strategy.optimizer.param_groups
        self._lrs = {"lr": float(groups[0]["lr"])}
        for i, group in enumerate(groups[1:], start=1):
            self._lrs[f"lr_{group.get('name', i)}"] = float(group["lr"])

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._iteration += 1
        self.global_step += 1
        row: dict[str, Any] = {"experience": self._experience, "iteration": self._iteration, "global_step": self.global_step}
        row["loss"] = strategy.loss.detach()
        row.update(self._lrs)
        for plugin in strategy.plugins:
            terms = getattr(plugin, "loss_terms", None)
            if not terms:
                continue
            seen = self._seen.get(id(plugin), {})
            for name, value in terms.items():
                if seen.get(name) is not value:
                    row[name if name not in FIXED_COLUMNS else f"term_{name}"] = float(value)
            self._seen[id(plugin)] = dict(terms)
        self.pending.append(row)
        if len(self.pending) >= self.every:
            self.flush()

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.flush()
