"""train.teacher_table: the frozen reference's embeddings served from a per-experience table."""
from __future__ import annotations

import pytest
import torch
from avalanche.core import SupervisedPlugin

from cl_proxyfda.config import parse_config
from cl_proxyfda.errors import ConfigError
from cl_proxyfda.runner import build_run, execute
from conftest import TINY_TASKS, tiny_config


class CheckServedRows(SupervisedPlugin):
    """Before each backward: the teacher features the plugins got for this batch against a
    real forward of the frozen reference on the batch's images."""

    def __init__(self) -> None:
        super().__init__()
        self.max_difference = 0.0
        self.batches = 0
        self.index_sets: list[list[int]] = []

    def before_backward(self, strategy, **kwargs) -> None:
        bank = strategy.teachers
        served = bank.outputs(strategy, "pretrained")["image_embeds"]
        teacher = bank.get(strategy.model, "pretrained")
        with torch.no_grad():
            real = teacher.encode_image(strategy.mb_x).float()
        self.max_difference = max(self.max_difference, float((served - real).abs().max()))
        self.batches += 1
        self.index_sets.append(strategy.mb_indices.tolist())


def _run(data_root, tmp_path, name: str, table: bool, workers: int = 0, strategies=None):
    cfg = tiny_config(
        data_root, tmp_path / name,
        strategies=strategies or [{"name": "fda", "k": 3, "weight": 1.0}, {"name": "ldifs", "weight": 1.0, "layers": "embed"}],
    )
    cfg["train"].update({"augment": False, "teacher_table": table, "workers": workers, "sampler": "random"})
    run = build_run(parse_config(cfg))
    check = CheckServedRows() if table else None
    if check is not None:
        run.strategy.plugins.insert(0, check)
    results = execute(run, quiet=True)
    return run, results, check


def test_served_rows_equal_teacher_forwards_and_no_teacher_runs_per_batch(data_root, tmp_path):
    run, results, check = _run(data_root, tmp_path, "table", table=True)
    bank = run.strategy.teachers
    experiences, iterations = len(TINY_TASKS), 3
    assert check.batches == experiences * iterations
    assert check.max_difference < 1e-5  # the same images through the same frozen model
    # one shared lookup per batch for FDA and LDIFS, no per-batch teacher forward
    assert bank.served_count == experiences * iterations and bank.forward_count == 0
    assert all(len(ix) == 8 and min(ix) >= 0 for ix in check.index_sets)  # batch 8, dataset positions
    assert results.meta["ledger"]["teacher_table_mb"] > 0
    # the table holds one row per training image of the experience, in dataset order
    (reference, experience), table = next(iter(bank._tables.items()))
    assert reference == "pretrained" and experience == experiences - 1
    assert table.shape[0] == len(run.benchmark.train_stream[experience].dataset)
    sizes = [len(run.benchmark.train_stream[e].dataset) for e in range(experiences)]
    assert results.meta["ledger"]["teacher_table_mb"] == pytest.approx(max(sizes) * table.shape[1] * 4 / 2**20)


def test_the_same_training_with_and_without_the_table(data_root, tmp_path):
    _, with_table, _ = _run(data_root, tmp_path, "table", table=True)
    plain_run, plain, _ = _run(data_root, tmp_path, "plain", table=False)
    assert plain_run.strategy.teachers.forward_count == len(TINY_TASKS) * 3
    assert len(with_table.rows) == len(plain.rows) == len(TINY_TASKS) + 1
    for a, b in zip(with_table.rows + [with_table.control], plain.rows + [plain.control]):
        assert a == pytest.approx(b, abs=1e-6)


def test_indices_travel_with_the_batch_through_worker_processes(data_root, tmp_path):
    _, results, check = _run(data_root, tmp_path, "workers", table=True, workers=2)
    assert check.batches == len(TINY_TASKS) * 3 and check.max_difference < 1e-5


def test_layers_still_run_the_teacher(data_root, tmp_path):
    run, _, _ = _run(data_root, tmp_path, "layers", table=True, strategies=[{"name": "ldifs", "weight": 1.0, "layers": ["block1"]}])
    assert run.strategy.teachers.forward_count == len(TINY_TASKS) * 3


def test_table_with_augmentation_is_refused(data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path, strategies=[{"name": "ldifs"}])
    cfg["train"]["teacher_table"] = True
    with pytest.raises(ConfigError, match=r"train.*teacher_table.*augment: false"):
        parse_config(cfg)
