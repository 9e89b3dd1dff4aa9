"""RunResults (filling row by row, JSON/CSV round trip, errors, table, report) and
the PNG plots of complete, partial and empty runs."""
from __future__ import annotations

import csv
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from cl_proxyfda import plots
from cl_proxyfda.errors import UserError
from cl_proxyfda.results import METRICS_FILE, RunResults, report

TASKS = ["aircraft", "caltech", "cifar"]
ROWS = [[10.0, 20.0, 30.0], [60.0, 25.0, 31.0], [50.0, 70.0, 32.0], [40.0, 60.0, 80.0]]
CONTROL = [50.0, 48.0, 47.0, 45.0]


def filled(n_rows: int = 4, extra: bool = True) -> RunResults:
    r = RunResults(TASKS, meta={"run_name": "hand", "seed": 0, "strategies": ["naive"]})
    for i in range(n_rows):
        r.add_row(
            ROWS[i],
            control=CONTROL[i],
            diagnostics={"feature_distance": 0.5 * i, "wall_s": 1.0 + i},
            extra={"retrieval_map": [v / 2 for v in ROWS[i]]} if extra else None,
        )
    return r


def test_add_row_list_or_dict_and_summary():
    r = RunResults(TASKS)
    assert r.add_row(ROWS[0], control=CONTROL[0]) == 0
    assert r.add_row(dict(zip(reversed(TASKS), reversed(ROWS[1]))), control=CONTROL[1]) == 1
    assert r.rows[1] == ROWS[1]  # dict reordered by task names
    assert r.matrix().shape == (2, 3)
    assert not r.complete and r.experiences_done == 1
    for i in (2, 3):
        r.add_row(ROWS[i], control=CONTROL[i])
    assert r.complete
    s = r.summary()
    # Hand values (see test_metrics): Transfer 28.25, Last 60, BWT -15, control drop 5.
    assert s["transfer"] == pytest.approx(28.25)
    assert s["last"] == pytest.approx(60.0)
    assert s["bwt"] == pytest.approx(-15.0)
    assert s["control_drop"] == pytest.approx(5.0)
    assert r.diagnostics == [{}, {}, {}, {}]


def test_extra_matrix_summary():
    s = filled().summary()
    # retrieval map = accuracy / 2, so every metric halves: Last 30, Transfer 14.125.
    assert s["extra"]["retrieval_map"]["last"] == pytest.approx(30.0)
    assert s["extra"]["retrieval_map"]["transfer"] == pytest.approx(14.125)


def test_add_row_rejects_inconsistent_input():
    r = RunResults(TASKS)
    with pytest.raises(ValueError, match="expected 3"):
        r.add_row([1.0, 2.0])
    with pytest.raises(ValueError, match="unknown tasks"):
        r.add_row({"aircraft": 1.0, "caltech": 2.0, "cifar": 3.0, "dtd": 4.0})
    r.add_row(ROWS[0], control=50.0)
    with pytest.raises(ValueError, match="control"):
        r.add_row(ROWS[1])  # control given at row 0 but not at row 1
    r.add_row(ROWS[1], control=49.0)
    with pytest.raises(ValueError, match="extra"):
        r.add_row(ROWS[2], control=48.0, extra={"retrieval_map": [1.0, 2.0, 3.0]})
    r.add_row(ROWS[2], control=48.0)
    r.add_row(ROWS[3], control=47.0)
    with pytest.raises(ValueError, match="all 4 rows"):
        r.add_row(ROWS[3], control=47.0)
    with pytest.raises(ValueError, match="unique"):
        RunResults(["a", "a"])


def test_save_load_round_trip(tmp_path):
    r = filled()
    r.rows[2][0] = float("nan")  # a missing evaluation survives as null
    written = r.save(tmp_path)
    names = {p.name for p in written}
    assert {"metrics.json", "accuracy_matrix.csv", "retrieval_map_matrix.csv", "summary.txt"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    data = json.loads((tmp_path / METRICS_FILE).read_text(), parse_constant=no_nan)
    assert data["rows"][2][0] is None
    assert data["summary"]["last"] == pytest.approx(60.0)
    assert data["meta"]["strategies"] == ["naive"]
    assert data["diagnostics"][3] == {"feature_distance": 1.5, "wall_s": 4.0}

    back = RunResults.load(tmp_path)
    assert back.task_names == TASKS
    assert math.isnan(back.rows[2][0])
    assert back.rows[3] == ROWS[3] and back.rows[1] == ROWS[1]
    assert back.control == CONTROL
    assert back.diagnostics == r.diagnostics
    assert back.extra_matrices == r.extra_matrices
    assert back.meta == r.meta
    assert back.summary()["last"] == pytest.approx(60.0)
    # Loading the file path itself works too.
    assert RunResults.load(tmp_path / METRICS_FILE).rows[3] == ROWS[3]


def test_csv_layout(tmp_path):
    filled().save(tmp_path)
    with open(tmp_path / "accuracy_matrix.csv", newline="") as handle:
        lines = list(csv.reader(handle))
    assert lines[0] == ["row", *TASKS, "control"]
    assert len(lines) == 5
    assert [float(v) for v in lines[3][1:]] == ROWS[2] + [CONTROL[2]]
    assert lines[4][0] == "3"
    with open(tmp_path / "retrieval_map_matrix.csv", newline="") as handle:
        extra = list(csv.reader(handle))
    assert extra[0] == ["row", *TASKS]  # no control column for extra matrices
    assert [float(v) for v in extra[4][1:]] == [20.0, 30.0, 40.0]


def test_csv_without_control_keeps_an_empty_control_column(tmp_path):
    r = RunResults(TASKS)
    r.add_row(ROWS[0])
    r.save(tmp_path)
    lines = (tmp_path / "accuracy_matrix.csv").read_text().splitlines()
    assert lines == ["row,aircraft,caltech,cifar,control", "0,10.0,20.0,30.0,"]


def test_partial_run_saves_and_reloads(tmp_path):
    r = filled(n_rows=2, extra=False)
    r.save(tmp_path)
    back = RunResults.load(tmp_path)
    assert back.experiences_done == 1 and not back.complete
    s = json.loads((tmp_path / METRICS_FILE).read_text())["summary"]
    assert s["complete"] is False
    assert s["forgetting_avalanche"] is None


def test_save_replaces_files_atomically(tmp_path):
    r = filled(n_rows=2)
    r.save(tmp_path)
    inode = os.stat(tmp_path / METRICS_FILE).st_ino
    r.add_row(ROWS[2], control=CONTROL[2], extra={"retrieval_map": ROWS[2]})
    r.save(tmp_path)
    # A new file was renamed over the old one (not rewritten in place).
    assert os.stat(tmp_path / METRICS_FILE).st_ino != inode
    assert RunResults.load(tmp_path).experiences_done == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nothing_here"
    with pytest.raises(UserError, match="nothing_here/metrics.json"):
        RunResults.load(missing)

    (tmp_path / METRICS_FILE).write_text("{not json")
    with pytest.raises(UserError, match=r"metrics\.json: not valid JSON"):
        RunResults.load(tmp_path)

    (tmp_path / METRICS_FILE).write_text(json.dumps({"rows": []}))
    with pytest.raises(UserError, match="task_names"):
        RunResults.load(tmp_path)

    bad_shape = {"task_names": TASKS, "rows": [[1.0, 2.0]], "control": []}
    (tmp_path / METRICS_FILE).write_text(json.dumps(bad_shape))
    with pytest.raises(UserError, match=r"metrics\.json: malformed results \(row 0 has 2 values"):
        RunResults.load(tmp_path)

    bad_value = {"task_names": TASKS, "rows": [[1.0, "x", 3.0]]}
    (tmp_path / METRICS_FILE).write_text(json.dumps(bad_value))
    with pytest.raises(UserError, match="malformed"):
        RunResults.load(tmp_path)


def test_format_table():
    text = filled().format_table()
    lines = text.splitlines()
    assert lines[0] == "hand: 3/3 experiences"
    header = next(line for line in lines if line.startswith("after"))
    assert header.split() == ["after", *TASKS, "control"]
    row3 = next(line for line in lines if line.startswith("3 cifar"))
    assert row3.split()[2:] == ["40.0", "60.0", "80.0", "45.0"]
    metrics_lines = {line.split("  ")[0].strip(): line for line in lines}
    assert metrics_lines["Last"].split()[-1] == "60.0"
    assert metrics_lines["BWT"].split()[-1] == "-15.0"
    assert "[20.0, 10.0]" in metrics_lines["Forgetting (Avalanche)"]
    assert metrics_lines["Plasticity"].split()[-1] == "70.0"
    assert "45.0" in metrics_lines["Control retention"] and "drop 5.0" in text
    assert "retrieval_map" in text

    partial = filled(n_rows=1, extra=False).format_table()
    assert partial.splitlines()[0] == "hand: 0/3 experiences (incomplete)"
    assert "Transfer" in partial
    assert RunResults(TASKS).format_table().endswith("no evaluation rows yet")


def test_report_rerenders_table_and_plots(tmp_path):
    r = filled()
    r.save(tmp_path)
    (tmp_path / "summary.txt").unlink()
    table, written = report(tmp_path)
    assert table == r.format_table()
    assert (tmp_path / "summary.txt").read_text() == table + "\n"
    names = {p.name for p in written}
    assert {"summary.txt", "accuracy_matrix.png", "stability_plasticity.png",
            "retrieval_map_matrix.png"} <= names
    for p in written:
        assert p.stat().st_size > 0

    with pytest.raises(UserError, match="not a directory"):
        report(tmp_path / "missing")


# -- plots ----------------------------------------------------------------------------

MTIL = ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food",
        "MNIST", "OxfordPet", "StanfordCars", "SUN397"]


def plot_results(n_rows: int, control: bool = True, extra: bool = False) -> RunResults:
    r = RunResults(TASKS, meta={"run_name": "plots"})
    for i in range(n_rows):
        r.add_row(ROWS[i], control=CONTROL[i] if control else None,
                  extra={"retrieval_map": ROWS[i]} if extra else None)
    return r


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def check_png(path: Path) -> None:
    assert path.is_file()
    width, height = png_size(path)
    assert 300 <= width <= 3000 and 200 <= height <= 3000, (width, height)
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width)
    assert float(np.std(pixels[..., :3])) > 0.05  # not a blank canvas


def test_render_all_complete_run(tmp_path):
    written = plots.render_all(plot_results(4, extra=True), tmp_path)
    assert [p.name for p in written] == [
        "accuracy_matrix.png", "stability_plasticity.png", "retrieval_map_matrix.png"]
    for path in written:
        check_png(path)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("n_rows", [0, 1, 2])
def test_partial_runs_render(tmp_path, n_rows):
    written = plots.render_all(plot_results(n_rows), tmp_path)
    assert len(written) == 2
    for path in written:
        check_png(path)


def test_run_without_control_set(tmp_path):
    check_png(plots.plot_accuracy_matrix(plot_results(4, control=False), tmp_path / "m.png"))
    check_png(plots.plot_stability_plasticity(plot_results(1, control=False), tmp_path / "s.png"))


def test_control_column_widens_the_heatmap(tmp_path):
    with_control = plots.plot_accuracy_matrix(plot_results(4), tmp_path / "a.png")
    without = plots.plot_accuracy_matrix(plot_results(4, control=False), tmp_path / "b.png")
    assert png_size(with_control)[0] > png_size(without)[0]


def test_eleven_tasks_stay_a_sensible_size(tmp_path):
    rng = np.random.default_rng(0)
    r = RunResults(MTIL)
    for _ in range(len(MTIL) + 1):
        r.add_row(rng.uniform(0, 100, len(MTIL)).tolist(), control=rng.uniform(40, 60))
    for path in plots.render_all(r, tmp_path):
        check_png(path)


@pytest.mark.parametrize("module,other", [("plots", "results"), ("results", "plots")])
def test_results_and_plots_import_without_each_other(module, other):
    code = f"import sys, cl_proxyfda.{module}; print('cl_proxyfda.{other}' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False"
