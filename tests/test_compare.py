"""`cl-proxyfda compare`: schema, grid expansion, real tiny runs, table, rerun and resume."""
from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cl_proxyfda.cli import main
from cl_proxyfda.compare import (
    METRIC_COLUMNS,
    csv_columns,
    grid_points,
    mean_std,
    pareto_front,
    plan_comparison,
    run_comparison,
)
from cl_proxyfda.errors import ConfigError, UserError
from cl_proxyfda.results import RunResults
from conftest import TINY_TASKS, tiny_config, write_image_folder_stream

torch.set_num_threads(1)

SEEDS = [0, 1]
# (variant, seed) in run order
ALL_RUNS = [(v, s) for v in ("naive", "l2sp[weight=0.1]", "l2sp[weight=10]") for s in SEEDS]


def make_base(root: Path, **sections) -> dict:
    base = tiny_config(root, root.parent / "unused_runs", stream={"control": "ctrl"}, train={"iterations": 2},
                       checkpoint={"keep_last": 3}, **sections)
    base.pop("strategies")
    return base


def comparison(root: Path, **top) -> dict:
    data = {
        "name": "tiny_cmp",
        "base": make_base(root),
        "seeds": list(SEEDS),
        "variants": [
            {"name": "naive", "strategies": [{"name": "naive"}]},
            {"name": "l2sp", "strategies": [{"name": "l2sp"}], "grid": {"strategies.0.weight": [0.1, 10]}},
        ],
    }
    data.update(top)
    return data


@pytest.fixture(scope="module")
def stream_root(tmp_path_factory) -> Path:
    return write_image_folder_stream(tmp_path_factory.mktemp("cmp") / "data", {**TINY_TASKS, "ctrl": ["gray", "red"]})


@pytest.fixture(scope="module")
def finished(stream_root, tmp_path_factory):
    """One real comparison: 3 variants x 2 seeds of the tiny stream (2 steps a task)."""
    out = tmp_path_factory.mktemp("cmp_out") / "tiny_cmp"
    lines: list[str] = []
    result = run_comparison(comparison(stream_root), out, log=lines.append)
    return result, out, lines


def copy_out(finished, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(finished[1], target)
    return target


# ------------------------------------------------------------------ pure helpers
def test_mean_std_and_pareto_by_hand():
    assert mean_std([1.0, 2.0, 6.0]) == pytest.approx((3.0, math.sqrt(7.0)))  # ddof 1: (4+1+9)/2
    assert mean_std([5.0]) == (5.0, None)
    assert mean_std([None, 4.0, None, 2.0]) == pytest.approx((3.0, math.sqrt(2.0)))
    assert mean_std([None]) == (None, None)
    # (x, y), higher is better on both
    assert pareto_front([(1, 5), (2, 4), (1.5, 3), (3, 1), (3, 1)]) == [True, True, False, True, True]
    assert pareto_front([(1, 1), (2, 2)]) == [False, True]


def test_grid_points_names_and_order():
    points = grid_points({"strategies.0.weight": [0.1, 1, 10], "train.lr": [1e-3, 0.01]})
    assert [label for _, label in points] == [
        "weight=0.1,lr=0.001", "weight=0.1,lr=0.01", "weight=1,lr=0.001",
        "weight=1,lr=0.01", "weight=10,lr=0.001", "weight=10,lr=0.01",
    ]
    assert points[3][0] == {"strategies.0.weight": 1, "train.lr": 0.01}
    clash = grid_points({"strategies.0.weight": [1], "strategies.1.weight": [2]})
    assert clash[0][1] == "strategies.0.weight=1,strategies.1.weight=2"
    assert grid_points({}) == [({}, "")]


# ------------------------------------------------------------------------ schema
def _bad(root: Path, change) -> dict:
    data = comparison(root)
    change(data)
    return data


SCHEMA_CASES = [
    ("missing variants", lambda d: d.pop("variants"), "variants", "required key is missing"),
    ("unknown top key", lambda d: d.update(seed=3), "seed", "unknown key"),
    ("unknown variant key", lambda d: d["variants"][1].update(lr=0.1), "variants[1].lr", "unknown key"),
    ("repeated seeds", lambda d: d.update(seeds=[0, 0]), "seeds", "repeat"),
    ("no seeds", lambda d: d.update(seeds=[]), "seeds", "at least 1"),
    ("empty grid list", lambda d: d["variants"][1].update(grid={"strategies.0.weight": []}), "variants[1].grid", "no values"),
    ("strategy without name", lambda d: d["variants"][0].update(strategies=[{"weight": 1}]), "variants[0].strategies", "no 'name'"),
    ("no base", lambda d: d.pop("base"), "base", "base_config"),
    ("bad base", lambda d: d["base"]["train"].update(lr=-1), "base.train.lr", "greater than 0"),
    ("bad base key", lambda d: d["base"]["train"].update(lrr=1), "base.train.lrr", "unknown key"),
    ("strategy arg", lambda d: d["variants"][0].update(strategies=[{"name": "l2sp", "weight": -2}]),
     "variants[0].strategies[0].weight", "greater than or equal to 0"),
    ("unknown strategy", lambda d: d["variants"][0].update(strategies=[{"name": "nope"}]),
     "variants[0].strategies[0].name", "unknown strategy 'nope'"),
    ("variant train", lambda d: d["variants"][0].update(train={"lr": 0}), "variants[0].train.lr", "greater than 0"),
    ("variant model", lambda d: d["variants"][0].update(model={"train_towers": ["ear"]}), "variants[0].model.train_towers[0]", "image"),
    ("variant set", lambda d: d["variants"][0].update(set=["train.batch_size=0"]), "variants[0].train.batch_size", "greater than 0"),
    ("malformed set", lambda d: d["variants"][0].update(set=["eval.batch_size=4", "nodot"]), "variants[0].set[1]", "key.path=value"),
    ("grid value", lambda d: d["variants"][1].update(grid={"strategies.0.weight": [1, -1]}),
     "variants[1].strategies[0].weight", "variant 'l2sp[weight=-1]'"),
    ("grid path", lambda d: d["variants"][1].update(grid={"strategies.3.weight": [1]}), "variants[1].grid", "no list item '3'"),
    ("duplicate names", lambda d: d["variants"].append({"name": "naive"}), "variants[2].name", "appears twice"),
    ("bad name", lambda d: d["variants"][0].update(name="a/b"), "variants[0].name", "plain folder name"),
]


@pytest.mark.parametrize("label,change,path,words", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_schema_errors_name_the_key_path(stream_root, tmp_path, label, change, path, words):
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as info:
        run_comparison(_bad(stream_root, change), out, log=lambda line: None)
    err = info.value
    assert err.path == path, str(err)
    assert words in err.problem, str(err)
    assert "\n" not in str(err)
    assert not out.exists()  # every config is validated before anything is written


def test_base_config_file_and_overrides(stream_root, tmp_path):
    (tmp_path / "sub").mkdir()
    run_file = make_base(stream_root)
    run_file["strategies"] = [{"name": "l2sp", "weight": 3.0}]
    (tmp_path / "sub" / "run.yaml").write_text(yaml.safe_dump(run_file))
    text = yaml.safe_dump({
        "base_config": "sub/run.yaml",
        "base": {"train": {"lr": 0.01}},
        "output_dir": str(tmp_path / "results"),
        "variants": [{"name": "from_base"}, {"name": "naive", "strategies": [{"name": "naive"}], "train": {"batch_size": 4}}],
    })
    path = tmp_path / "my_comparison.yaml"
    path.write_text(text)
    plan = plan_comparison(path, overrides=["seeds=[3, 4]", "variants.1.train.iterations=7"])
    assert plan.name == "my_comparison"  # the file's stem
    assert plan.out_dir == tmp_path / "results" / "my_comparison"
    assert [v.name for v in plan.variants] == ["from_base", "naive"]
    first, second = plan.variants[0].runs, plan.variants[1].runs
    assert [r.seed for r in first] == [3, 4] and [r.config.run.seed for r in first] == [3, 4]
    cfg = first[0].config
    assert cfg.strategies[0].name == "l2sp" and cfg.strategies[0].args == {"weight": 3.0}
    assert cfg.train.lr == 0.01 and cfg.train.iterations == 2 and cfg.train.batch_size == 8
    assert cfg.logging.wandb.group == "my_comparison"
    cfg2 = second[1].config
    assert cfg2.strategies[0].name == "naive" and cfg2.train.batch_size == 4 and cfg2.train.iterations == 7
    assert cfg2.train.lr == 0.01
    assert second[1].out_dir == plan.out_dir / "variants" / "naive" / "seed4"

    path.write_text(text.replace("sub/run.yaml", "sub/missing.yaml"))
    with pytest.raises(ConfigError) as info:
        plan_comparison(path)
    assert info.value.path == "base_config" and "missing.yaml does not exist" in info.value.problem


def test_grid_expansion_builds_one_variant_per_value(stream_root):
    data = comparison(stream_root, seeds=[5])
    data["variants"] = [
        {"name": "ldifs", "strategies": [{"name": "ldifs", "layers": "embed"}], "grid": {"strategies.0.weight": [0.1, 1, 10]}},
        {"name": "l2sp", "strategies": [{"name": "l2sp"}], "set": ["train.iterations=3"],
         "grid": {"strategies.0.weight": [0.5, 2.0], "train.lr": [1e-3, 0.01]}},
    ]
    plan = plan_comparison(data, "OUT")
    names = [v.name for v in plan.variants]
    assert names == [
        "ldifs[weight=0.1]", "ldifs[weight=1]", "ldifs[weight=10]",
        "l2sp[weight=0.5,lr=0.001]", "l2sp[weight=0.5,lr=0.01]", "l2sp[weight=2.0,lr=0.001]", "l2sp[weight=2.0,lr=0.01]",
    ]
    weights = [v.runs[0].config.strategies[0].args["weight"] for v in plan.variants]
    assert weights == [0.1, 1, 10, 0.5, 0.5, 2.0, 2.0]
    assert [v.runs[0].config.strategies[0].args["layers"] for v in plan.variants[:3]] == ["embed"] * 3
    assert [v.runs[0].config.train.lr for v in plan.variants[3:]] == [1e-3, 0.01, 1e-3, 0.01]
    assert all(v.runs[0].config.train.iterations == 3 for v in plan.variants[3:])
    assert plan.variants[4].grid == {"strategies.0.weight": 0.5, "train.lr": 0.01}
    assert plan.variants[4].spec_name == "l2sp"
    run = plan.variants[0].runs[0]
    assert run.seed == 5 and run.config.run.seed == 5
    assert run.out_dir == Path("OUT") / "variants" / "ldifs[weight=0.1]" / "seed5"
    assert len(plan.runs) == 7


# ------------------------------------------------------------------- real runs
def _recompute(out: Path) -> dict[str, dict[str, list]]:
    """Per variant folder: every table key -> per-seed values read from the run folders."""
    found: dict[str, dict[str, list]] = {}
    for variant_dir in sorted((out / "variants").iterdir()):
        values: dict[str, list] = {key: [] for key, _, _ in METRIC_COLUMNS}
        for seed in SEEDS:
            results = RunResults.load(variant_dir / f"seed{seed}")
            assert results.complete and results.meta["seed"] == seed
            summary = results.summary()
            ledger = results.meta.get("ledger", {})
            for key in values:
                value = results.meta[key] if key in results.meta else ledger[key] if key in ledger else summary[key]
                values[key].append(value)
        found[variant_dir.name] = values
    return found


def test_runs_land_in_variant_seed_folders(finished):
    result, out, lines = finished
    assert result.started == ALL_RUNS and result.skipped == []
    assert sorted(p.name for p in (out / "variants").iterdir()) == ["l2sp[weight=0.1]", "l2sp[weight=10]", "naive"]
    for variant, seed in ALL_RUNS:
        saved = yaml.safe_load((out / "variants" / variant / f"seed{seed}" / "config.yaml").read_text())
        assert saved["run"]["seed"] == seed
        assert saved["logging"]["wandb"]["group"] == "tiny_cmp"
    weights = {v: yaml.safe_load((out / "variants" / v / "seed0" / "config.yaml").read_text())["strategies"][0].get("weight")
               for v in ("l2sp[weight=0.1]", "l2sp[weight=10]")}
    assert weights == {"l2sp[weight=0.1]": 0.1, "l2sp[weight=10]": 10}
    assert sum("starting" in line for line in lines) == 6
    # Same seed, same stream and data order: the zero-shot rows of all variants agree.
    zero = {v: RunResults.load(out / "variants" / v / "seed1").rows[0] for v, _ in ALL_RUNS}
    assert all(row == zero["naive"] for row in zero.values())


def test_table_equals_mean_and_std_of_the_runs(finished):
    result, out, _ = finished
    with open(out / "comparison.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == csv_columns()
    assert [r["variant"] for r in rows] == ["naive", "l2sp[weight=0.1]", "l2sp[weight=10]"]
    recomputed = _recompute(out)
    checked = 0
    for row in rows:
        assert row["seeds"] == "0;1" and row["n_seeds"] == "2"
        per_seed = recomputed[row["variant"]]
        for key, _, _ in METRIC_COLUMNS:
            values = [v for v in per_seed[key] if v is not None]
            if not values:
                assert row[f"{key}_mean"] == "" and row[f"{key}_std"] == ""
                continue
            assert float(row[f"{key}_mean"]) == pytest.approx(np.mean(values), abs=1e-9)
            assert float(row[f"{key}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-9)
            checked += 1
    assert checked >= 3 * 12  # all metrics but possibly undefined ones are defined here
    # The control set exists, so stability is control retention at row T.
    naive = recomputed["naive"]
    assert naive["stability"] == naive["control_retention"]
    # Markdown cells are the same numbers rounded.
    md = (out / "comparison.md").read_text()
    assert md == result.markdown
    last = recomputed["l2sp[weight=10]"]["last"]
    cell = f"{np.mean(last):.1f} ± {np.std(last, ddof=1):.1f}"
    line = next(l for l in md.splitlines() if l.startswith("| l2sp[weight=10]"))
    assert line.split(" | ")[4] == cell
    # Pareto flags agree with the (plasticity, stability) means.
    pts = [(float(r["plasticity_mean"]), float(r["stability_mean"])) for r in rows]
    assert [r["pareto_front"] == "true" for r in rows] == pareto_front(pts)
    assert any(r["pareto_front"] == "true" for r in rows)


def test_output_files_are_valid(finished):
    result, out, _ = finished
    for name in ("frontier.png", "curves.png"):
        with Image.open(out / name) as image:
            image.load()
            assert image.format == "PNG" and image.width > 300 and image.height > 200
    assert result.files["frontier"] == out / "frontier.png"
    md = (out / "comparison.md").read_text()
    assert md.startswith("# Comparison: tiny_cmp")
    table = [l for l in md.splitlines() if l.startswith("|")]
    assert len(table) == 2 + 3
    assert all(len(l.strip("|").split("|")) == 2 + len(METRIC_COLUMNS) for l in table)
    assert not [p for p in out.rglob("*.tmp")]  # atomic writes leave no temporary files
    curves = result.row("naive").curves
    assert len(curves["control"]) == 4 and len(curves["seen_accuracy"]) == 4 and curves["seen_accuracy"][0] is None
    controls = [RunResults.load(out / "variants" / "naive" / f"seed{s}").control for s in SEEDS]
    assert curves["control"] == pytest.approx(np.mean(controls, axis=0).tolist())


def test_rerun_skips_finished_runs(finished, stream_root, tmp_path):
    out = copy_out(finished, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    lines: list[str] = []
    again = run_comparison(comparison(stream_root), out, log=lines.append)
    assert again.started == [] and again.skipped == ALL_RUNS
    assert sum("skipped" in line for line in lines) == 6 and not any("starting" in line for line in lines)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == before
    assert (out / "comparison.csv").read_text() == (finished[1] / "comparison.csv").read_text()


def test_partial_run_resumes_and_matches_the_uninterrupted_run(finished, stream_root, tmp_path):
    out = copy_out(finished, tmp_path)
    run_dir = out / "variants" / "l2sp[weight=10]" / "seed1"
    full = RunResults.load(run_dir)
    # Leave the folder as a run killed after experience 1: the checkpoint of experience 1
    # (which holds the results of that moment) and a metrics.json with rows 0-1 only.
    state = torch.load(run_dir / "checkpoints" / "exp_001.pt", map_location="cpu", weights_only=True)
    partial = RunResults.from_dict(state["results"])
    assert len(partial.rows) == 2 and not partial.complete
    partial.save(run_dir)
    for name in ("exp_002.pt", "exp_003.pt"):
        (run_dir / "checkpoints" / name).unlink()

    lines: list[str] = []
    result = run_comparison(comparison(stream_root), out, log=lines.append)
    assert result.started == [("l2sp[weight=10]", 1)]
    assert [o.status for o in result.outcomes].count("resumed") == 1
    assert any("l2sp[weight=10] seed 1: resuming" in line for line in lines)
    resumed = RunResults.load(run_dir)
    assert resumed.complete
    np.testing.assert_allclose(resumed.matrix(), full.matrix(), atol=1e-9)
    np.testing.assert_allclose(resumed.control, full.control, atol=1e-9)
    row = next(r for r in csv.DictReader(open(out / "comparison.csv")) if r["variant"] == "l2sp[weight=10]")
    last = [RunResults.load(run_dir.parent / f"seed{s}").summary()["last"] for s in SEEDS]
    assert float(row["last_mean"]) == pytest.approx(np.mean(last))


def test_changed_config_in_a_used_folder_is_an_error(finished, stream_root, tmp_path):
    out = copy_out(finished, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    with pytest.raises(UserError, match=r"different config \(differs at train\.lr\)"):
        run_comparison(comparison(stream_root), out, overrides=["base.train.lr=0.5"], log=lambda line: None)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == before


def test_cli_compare(finished, stream_root, tmp_path, capsys):
    out = copy_out(finished, tmp_path)
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(comparison(stream_root)))
    assert main(["compare", str(path), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| Variant | Seeds | Transfer |" in stdout and "| l2sp[weight=0.1] " in stdout

    assert main(["compare", str(path), "--out", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert "ok: 6 runs" in capsys.readouterr().out and not (tmp_path / "dry").exists()

    bad = comparison(stream_root)
    bad["variants"][1]["grid"] = {"strategies.0.weight": ["heavy"]}
    path.write_text(yaml.safe_dump(bad))
    assert main(["compare", str(path), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: variants[1].strategies[0].weight:") and "\n" not in err


def test_diverged_variant_is_reported_and_left_out(stream_root, tmp_path, capsys):
    data = comparison(stream_root, seeds=[0])
    data["variants"] = [{"name": "naive"}, {"name": "boom", "train": {"lr": 1e30}}]
    data["base"]["strategies"] = [{"name": "naive"}]
    path = tmp_path / "boom.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["compare", str(path), "--out", str(tmp_path / "out")]) == 3
    captured = capsys.readouterr()
    assert "boom seed 0: diverged" in captured.err
    rows = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "out" / "comparison.csv"))}
    assert rows["boom"]["n_seeds"] == "0" and rows["boom"]["diverged_seeds"] == "0" and rows["boom"]["last_mean"] == ""
    assert rows["naive"]["n_seeds"] == "1" and rows["naive"]["last_std"] == ""  # one seed: no std
    assert "| boom | 0 (1 diverged) |" in captured.out


# ------------------------------------------------------------------------- W&B
def _leet(*args: str) -> dict:
    wandb = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb), "leet", "inspect", *args], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_wandb_offline_runs_and_summary(stream_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    data = comparison(stream_root, seeds=[0])
    data["base"]["logging"]["wandb"] = {"mode": "offline", "project": "cl-test"}
    data["variants"] = data["variants"][:1]
    out = tmp_path / "out"
    run_comparison(data, out, log=lambda line: None)

    run_local = list((out / "variants" / "naive" / "seed0" / "wandb").glob("offline-run-*"))
    summary_local = list((out / "wandb").glob("offline-run-*"))
    assert len(run_local) == 1 and len(summary_local) == 1
    info = _leet("--summary", "--json", str(summary_local[0]))
    assert info["name"] == "tiny_cmp-summary" and info["state"] == "finished"
    assert info["summary"]["comparison"]["_type"] == "table-file" and info["summary"]["comparison"]["nrows"] == 1
    assert info["summary"]["frontier"]["_type"] == "image-file"
    assert info["summary"]["curves"]["_type"] == "image-file"
    table = json.loads((summary_local[0] / "files" / info["summary"]["comparison"]["path"]).read_text())
    assert table["columns"] == csv_columns() and table["data"][0][0] == "naive"
    run_info = _leet("--summary", "--json", str(run_local[0]))
    assert run_info["name"] == "naive-seed0"
    assert run_info["summary"]["last"] == pytest.approx(RunResults.load(out / "variants" / "naive" / "seed0").summary()["last"])


def test_only_keeps_the_named_variants_and_rejects_unknown(tmp_path, capsys):
    from cl_proxyfda.cli import main
    from cl_proxyfda.compare import plan_comparison
    from cl_proxyfda.errors import ConfigError

    data = {
        "name": "onlytest",
        "base": {"model": {"name": "cl-test-tiny"}, "stream": {"name": "image_folder", "root": str(tmp_path)}},
        "variants": [{"name": "naive"}, {"name": "l2sp", "strategies": [{"name": "l2sp"}], "grid": {"strategies.0.weight": [0.1, 1.0]}}],
    }
    plan = plan_comparison(data, tmp_path / "out", only=["l2sp"])
    assert [v.name for v in plan.variants] == ["l2sp[weight=0.1]", "l2sp[weight=1.0]"]
    plan = plan_comparison(data, tmp_path / "out", only=["naive", "l2sp[weight=1.0]"])
    assert [v.name for v in plan.variants] == ["naive", "l2sp[weight=1.0]"]
    with pytest.raises(ConfigError, match="unknown variant"):
        plan_comparison(data, tmp_path / "out", only=["ewc"])


def test_report_only_trains_nothing(tmp_path):
    from cl_proxyfda.compare import run_comparison

    data = {
        "name": "reportonly",
        "base": {"model": {"name": "cl-test-tiny"}, "stream": {"name": "image_folder", "root": str(tmp_path)}},
        "variants": [{"name": "naive"}],
    }
    result = run_comparison(data, tmp_path / "out", report_only=True, log=lambda line: None)
    assert [o.status for o in result.outcomes] == ["missing"]
    assert not (tmp_path / "out" / "variants").exists()
    assert "| naive | 0 |" in result.markdown
