"""Task-agnostic (X-TAIL) evaluation: union vocabulary, accuracy, metrics, real runs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cl_proxyfda import metrics
from cl_proxyfda.config import parse_config
from cl_proxyfda.errors import ConfigError
from cl_proxyfda.models import TaskVocabulary, build_task_model
from cl_proxyfda.results import RunResults
from cl_proxyfda.runner import build_run, execute
from cl_proxyfda.union import SINGLE_TEMPLATE, build_union, union_correct
from conftest import tiny_config, write_image_folder_stream

# "red" is in both tasks: one union class.
OVERLAP_TASKS = {"warm": ["red", "orange", "yellow"], "rgb": ["green", "red", "blue"], "rest": ["purple", "gray"]}


@pytest.fixture(scope="module")
def overlap_root(tmp_path_factory) -> Path:
    return write_image_folder_stream(tmp_path_factory.mktemp("overlap") / "data", OVERLAP_TASKS)


def vocab(name: str, classes: list[str], templates: list[str] | None = None) -> TaskVocabulary:
    return TaskVocabulary(name, classes, templates or ["a photo of {}."])


# ------------------------------------------------------------------ the union
def test_union_merges_duplicate_names_in_stream_order():
    u = build_union([vocab("a", ["red", "blue", "green"]), vocab("b", ["green", "cat"]), vocab("c", ["red", "dog"])])
    assert u.classnames == ("red", "blue", "green", "cat", "dog")
    assert u.task_maps == ((0, 1, 2), (2, 3), (0, 4))
    assert u.source == ((0, 0), (0, 1), (0, 2), (1, 1), (2, 1))  # first occurrence of each name
    assert u.shared() == {"red": [0, 2], "green": [0, 1]}
    assert build_union([vocab("a", ["x"]), vocab("b", ["y"])]).shared() == {}


def test_union_correct_by_hand():
    # 4 images of task 1 (labels 0, 1, 0, 1) whose union classes are 2 and 3.
    logits = torch.tensor([[0.1, 0.2, 0.9, 0.0], [0.8, 0.0, 0.1, 0.3], [0.0, 0.0, 0.5, 0.4], [0.0, 0.1, 0.0, 0.7]])
    labels = torch.tensor([0, 1, 0, 1])
    # argmax: 2 (true 2), 0 (true 3), 2 (true 2), 3 (true 3) -> 3 correct
    assert union_correct(logits, labels, (2, 3)) == 3
    assert union_correct(logits, labels, (3, 2)) == 0


def test_task_agnostic_matrix_metrics_by_hand():
    r = RunResults(task_names=["a", "b", "c"])
    ta = [[10.0, 20.0, 30.0], [50.0, 25.0, 35.0], [40.0, 60.0, 20.0], [30.0, 50.0, 70.0]]
    for row in ta:
        r.add_row([90.0, 90.0, 90.0], extra={"task_agnostic": row})
    s = r.summary()["extra"]["task_agnostic"]
    # Transfer: mean over columns j >= 1 of rows 1..j (before task j is learned): (25 + (35 + 20) / 2) / 2
    assert s["transfer"] == pytest.approx(26.25)
    assert s["last"] == pytest.approx(50.0)
    # BWT: mean over j<T-1 of ta[T][j] - ta[j+1][j] = ((30 - 50) + (50 - 60)) / 2 = -15
    assert s["bwt"] == pytest.approx(-15.0)
    full = metrics.summarize(np.asarray(ta))
    assert s["avg"] == pytest.approx(full["avg"])
    table = r.format_table()
    assert "Task-agnostic accuracy" in table and "BWT -15.0" in table


# ------------------------------------------------------------ the union head
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    vocabs = [vocab("a", ["red", "blue"], ["a {} thing.", "the {} one."]), vocab("b", ["green", "red"], ["b {}."])]
    model, _, pre = build_task_model("cl-test-tiny", None, vocabs)
    return model.eval(), pre


def test_union_head_rows_and_cache(tiny_model):
    model, _ = tiny_model
    u = build_union(model.tasks)
    head = model.union_embeddings(u, "task")
    assert head.shape[0] == 3  # red, blue, green
    h0, h1 = model.class_embeddings(0), model.class_embeddings(1)
    assert torch.allclose(head[0], h0[0]) and torch.allclose(head[1], h0[1]) and torch.allclose(head[2], h1[0])
    calls = model.text_encode_calls
    single = model.union_embeddings(u, "single")
    assert model.text_encode_calls == calls + 1
    with torch.no_grad():
        expect = F.normalize(model.clip.encode_text(model.tokenizer([SINGLE_TEMPLATE.format(c) for c in u.classnames])), dim=-1)
    assert torch.allclose(single, expect, atol=1e-6)
    model.union_embeddings(u, "single")
    model.union_embeddings(u, "task")
    assert model.text_encode_calls == calls + 1  # both cached
    model.text_changed()
    model.union_embeddings(u, "single")
    assert model.text_encode_calls == calls + 2  # recomputed after the text tower changed


# ------------------------------------------------------------------- config
def test_config_defaults_and_errors(tmp_path, overlap_root):
    cfg = parse_config(tiny_config(overlap_root, tmp_path))
    assert cfg.eval.task_agnostic is False and cfg.eval.task_agnostic_templates == "task"
    on = parse_config(tiny_config(overlap_root, tmp_path, eval={"task_agnostic": True}))
    assert on.to_dict()["eval"]["task_agnostic"] is True
    xtail = {"name": "xtail", "root": str(tmp_path)}
    cfg = parse_config({**tiny_config(overlap_root, tmp_path), "stream": xtail})
    assert cfg.eval.task_agnostic is True and cfg.eval.task_agnostic_templates == "single"
    off = parse_config({**tiny_config(overlap_root, tmp_path, eval={"task_agnostic": False}), "stream": xtail})
    assert off.eval.task_agnostic is False
    bad = tiny_config(overlap_root, tmp_path, eval={"task_agnostic": True, "task_agnostic_templates": "single"},
                      model={"prompt_learner": {"n_ctx": 2}})
    with pytest.raises(ConfigError, match="eval.task_agnostic_templates"):
        parse_config(bad)


# --------------------------------------------------------------- real runs
def hand_row0(run) -> list[float]:
    """Union-vocabulary zero-shot accuracy of every task, computed from scratch."""
    model = run.model.eval()
    tasks = run.stream.tasks
    first: dict[str, list[str]] = {}
    for t in tasks:
        for c in t.classnames:
            first.setdefault(c, t.templates)
    names = list(first)
    with torch.no_grad():
        text = []
        for c in names:
            e = F.normalize(model.clip.encode_text(model.tokenizer([tpl.format(c) for tpl in first[c]])), dim=-1)
            text.append(F.normalize(e.mean(0), dim=-1))
        text = torch.stack(text)
        out = []
        for t in tasks:
            images = torch.stack([run.evaluator.transform(t.test[i][0]) for i in range(len(t.test))])
            labels = [t.test[i][1] for i in range(len(t.test))]
            pred = (F.normalize(model.clip.encode_image(images), dim=-1) @ text.t()).argmax(1).tolist()
            out.append(100.0 * np.mean([names[p] == t.classnames[y] for p, y in zip(pred, labels)]))
    return out


def zscl_reference(root: Path) -> dict:
    rng = np.random.default_rng(0)
    for i in range(6):
        sub = root / "images" / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    (root / "classes.txt").write_text("circle\nsquare\n", encoding="utf-8")
    return {"name": "zscl", "reference": "folder", "reference_folder": str(root / "images"),
            "reference_classnames": str(root / "classes.txt"), "batch_size": 4}


@pytest.mark.parametrize("strategy", ["naive", "lwf", "zscl"])
def test_real_run_writes_task_agnostic_matrix(tmp_path, overlap_root, strategy):
    entry = zscl_reference(tmp_path / "ref") if strategy == "zscl" else {"name": strategy}
    towers = ["image", "text"] if strategy == "zscl" else ["image"]  # text training: the union head must follow
    cfg = tiny_config(overlap_root, tmp_path / "runs", strategies=[entry], eval={"batch_size": 5, "task_agnostic": True},
                      model={"train_towers": towers}, train={"lr": 1e-2, "iterations": 3, "batch_size": 6})
    cfg["stream"]["tasks"] = list(OVERLAP_TASKS)
    expected_row0 = hand_row0(build_run(parse_config(cfg)))
    results = execute(build_run(parse_config(cfg)), quiet=True)
    data = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    ta = np.asarray(data["extra_matrices"]["task_agnostic"], dtype=float)
    assert ta.shape == (4, 3)
    assert ((ta >= 0) & (ta <= 100)).all()
    assert ta[0] == pytest.approx(expected_row0, abs=1e-9)
    assert set(data["summary"]["extra"]["task_agnostic"]) >= {"transfer", "avg", "last", "bwt"}
    assert data["summary"]["extra"]["task_agnostic"]["last"] == pytest.approx(ta[-1].mean())
    # union rows are the task heads' rows (one template list for all tasks here): an image
    # right over the union is right over its own task's classes
    assert (ta <= np.asarray(results.rows) + 1e-9).all()
    assert (tmp_path / "runs" / "tiny" / "task_agnostic_matrix.csv").is_file()
    assert data["meta"]["task_agnostic"] == {"classes": 7, "templates": "task", "shared_names": {"red": [0, 1]}}
    if strategy == "naive":  # the task-incremental matrix is the same with the mode off
        off = tiny_config(overlap_root, tmp_path / "off", strategies=[entry], eval={"batch_size": 5},
                          train={"lr": 1e-2, "iterations": 3, "batch_size": 6})
        off["stream"]["tasks"] = list(OVERLAP_TASKS)
        plain = execute(build_run(parse_config(off)), quiet=True)
        np.testing.assert_allclose(plain.rows, results.rows, atol=1e-9)
        assert "task_agnostic" not in plain.extra_matrices


def test_demo_stream_task_agnostic(tmp_path):
    cfg = {
        "run": {"name": "demo", "seed": 0, "device": "cpu", "output_dir": str(tmp_path)},
        "model": {"name": "demo-clip-tiny", "pretrained": "demo"},
        "stream": {"name": "demo", "tasks": ["outline-colours", "shades"], "train_per_class": 4, "test_per_class": 3,
                   "control_per_class": 2, "reference_size": 0},
        "train": {"iterations": 2, "batch_size": 8},
        "eval": {"task_agnostic": True},
        "logging": {"wandb": {"mode": "disabled"}, "plots": True, "progress": False},
    }
    run = build_run(parse_config(cfg))
    expected_row0 = hand_row0(run)
    results = execute(build_run(parse_config(cfg)), quiet=True)
    ta = results.matrix("task_agnostic")
    assert ta.shape == (3, 2) and ((ta >= 0) & (ta <= 100)).all()
    assert ta[0] == pytest.approx(expected_row0, abs=1e-9)
    assert (tmp_path / "demo" / "task_agnostic_matrix.png").is_file()


# ------------------------------------------------------------- the X-TAIL stream
def test_xtail_stream_definition(tmp_path):
    from cl_proxyfda.benchmarks.mtil import MTIL_ORDER_I, MTIL_ORDER_II
    from cl_proxyfda.benchmarks.xtail import XTAIL_ORDERS, XTAILStreamParams, xtail_task_names
    from cl_proxyfda.errors import UserError
    from cl_proxyfda.registry import STREAMS
    from test_mtil import make_folder_copy

    assert XTAIL_ORDERS["I"] == ["Aircraft", "Caltech101", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet", "StanfordCars", "SUN397"]
    # LADA's configs/data/TAIL_order2.yaml: not MTIL's order II without CIFAR100
    assert XTAIL_ORDERS["II"] == ["StanfordCars", "Aircraft", "OxfordPet", "Food", "SUN397", "MNIST", "Flowers", "DTD", "Caltech101", "EuroSAT"]
    assert XTAIL_ORDERS["II"] != [n for n in MTIL_ORDER_II if n != "CIFAR100"]
    assert set(XTAIL_ORDERS["I"]) == set(XTAIL_ORDERS["II"]) == set(MTIL_ORDER_I) - {"CIFAR100"}
    assert xtail_task_names("II", ["sun397", "Aircraft", "food"]) == ["Aircraft", "Food", "SUN397"]
    assert xtail_task_names("I", ["sun397", "Aircraft", "food"]) == ["Aircraft", "Food", "SUN397"]
    assert XTAILStreamParams(root="x").shots == 16
    root = make_folder_copy(tmp_path / "mtil")
    for order, expected in (("I", ["EuroSAT", "MNIST"]), ("II", ["MNIST", "EuroSAT"])):
        data = STREAMS.build("xtail", {"root": str(root), "format": "image_folder", "order": order, "tasks": ["EuroSAT", "MNIST"], "shots": 2})
        assert [t.name for t in data.tasks] == expected
        assert [len(t.train) for t in data.tasks] == [2 * 10, 2 * 10]  # 2 shots x 10 classes
        assert [len(t.test) for t in data.tasks] == [30, 30]  # full test sets
        # with enough images per class the draw is the mtil stream's, image for image
        mtil = STREAMS.build("mtil", {"root": str(root), "format": "image_folder", "order": order, "tasks": ["EuroSAT", "MNIST"], "shots": 2})
        assert [t.train.indices for t in data.tasks] == [t.train.indices for t in mtil.tasks]
    # 5 shots of classes with 3 training images: drawn with replacement (RAIL's and LADA's
    # repeat=True), where the mtil stream refuses
    data = STREAMS.build("xtail", {"root": str(root), "format": "image_folder", "tasks": ["EuroSAT"], "shots": 5, "train_limit": 40})
    (task,) = data.tasks
    full = STREAMS.build("xtail", {"root": str(root), "format": "image_folder", "tasks": ["EuroSAT"], "shots": None}).tasks[0]
    assert len(full.train) == 30 and len(task.train) == 40  # 10 x 5 = 50 draws, then the seeded limit
    unlimited = STREAMS.build("xtail", {"root": str(root), "format": "image_folder", "tasks": ["EuroSAT"], "shots": 5}).tasks[0]
    assert len(unlimited.train) == 50 and np.bincount(unlimited.train.targets).tolist() == [5] * 10
    assert len(set(unlimited.train.indices)) <= 30  # at most the 3 images of each class: repeats
    with pytest.raises(UserError, match="stream.shots"):
        STREAMS.build("mtil", {"root": str(root), "format": "image_folder", "tasks": ["EuroSAT"], "shots": 5})
    with pytest.raises(ConfigError, match="stream.tasks: CIFAR100 is not part of X-TAIL"):
        STREAMS.build("xtail", {"root": str(root), "format": "image_folder", "tasks": ["EuroSAT", "cifar100"]})
    with pytest.raises(ConfigError, match="stream.tasks: unknown MTIL task 'Cars'"):
        xtail_task_names("II", ["Cars"])


# -------------------------------------------------------------- comparisons
def test_comparison_aggregates_task_agnostic_metrics(tmp_path, overlap_root):
    import csv

    from cl_proxyfda.compare import METRIC_COLUMNS, TASK_AGNOSTIC_COLUMNS, run_comparison

    base = tiny_config(overlap_root, tmp_path / "unused", train={"iterations": 2}, eval={"task_agnostic": True, "batch_size": 5})
    base.pop("strategies")
    base["stream"]["tasks"] = ["warm", "rgb"]
    spec = {"name": "ta_cmp", "base": base, "seeds": [0, 1],
            "variants": [{"name": "naive", "strategies": [{"name": "naive"}]}]}
    run_comparison(spec, tmp_path / "cmp", log=lambda line: None)
    with open(tmp_path / "cmp" / "comparison.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    per_seed = [RunResults.load(tmp_path / "cmp" / "variants" / "naive" / f"seed{s}").summary()["extra"]["task_agnostic"] for s in (0, 1)]
    for key, _, _ in TASK_AGNOSTIC_COLUMNS:
        values = [s[key[len("ta_"):]] for s in per_seed]
        assert float(row[f"{key}_mean"]) == pytest.approx(np.mean(values), abs=1e-9)
        assert float(row[f"{key}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-9)
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Variant"))
    assert "TA Transfer" in header and "TA BWT" in header
    assert len(header.strip("|").split("|")) == 2 + len(METRIC_COLUMNS) + len(TASK_AGNOSTIC_COLUMNS)


def test_prefetch_lists_the_xtail_datasets(tmp_path, overlap_root):
    from cl_proxyfda.benchmarks.xtail import XTAIL_ORDERS
    from cl_proxyfda.prefetch import needs_of

    cfg = parse_config({**tiny_config(overlap_root, tmp_path), "stream": {"name": "xtail", "root": str(tmp_path), "order": "II"}})
    names = [n.label for n in needs_of(cfg) if n.label.startswith("dataset ")]
    assert names == [f"dataset {d}" for d in XTAIL_ORDERS["II"]]


def test_wandb_logs_the_task_agnostic_rows(tmp_path, overlap_root):
    import subprocess
    import sys

    cfg = tiny_config(overlap_root, tmp_path / "runs", eval={"task_agnostic": True, "batch_size": 5},
                      logging={"wandb": {"mode": "offline", "project": "tests"}, "plots": False, "progress": False})
    cfg["stream"]["tasks"] = ["warm", "rgb"]
    results = execute(build_run(parse_config(cfg)), quiet=True)
    (wandb_file,) = list((tmp_path / "runs").rglob("*.wandb"))
    proc = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(wandb_file)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip().startswith("{")]
    text = json.dumps([r for r in records if r.get("type") == "history"])
    assert "task_agnostic/warm" in text and "task_agnostic/rgb" in text
    proc = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", "--summary", str(wandb_file.parent.parent)],
                          capture_output=True, text=True, timeout=120)
    summary = json.loads(proc.stdout)["summary"]
    assert summary["task_agnostic_matrix"]["nrows"] == 3
    expected = results.summary()["extra"]["task_agnostic"]
    assert summary["extra/task_agnostic/last"] == pytest.approx(expected["last"])
    assert summary["extra/task_agnostic/bwt"] == pytest.approx(expected["bwt"])
    assert summary["task_agnostic/rgb"] == pytest.approx(results.matrix("task_agnostic")[-1, 1])
