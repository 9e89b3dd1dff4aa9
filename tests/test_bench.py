"""``cl-proxyfda bench``: output files, finite ratios, the machine line, bad section
names, faiss/torch neighbour agreement, and the cached-teacher mode of the steps section."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(1)  # 2 shared cores: oversubscribed OpenMP threads make timings erratic

from cl_proxyfda.tools.bench import (  # noqa: E402
    CACHE_CHECK_TOLERANCE,
    QUICK,
    SECTIONS,
    BenchContext,
    StepEntry,
    machine_info,
    machine_line,
    measure_steps,
    parse_sections,
    run_bench,
    strategy_presets,
)
from cl_proxyfda.cli import main  # noqa: E402
from cl_proxyfda.errors import UserError  # noqa: E402


def all_ratios(report: dict) -> dict[str, float]:
    return {f"{name}/{key}": value for name, sec in report["sections"].items() for key, value in sec["ratios"].items()}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[Path, int, str]:
    out = tmp_path_factory.mktemp("bench") / "out"
    rc = main(["bench", "--quick", "--sections", "knn,eval,awc", "--out", str(out)])
    return out, rc, machine_line(machine_info()).split(";")[0]


def test_quick_bench_writes_both_files_with_finite_positive_ratios(quick_report):
    out, rc, machine = quick_report
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md"]  # no temporaries left
    report = json.loads((out / "bench.json").read_text())
    assert list(report["sections"]) == ["knn", "eval", "awc"]
    ratios = all_ratios(report)
    assert len(ratios) == 2 * len(QUICK.knn_sizes) + 2 + 3  # two per knn bank size, two eval ratios, three AWC parts
    bad = {k: v for k, v in ratios.items() if not (isinstance(v, float) and math.isfinite(v) and v > 0)}
    assert not bad
    assert [row[0] for row in report["sections"]["knn"]["rows"]] == list(QUICK.knn_sizes)
    # The eval rows count the class-head computations: none with the cache, one per test set without.
    rows = {row[0]: row for row in report["sections"]["eval"]["rows"]}
    cached = next(v for k, v in rows.items() if "cache on" in k)
    uncached = next(v for k, v in rows.items() if "cache off" in k)
    assert cached[3] == 0 and uncached[3] >= 3  # 2 tasks + control, one batch each at eval batch 256
    assert [t["limit"] for t in report["sections"]["eval"]["targets"]] == [1.10]


def test_markdown_names_the_machine_and_every_section(quick_report):
    out, _, machine = quick_report
    md = (out / "bench.md").read_text()
    report = json.loads((out / "bench.json").read_text())
    assert machine.startswith("machine: ") and machine in md
    assert report["machine_line"] in md and f"torch {torch.__version__}" in md
    assert "CUDA device:" in report["machine_line"]
    for name in ("knn", "eval", "awc"):
        assert f"## {name}:" in md
    assert "| bank size | torch top-k ms | faiss search ms |" in md


def test_knn_faiss_and_torch_agree_on_the_neighbours(quick_report):
    out, _, _ = quick_report
    report = json.loads((out / "bench.json").read_text())
    extra = report["sections"]["knn"]["extra"]
    for key in ("agreement", "agreement_blas_path"):  # faiss's default and BLAS search paths
        assert extra[key] == {str(n): 1.0 for n in QUICK.knn_sizes}
    assert all(row[-1] == "100%" for row in report["sections"]["knn"]["rows"])


def test_unknown_section_is_a_clear_error_with_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--quick", "--sections", "knn,warp", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: --sections: unknown section 'warp'" in err and "knn" in err
    assert not out.exists()
    with pytest.raises(UserError, match="no section named"):
        parse_sections(" , ")
    assert parse_sections(None) == list(SECTIONS)
    assert parse_sections("knn,eval,knn") == ["knn", "eval"]
    assert main(["bench", "--quick", "--sections", "knn", "--repeats", "0"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour of the gpu section")
def test_gpu_section_says_why_it_is_skipped_on_cpu(tmp_path):
    report = run_bench(out=tmp_path, quick=True, sections="gpu", echo=lambda msg: None)
    assert report["sections"]["gpu"]["skipped"] == "no CUDA device"
    assert "skipped: no CUDA device" in (tmp_path / "bench.md").read_text()


def test_cached_teacher_serves_exactly_what_the_forward_computes(tmp_path):
    ctx = BenchContext(QUICK, "cl-test-tiny", None, torch.device("cpu"), tmp_path, lambda msg: None)
    entries = [StepEntry("naive", [{"name": "naive"}]), StepEntry("fda, teacher from cache", [{"name": "fda"}], cached_teacher=True),
               StepEntry("fda", [{"name": "fda"}])]
    results, notes = measure_steps(ctx, entries, batch_size=QUICK.batch_size)
    assert notes == []
    by = {r.label: r for r in results}
    assert set(by) == {"naive", "fda", "fda, teacher from cache"}
    timed = QUICK.iterations * QUICK.repeats
    assert all(r.count == timed and math.isfinite(r.median) and r.median > 0 for r in results)
    bank = by["fda, teacher from cache"].bank
    assert bank is not None and bank.forwarded == 0
    # priming (verified against a real forward) + timed iterations were all served from the table
    assert bank.served == QUICK.prime_iterations + QUICK.repeats * (QUICK.warmup + QUICK.iterations)
    assert bank.max_difference <= CACHE_CHECK_TOLERANCE
    assert len(bank.precompute_seconds) == 1 + QUICK.repeats  # one table per experience started
    assert by["fda, teacher from cache"].teacher_share == 0.0
    assert by["fda"].teacher_share > 0.0 and by["naive"].teacher_share == 0.0


def test_image_folder_fallback_stream_runs_the_data_hungry_presets(tmp_path):
    """Without the demo stream the bench writes its own image folders; the presets that need
    extra data (GIFT: the tiny diffusers pipeline; ZSCL, Infusing: a reference folder) run on it."""
    ctx = BenchContext(QUICK, "cl-test-tiny", None, torch.device("cpu"), tmp_path, lambda msg: None, stream="image_folder")
    entries, skips = strategy_presets(ctx, QUICK.batch_size)
    assert skips == [] or all("skipped:" in note for note in skips)
    chosen = [e for e in entries if e.label in ("naive", "gift", "zscl", "infusing_generic")]
    assert len(chosen) == 4
    assert (tmp_path / "stream" / "warm" / "train" / "red").is_dir()
    results, notes = measure_steps(ctx, chosen, batch_size=QUICK.batch_size, paired=True)
    assert notes == []
    assert [r.label for r in results] == [e.label for e in chosen]
    assert results[0].ratio == 1.0
    assert all(r.ratio is not None and math.isfinite(r.ratio) and r.ratio > 0 for r in results)
