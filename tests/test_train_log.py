"""Training curves: train_log.csv in the run folder and train/* in W&B, written every
``logging.train_every`` steps, consistent after ``--resume``."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from avalanche.core import SupervisedPlugin

from cl_proxyfda.config import parse_config
from cl_proxyfda.runner import build_run, execute
from cl_proxyfda.train_log import FIXED_COLUMNS, TRAIN_LOG, read_train_log
from cl_proxyfda.training import warmup_cosine
from conftest import tiny_config
from test_wandb_logger import inspect_records

ITERATIONS = 4  # per experience; 3 experiences
LR = 1e-3


def rows_of(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    text = path.read_text()
    assert text.endswith("\n")
    reader = csv.DictReader(text.splitlines())
    return list(reader.fieldnames or []), list(reader)


def test_tiny_run_writes_every_step_to_csv_and_wandb(tmp_path, tiny_stream_root):
    cfg = tiny_config(
        tiny_stream_root, tmp_path / "runs",
        train={"iterations": ITERATIONS, "warmup": 1, "schedule": "cosine", "lr": LR},
        strategies=[{"name": "l2sp", "weight": 0.1}],
        logging={"wandb": {"mode": "offline", "project": "tests"}, "train_every": 3},
    )
    execute(build_run(parse_config(cfg)), quiet=True)
    out = tmp_path / "runs" / "tiny"
    columns, rows = rows_of(out / TRAIN_LOG)
    assert columns == [*FIXED_COLUMNS, "l2sp"]
    assert len(rows) == 3 * ITERATIONS
    assert [(int(r["experience"]), int(r["iteration"])) for r in rows] == [(e, i) for e in (1, 2, 3) for i in range(1, ITERATIONS + 1)]
    assert [int(r["global_step"]) for r in rows] == list(range(1, 3 * ITERATIONS + 1))
    for r in rows:
        assert math.isfinite(float(r["loss"])) and float(r["loss"]) > 0
        # the rate the step used: warm-up, then cosine over the experience's steps
        assert float(r["lr"]) == pytest.approx(LR * warmup_cosine(int(r["iteration"]) - 1, ITERATIONS, 1, "cosine"), rel=1e-12)
    # L2-SP to the pre-trained weights: zero before the first update, then positive
    assert float(rows[0]["l2sp"]) == 0.0 and all(float(r["l2sp"]) > 0 for r in rows[1:])

    wandb_files = list(out.rglob("*.wandb"))
    assert len(wandb_files) == 1
    history = [r["history"]["item"] for r in inspect_records(wandb_files[0].parent) if r["type"] == "history"]
    train = [h for h in history if "train/loss" in h]
    assert [h["global_step"] for h in train] == list(range(1, 3 * ITERATIONS + 1))
    for h, r in zip(train, rows):
        assert h["train/loss"] == pytest.approx(float(r["loss"]), rel=1e-6)
        assert h["train/lr"] == pytest.approx(float(r["lr"]), rel=1e-12)
        assert h["train/l2sp"] == pytest.approx(float(r["l2sp"]), rel=1e-6, abs=1e-12)
    # evaluation rows carry the global step they were taken at: 0, then after each experience
    evals = [h for h in history if "acc/warm" in h]
    assert [(h["experience"], h["global_step"]) for h in evals] == [(i, i * ITERATIONS) for i in range(4)]


class SometimesTerms(SupervisedPlugin):
    """Publishes ``odd`` on odd global steps only and ``late`` from experience 2 on."""

    def __init__(self) -> None:
        super().__init__()
        self.loss_terms: dict[str, float] = {}
        self.step = 0

    def before_backward(self, strategy, **kwargs):
        self.step += 1
        if self.step % 2:
            self.loss_terms["odd"] = float(self.step)
        if strategy.experience.current_experience >= 1:
            self.loss_terms["late"] = float(-self.step)


class FileRows(SupervisedPlugin):
    """The number of rows in the train log before each step."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path, self.counts = path, []

    def before_training_iteration(self, strategy, **kwargs):
        self.counts.append(len(read_train_log(self.path)[1]))


def test_terms_absent_in_a_step_are_empty_and_rows_are_written_in_batches(tmp_path, tiny_stream_root):
    cfg = tiny_config(tiny_stream_root, tmp_path / "runs", train={"iterations": ITERATIONS}, logging={"train_every": 3})
    run = build_run(parse_config(cfg))
    spy = FileRows(run.out_dir / TRAIN_LOG)
    run.strategy.plugins[:0] = [SometimesTerms(), spy]
    execute(run, quiet=True)
    # every third step, and at the end of each experience
    assert spy.counts == [0, 0, 0, 3, 4, 4, 4, 7, 8, 8, 8, 11]
    columns, rows = rows_of(run.out_dir / TRAIN_LOG)
    assert columns == [*FIXED_COLUMNS, "odd", "late"]  # `late` widened the file in experience 2
    assert len(rows) == 3 * ITERATIONS
    for r in rows:
        step = int(r["global_step"])
        assert r["odd"] == (str(float(step)) if step % 2 else "")
        assert r["late"] == ("" if int(r["experience"]) == 1 else str(float(-step)))


def test_resume_keeps_the_rows_of_the_checkpoint_and_rewrites_the_rest(tmp_path, tiny_stream_root):
    cfg = parse_config(tiny_config(
        tiny_stream_root, tmp_path / "runs", train={"iterations": ITERATIONS, "lr": 3e-3},
        strategies=[{"name": "l2sp", "weight": 0.1, "anchor": "previous"}], checkpoint={"keep_last": 3}, logging={"train_every": 3},
    ))
    run = build_run(cfg)
    execute(run, quiet=True)
    path = run.out_dir / TRAIN_LOG
    reference = path.read_text()
    # as if killed during experience 3 after a flush, in the middle of a line: the last
    # checkpoint is after experience 2, the log holds rows of experience 3 and half a line
    (run.out_dir / "checkpoints" / "exp_003.pt").unlink()
    path.write_text(reference + "3,5,13,0.12")
    execute(build_run(cfg), resume=True, quiet=True)
    columns, rows = rows_of(path)
    ref_rows = list(csv.DictReader(reference.splitlines()))
    assert columns == [*FIXED_COLUMNS, "l2sp"]
    assert [int(r["global_step"]) for r in rows] == list(range(1, 3 * ITERATIONS + 1))  # no duplicate, no gap
    for r, ref in zip(rows, ref_rows):
        assert (r["experience"], r["iteration"], r["lr"]) == (ref["experience"], ref["iteration"], ref["lr"])
        assert float(r["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-5)  # experience 3 trained again, the same way
        assert float(r["l2sp"]) == pytest.approx(float(ref["l2sp"]), rel=1e-4, abs=1e-9)


def test_train_every_must_be_at_least_one(tmp_path, tiny_stream_root):
    from cl_proxyfda.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^logging.train_every: .*greater than or equal to 1"):
        parse_config(tiny_config(tiny_stream_root, tmp_path, logging={"train_every": 0}))
    assert parse_config(tiny_config(tiny_stream_root, tmp_path)).logging.train_every == 10


def test_a_plugin_parameter_group_gets_its_own_lr_column(tmp_path, tiny_stream_root):
    head_lr = 5e-3
    cfg = tiny_config(
        tiny_stream_root, tmp_path / "runs", train={"iterations": ITERATIONS, "warmup": 1, "lr": LR},
        strategies=[{"name": "infusing_head", "lr": head_lr}],
    )
    run = build_run(parse_config(cfg))
    execute(run, quiet=True)
    columns, rows = rows_of(run.out_dir / TRAIN_LOG)
    assert columns == [*FIXED_COLUMNS, "lr_infusing_head", "cosine_ce"]
    assert len(rows) == 3 * ITERATIONS
    for r in rows:
        factor = warmup_cosine(int(r["iteration"]) - 1, ITERATIONS, 1, "cosine")
        assert float(r["lr"]) == pytest.approx(LR * factor, rel=1e-12)
        assert float(r["lr_infusing_head"]) == pytest.approx(head_lr * factor, rel=1e-12)
        assert math.isfinite(float(r["cosine_ce"])) and float(r["cosine_ce"]) > 0
