"""The published-results ledger: the metric code against ZSCL's published 11 x 11 MTIL
matrices, the run files of configs/reproduce/, and ``report --published``."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from cl_proxyfda import metrics
from cl_proxyfda.cli import main
from cl_proxyfda.config import load_config
from cl_proxyfda.published import NOT_FOUND, PUBLISHED, format_comparison, match_config, published, zero_shot_entry
from cl_proxyfda.results import SUMMARY_TXT, RunResults

ROOT = Path(__file__).resolve().parents[1]
REPRODUCE = sorted((ROOT / "configs" / "reproduce").glob("*.yaml"))
FIXTURE = json.loads((Path(__file__).parent / "data" / "zscl_mtil_matrices.json").read_text())["matrices"]
BY_FILE = {m["file"]: m for m in FIXTURE.values()}
# Published zero-shot accuracies (ViT-B/16), order I; order II is the same datasets reordered.
ZERO_SHOT_I = dict(zip(
    ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet", "StanfordCars", "SUN397"],
    [24.3, 88.4, 68.2, 44.6, 54.9, 71.0, 88.5, 59.4, 89.0, 64.7, 65.2],
))


def with_zero_shot_row(matrix: dict) -> list[list[float]]:
    """Row 0 (the published zero-shot accuracies in the matrix's task order) + the 11 published rows."""
    return [[ZERO_SHOT_I[t] for t in matrix["tasks"]]] + matrix["rows"]


# ------------------------------------------------------------ published matrices
@pytest.mark.parametrize("entry", [p for p in PUBLISHED if p.matrix], ids=lambda p: p.key)
def test_published_matrix_gives_the_published_metrics(entry):
    matrix = BY_FILE[entry.matrix]
    assert matrix["order"] == entry.order and matrix["method"] == entry.method
    a = np.asarray(matrix["rows"])
    assert a.shape == (11, 11)
    s = metrics.summarize(with_zero_shot_row(matrix))
    # The tables print one decimal: agreement within rounding (half a unit of 0.1).
    for key in ("transfer", "avg", "last"):
        assert abs(s[key] - getattr(entry, key)) <= 0.05 + 1e-9, (key, s[key], getattr(entry, key))
    # The diagonal is the accuracy right after learning each task, and it is high (>= 60 %)
    # everywhere except Aircraft: the matrix is in training order, not alphabetical.
    assert np.diag(a)[[i for i, t in enumerate(matrix["tasks"]) if t != "Aircraft"]].min() > 60


def test_every_shipped_matrix_is_used_and_metrics_are_not_all_alike():
    assert {p.matrix for p in PUBLISHED if p.matrix} == set(BY_FILE)
    assert len(BY_FILE) == 14
    lasts = {round(metrics.summarize(with_zero_shot_row(m))["last"], 1) for m in FIXTURE.values()}
    assert len(lasts) >= 12  # 14 different methods/orders, not one matrix copied


@pytest.mark.parametrize("order", ["I", "II"])
def test_zero_shot_rows_reproduce_the_published_zero_shot(order):
    entry = zero_shot_entry(order)
    tasks = next(m["tasks"] for m in FIXTURE.values() if m["order"] == order)
    row = [ZERO_SHOT_I[t] for t in tasks]
    s = metrics.summarize([row] * 12)
    for key in ("transfer", "avg", "last"):
        assert abs(s[key] - getattr(entry, key)) <= 0.05 + 1e-9, (key, s[key])
    # Transfer depends on the order (column 1 is excluded): 69.39 in order I; in order II
    # (718.2 - 64.7) / 10 = 65.35 exactly, a rounding tie printed as 65.4.
    assert s["transfer"] == pytest.approx({"I": 69.39, "II": 65.35}[order])
    assert entry.transfer == {"I": 69.4, "II": 65.4}[order]


# ------------------------------------------------------------ ledger and run files
def test_ledger_keys_unique_and_values_sane():
    keys = [p.key for p in PUBLISHED]
    assert len(keys) == len(set(keys))
    for p in PUBLISHED:
        assert 0 < p.transfer < 100 and 0 < p.avg < 100 and 0 < p.last < 100
        assert p.source and p.order in ("I", "II")
        assert (p.run_file is None) or p.strategies
    assert published("mtil-I/gift").strategies == ("gift", "awc")
    assert any("order II" in n for n in NOT_FOUND) and any("few-shot" in n for n in NOT_FOUND)


def test_every_run_file_is_a_ledger_entry_or_listed_as_not_found():
    files = {p.run_file for p in PUBLISHED if p.run_file}
    shipped = {str(p.relative_to(ROOT)) for p in REPRODUCE}
    assert files <= shipped
    for extra in shipped - files:
        assert any(extra in n for n in NOT_FOUND), extra


@pytest.mark.parametrize("path", REPRODUCE, ids=lambda p: p.stem)
def test_reproduce_run_files_parse_and_match_their_entry(path):
    cfg = load_config(path)  # schema + every plugin's params
    assert cfg.model.name == "ViT-B-16" and cfg.model.pretrained == "openai"
    assert cfg.stream.name == "mtil" and cfg.stream.args["root"] == "~/data/mtil"
    t = cfg.train
    assert (t.iterations, t.batch_size, t.lr, t.label_smoothing, t.weight_decay, t.warmup) == (1000, 64, 1e-5, 0.2, 0.0, 100)
    assert t.lr_per_task == {"Aircraft": 5e-5, "MNIST": 5e-5}
    assert set(cfg.model.train_towers) == {"image", "text"} and cfg.model.freeze_logit_scale
    entry = match_config(cfg.to_dict())
    rel = str(path.relative_to(ROOT))
    if entry is None:
        assert any(rel in n for n in NOT_FOUND)
        return
    assert entry.run_file == rel and entry.order == cfg.stream.args["order"]
    # The header comment cites the same numbers as the ledger.
    header = path.read_text().split("\nrun:")[0]
    cited = re.search(r"Transfer / Avg / Last = (\d+\.\d) / (\d+\.\d) / (\d+\.\d)", header)
    assert cited and tuple(map(float, cited.groups())) == (entry.transfer, entry.avg, entry.last)


# ------------------------------------------------------------ report --published
def synthetic_run(folder: Path, run_file: str, shift: float = 1.0, rows: int = 12) -> RunResults:
    """A saved run folder: ZSCL's published order-I matrix + ``shift``, and the resolved config."""
    matrix = FIXTURE["t3_7"]
    full = with_zero_shot_row(matrix)
    results = RunResults(matrix["tasks"], meta={"run_name": "synthetic"})
    for i, row in enumerate(full[:rows]):
        results.add_row([v + (shift if i else 0.0) for v in row])
    results.save(folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(load_config(ROOT / run_file).to_dict(), sort_keys=False))
    return results


def test_report_published_matches_the_run_config_and_prints_differences(tmp_path, capsys):
    synthetic_run(tmp_path, "configs/reproduce/mtil_I_zscl.yaml", shift=1.0)
    assert main(["report", str(tmp_path), "--published"]) == 0
    out = capsys.readouterr().out
    text = out[out.index("Published: mtil-I/zscl"):]
    assert "run file: configs/reproduce/mtil_I_zscl.yaml" in text
    # Every published entry moved by +1: run 69.1 / 76.4 / 84.6 against 68.1 / 75.4 / 83.6.
    assert re.search(r"Transfer\s+69\.1\s+68\.1\s+\+1\.0", text)
    assert re.search(r"Avg\s+76\.4\s+75\.4\s+\+1\.0", text)
    assert re.search(r"Last\s+84\.6\s+83\.6\s+\+1\.0", text)
    # Row 0 holds the published zero-shot accuracies: it reproduces the zero-shot row.
    zero = text[text.index("Zero-shot row"):]
    assert re.search(r"Transfer\s+69\.4\s+69\.4\s+\+0\.0", zero) and re.search(r"Last\s+65\.3\s+65\.3\s+\+0\.0", zero)
    assert "note:" not in text
    assert (tmp_path / SUMMARY_TXT).is_file()


def test_report_published_key_on_another_setting_says_so(tmp_path, capsys):
    synthetic_run(tmp_path, "configs/reproduce/mtil_I_naive.yaml", shift=0.0, rows=6)
    assert main(["report", str(tmp_path), "--published", "mtil-II/naive"]) == 0
    text = capsys.readouterr().out
    assert "Published: mtil-II/naive" in text
    assert "is not the published setting" in text and "not comparable" in text
    assert "incomplete run (5/11 experiences)" in text


def test_report_without_published_prints_no_comparison(tmp_path, capsys):
    synthetic_run(tmp_path, "configs/reproduce/mtil_I_naive.yaml")
    assert main(["report", str(tmp_path)]) == 0
    assert "Published:" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown_key", "error: --published: unknown key 'mtil-III/naive' (known: mtil-I/zero-shot"),
        ("no_match", "no published result for strategies ['naive', 'lwf'] on mtil order I"),
        ("no_config", "no config.yaml to match a published result"),
    ],
)
def test_report_published_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, case, expected):
    synthetic_run(tmp_path, "configs/reproduce/mtil_I_naive.yaml")
    if case == "no_match":
        cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
        cfg["strategies"].append({"name": "lwf"})
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    if case == "no_config":
        (tmp_path / "config.yaml").unlink()
    (tmp_path / SUMMARY_TXT).unlink()
    argv = ["report", str(tmp_path), "--published"] + (["mtil-III/naive"] if case == "unknown_key" else [])
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and expected in captured.err
    assert not (tmp_path / SUMMARY_TXT).exists()


def test_format_comparison_before_any_row():
    results = RunResults(FIXTURE["t3_1"]["tasks"])
    text = format_comparison(results, published("mtil-I/naive"))
    assert "no evaluation rows yet" in text and "Transfer" not in text


def test_docs_ledger_lists_every_entry_with_its_numbers():
    doc = (ROOT / "docs" / "reproduce.md").read_text()
    for p in PUBLISHED:
        line = next((l for l in doc.splitlines() if l.startswith(f"| `{p.key}` |")), None)
        assert line is not None, p.key
        assert f"| {p.transfer:.1f} / {p.avg:.1f} / {p.last:.1f} |" in line
        assert (p.run_file is None) or f"`{p.run_file}`" in line
