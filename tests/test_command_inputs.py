"""Bad input to the other commands (compare, base-to-new, pretrain-demo, report) and to
the YAML reader: one ``error:`` line, exit code 2, nothing written, no hang."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from cl_proxyfda.cli import main
from cl_proxyfda.yaml_files import read_yaml
from cl_proxyfda.errors import ConfigError
from cl_proxyfda.results import RunResults
from conftest import tiny_config


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------- YAML
def test_duplicate_keys_are_refused_with_their_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: cl-test-tiny}\ntrain:\n  lr: 1.0e-4\n  iterations: 2\n  lr: 1.0e3\n")
    with pytest.raises(ConfigError, match=rf"^config file {path}: duplicate key 'lr' at line 5$"):
        read_yaml(path)


def test_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("defaults: &d {lr: 1.0e-4, iterations: 2}\ntrain:\n  <<: *d\n  lr: 3.0e-4\n")
    assert read_yaml(path)["train"] == {"lr": 3.0e-4, "iterations": 2}


def _alias_bomb(levels: int = 9) -> str:
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text,words",
    [
        (_alias_bomb(), "aliases expand it to more than 100,000 values"),
        ("name: loop\nvariants: &v [{name: a, grid: {x: *v}}]\n", "an alias refers to the mapping or list that contains it"),
    ],
    ids=["billion-laughs", "self-reference"],
)
def test_compare_file_with_exploding_or_recursive_aliases(tmp_path, capsys, text, words):
    path = tmp_path / "cmp.yaml"
    path.write_text(text)
    assert len(text) < 1200
    t0 = time.time()
    assert main(["compare", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 2
    assert time.time() - t0 < 5
    assert words in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_validator_quotes_the_value_once(tmp_path, data_root, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(data_root, tmp_path / "runs", run={"name": ""})))
    assert main(["validate", str(path)]) == 2
    line = _one_error_line(capsys)
    assert line == "error: run.name: must be a plain folder name (got '')"


def test_error_lines_stay_one_line_whatever_they_quote(tmp_path, data_root, capsys):
    odd = tmp_path / "a\nb\udcff"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(odd, tmp_path / "runs")), encoding="utf-8")
    assert main(["validate", str(path)]) == 2
    line = _one_error_line(capsys)
    assert "a\\nb\\udcff" in line


# ----------------------------------------------------------------- commands
def test_base_to_new_with_zero_shots(tmp_path, capsys):
    assert main(["base-to-new", "--shots", "0", "--out", str(tmp_path / "b2n")]) == 2
    assert _one_error_line(capsys) == "error: base-to-new shots: Input should be greater than or equal to 1 (got 0)"
    assert not (tmp_path / "b2n").exists()


@pytest.mark.parametrize("steps", ["-5", "-1"])
def test_pretrain_demo_with_negative_steps(tmp_path, capsys, steps):
    out = tmp_path / "w" / "demo.safetensors"
    assert main(["pretrain-demo", "--steps", steps, "--out", str(out)]) == 2
    assert f"steps: must be a positive integer (got {steps})" in _one_error_line(capsys)
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------- report
@pytest.fixture
def run_dir(tmp_path) -> Path:
    results = RunResults(task_names=["a", "b"])
    results.add_row([50.0, 40.0])
    results.add_row([80.0, 45.0])
    folder = tmp_path / "run"
    results.save(folder)
    return folder


def test_report_on_deeply_nested_json(run_dir, capsys):
    (run_dir / "metrics.json").write_text('{"task_names": ["a"], "meta": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert main(["report", str(run_dir)]) == 2
    assert "metrics.json" in _one_error_line(capsys)


@pytest.mark.parametrize("name", ["summary.txt", "accuracy_matrix.png"])
def test_report_when_an_output_is_a_folder(run_dir, capsys, name):
    if (run_dir / name).exists():
        (run_dir / name).unlink()
    (run_dir / name).mkdir()
    before = sorted(p.name for p in run_dir.iterdir())
    assert main(["report", str(run_dir)]) == 2
    assert f"{name}: exists and is not a regular file" in _one_error_line(capsys)
    assert sorted(p.name for p in run_dir.iterdir()) == before


@pytest.mark.parametrize(
    "data,words",
    [
        ({"task_names": ["a"], "rows": [["x"]]}, "malformed results"),
        ({"task_names": ["a"], "rows": [[1.0]], "meta": "not a mapping"}, "malformed results"),
        ({"task_names": ["a"], "rows": [[1.0]], "diagnostics": [[1]]}, "malformed results"),
        ({"task_names": "ab"}, "no 'task_names' list"),
    ],
)
def test_report_on_malformed_metrics(run_dir, capsys, data, words):
    (run_dir / "metrics.json").write_text(json.dumps(data))
    assert main(["report", str(run_dir)]) == 2
    assert words in _one_error_line(capsys)


def test_report_with_thousands_of_tasks(tmp_path, capsys):
    n = 3000
    results = RunResults(task_names=[f"t{i}" for i in range(n)])
    results.add_row([50.0] * n)
    results.add_row([60.0] + [50.0] * (n - 1))
    results.save(tmp_path)
    t0 = time.time()
    assert main(["report", str(tmp_path)]) == 0
    assert time.time() - t0 < 60
    out = capsys.readouterr().out
    assert "too wide to show (see accuracy_matrix.csv)" in out and "Avg" in out
    assert len(out) < 200_000
    assert (tmp_path / "stability_plasticity.png").is_file() and not (tmp_path / "accuracy_matrix.png").exists()
