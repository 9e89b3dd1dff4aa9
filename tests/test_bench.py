"""``cl-proxyfda bench``: output files, finite ratios, the machine line, bad section
names, faiss/torch neighbour agreement, the cached-teacher mode of the steps section, the
presets read from the registry, the Timer-based timing helpers, and the package layout
(each module imports on its own; the core does not import the tools)."""
from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(1)  # 2 shared cores: oversubscribed OpenMP threads make timings erratic

from pydantic import BaseModel  # noqa: E402

from cl_proxyfda.registry import STRATEGIES, Registry  # noqa: E402
from cl_proxyfda.tools.bench import (  # noqa: E402
    OVERRIDES,
    QUICK,
    SECTION_FUNCTIONS,
    SECTIONS,
    BenchContext,
    StepEntry,
    Variant,
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
    assert parse_sections(None) == list(SECTIONS) == list(SECTION_FUNCTIONS)
    assert parse_sections("knn,eval,knn") == ["knn", "eval"]
    assert main(["bench", "--quick", "--sections", "knn", "--repeats", "0"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour of the gpu section")
def test_gpu_section_says_why_it_is_skipped_on_cpu(tmp_path):
    report = run_bench(out=tmp_path, quick=True, sections="gpu", echo=lambda msg: None)
    assert report["sections"]["gpu"]["skipped"] == "no CUDA device"
    assert "skipped: no CUDA device" in (tmp_path / "bench.md").read_text()



def test_generation_section_times_the_pipeline_and_the_cache_with_timer(tmp_path):
    report = run_bench(quick=True, sections="generation", model="cl-test-tiny", echo=lambda msg: None)
    sec = report["sections"]["generation"]
    assert set(sec["ratios"]) == {"generation_batched_over_single_images_per_s", "cache_generation_over_hit"}
    assert all(math.isfinite(v) and v > 0 for v in sec["ratios"].values())
    assert len(sec["rows"]) == 4 and all(row[1] > 0 and row[2] > 0 for row in sec["rows"])
    for row in sec["rows"]:  # images/s is the batch (or cache) size over the median time
        n = QUICK.generation_batch if "pipeline" in row[0] or "calls of one" in row[0] else QUICK.cache_images
        assert row[2] == pytest.approx(n / (row[1] / 1000), rel=1e-9)
    assert "Timer.blocked_autorange" in sec["setting"]

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
    assert bank is not None and bank.forward_count == 0  # train.teacher_table: no teacher forward in any step
    # priming + timed iterations were all served from the table, computed once per experience
    assert bank.served_count == QUICK.prime_iterations + QUICK.repeats * (QUICK.warmup + QUICK.iterations)
    assert len(bank.table_seconds) == 2 and all(t > 0 for t in bank.table_seconds)
    assert by["fda, teacher from cache"].teacher_share == 0.0
    assert by["fda"].teacher_share > 0.0 and by["naive"].teacher_share == 0.0


def test_image_folder_fallback_stream_runs_the_data_hungry_presets(tmp_path):
    """Without the demo stream the bench writes its own image folders; the presets that need
    extra data (GIFT: the tiny diffusers pipeline; ZSCL, Infusing: a reference folder) run on it."""
    ctx = BenchContext(QUICK, "cl-test-tiny", None, torch.device("cpu"), tmp_path, lambda msg: None, stream="image_folder")
    entries = strategy_presets(ctx, QUICK.batch_size)
    chosen = [e for e in entries if e.label in ("naive", "gift", "zscl", "infusing_generic")]
    assert len(chosen) == 4
    assert (tmp_path / "stream" / "warm" / "train" / "red").is_dir()
    results, notes = measure_steps(ctx, chosen, batch_size=QUICK.batch_size, paired=True)
    assert notes == []
    assert [r.label for r in results] == [e.label for e in chosen]
    assert results[0].ratio == 1.0
    assert all(r.ratio is not None and math.isfinite(r.ratio) and r.ratio > 0 for r in results)


# ---------------------------------------------------------------- presets
def demo_ctx(tmp_path: Path) -> BenchContext:
    return BenchContext(QUICK, "cl-test-tiny", None, torch.device("cpu"), tmp_path, lambda msg: None, stream="demo")


def test_presets_give_every_registered_strategy_its_params_defaults_unless_overridden(tmp_path):
    from cl_proxyfda.tools.bench.presets import MODEL_NEEDS, side_data_args

    ctx = demo_ctx(tmp_path)
    entries = strategy_presets(ctx, QUICK.batch_size)
    registered = STRATEGIES.names()
    assert entries[0].label == "naive" and entries[0].strategies == [{"name": "naive"}]
    assert {e.strategies[-1]["name"] for e in entries} == set(registered)  # a row for every registered strategy
    data = side_data_args(ctx, QUICK.batch_size)
    assert set(OVERRIDES) | set(data) | set(MODEL_NEEDS) <= set(registered)  # the tables name registered strategies only
    plain = [n for n in registered if n not in OVERRIDES and n not in data]
    assert plain  # e.g. ewc, l2sp, lwf: one row, the Params defaults
    for name in plain:
        assert [(e.label, e.strategies) for e in entries if e.strategies[-1]["name"] == name] == [(name, [{"name": name}])]
    labels = [e.label for e in entries]
    assert len(labels) == len(set(labels))
    # the bench's own rows (gpu-check looks them up by label)
    by = {e.label: e for e in entries}
    assert by["ldifs layers=embed"].strategies == [{"name": "ldifs", "layers": "embed"}]
    assert by["fda, teacher from cache"].cached_teacher and not by["fda"].cached_teacher
    assert [s["name"] for s in by["gift + awc"].strategies] == ["gift", "awc"]
    assert by["gift + awc"].strategies[0] == by["gift"].strategies[0] == {"name": "gift", **data["gift"]}
    coop = next(e for e in entries if e.label.startswith("coop (prompt learner, n_ctx "))
    assert coop.model == by["coop + prompt_fda"].model == {"prompt_learner": {"n_ctx": 4}}  # cl-test-tiny: context 16
    assert by["infusing"].strategies == [{"name": "infusing", "generic": {"source": "reference"}, "select": {"every": 10_000}}]


def test_a_new_registered_strategy_gets_a_row_without_any_table_entry(tmp_path):
    class ToyParams(BaseModel):
        weight: float = 2.0

    registry: Registry = Registry("strategy")
    registry.register("naive", STRATEGIES.get("naive").params)(lambda params: None)
    registry.register("toy", ToyParams)(lambda params: None)
    entries = strategy_presets(demo_ctx(tmp_path), QUICK.batch_size, overrides={}, registry=registry, model_needs={})
    assert [(e.label, e.strategies, e.cached_teacher, e.model) for e in entries] == [
        ("naive", [{"name": "naive"}], False, {}), ("toy", [{"name": "toy"}], False, {})]
    entries = strategy_presets(demo_ctx(tmp_path), QUICK.batch_size, overrides={"toy": (Variant(), Variant("toy light", {"weight": 0.5}))},
                               registry=registry, model_needs={})
    assert [(e.label, e.strategies) for e in entries][1:] == [("toy", [{"name": "toy"}]), ("toy light", [{"name": "toy", "weight": 0.5}])]


@pytest.mark.parametrize("bad, match", [
    ({"warp": (Variant(),)}, r"OVERRIDES names 'warp', which is not a registered strategy"),
    ({"awc": (Variant("gift + awc", after=("gfit",)),)}, r"OVERRIDES\['awc'\]\.after names 'gfit'"),
    ({"ldifs": (Variant("ldifs layers=embed", {"layerz": "embed"}),)}, r"OVERRIDES\['ldifs'\] ldifs layers=embed: layerz: Extra inputs"),
])
def test_an_unregistered_name_or_a_bad_argument_in_the_overrides_is_an_error(tmp_path, bad, match):
    with pytest.raises(RuntimeError, match=match):
        strategy_presets(demo_ctx(tmp_path), QUICK.batch_size, overrides={**OVERRIDES, **bad})


# ----------------------------------------------------------------- timing
def test_timer_helpers_keep_the_thread_count_interleave_and_time_in_seconds():
    from cl_proxyfda.tools.bench.timing import interleaved, seconds_per_call

    seen_threads: list[int] = []
    torch.set_num_threads(2)
    try:
        seconds = seconds_per_call(lambda: (seen_threads.append(torch.get_num_threads()), time.sleep(0.004)), 0.02)
    finally:
        torch.set_num_threads(1)
    assert set(seen_threads) == {2}  # Timer's own default would be one thread
    assert 0.004 <= seconds < 0.1  # a sleep never returns early; the upper bound allows a loaded machine
    order: list[str] = []
    afters: list[str] = []
    jobs = [(key, lambda key=key: order.append(key)) for key in ("a", "b", "c")]
    found = interleaved(jobs, rounds=3, min_run_time=1e-3, after=afters.append)
    assert afters == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # rotated by one each round
    assert set(order) == {"a", "b", "c"} and all(m.median > 0 and len(m.times) >= 3 for m in found.values())
    slow = interleaved([("sleep", lambda: time.sleep(0.003)), ("none", lambda: None)], rounds=2, min_run_time=0.01)
    assert slow["sleep"].median >= 0.003 > slow["none"].median


# ----------------------------------------------------------------- layout
BENCH_MODULES = ["__init__", "awc", "context", "driver", "evaluation", "generation", "gpu", "knn", "presets", "report",
                 "step_timer", "steps", "timing"]


def test_every_bench_module_imports_first_in_a_fresh_interpreter():
    """No import cycles: each module is the first of the package imported (the package's
    modules are dropped from sys.modules between two; torch and Avalanche stay loaded)."""
    root = Path(__file__).resolve().parents[1] / "cl_proxyfda" / "tools" / "bench"
    assert sorted(p.stem for p in root.glob("*.py")) == BENCH_MODULES
    code = (
        "import importlib, sys\n"
        f"for m in {BENCH_MODULES!r}:\n"
        "    for k in [k for k in sys.modules if k.startswith('cl_proxyfda.tools')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module('cl_proxyfda.tools.bench' + ('' if m == '__init__' else '.' + m))\n"
        "    print('ok', m)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [w for m in BENCH_MODULES for w in ("ok", m)]


def test_the_core_does_not_import_the_tools():
    """Only the CLI (inside ``cmd_bench``) and gpu-check (itself a tool) import cl_proxyfda.tools."""
    root = Path(__file__).resolve().parents[1]
    importers = set()
    files = [p for p in (root / "cl_proxyfda").rglob("*.py") if "tools" not in p.relative_to(root / "cl_proxyfda").parts]
    files += [p for d in ("strategies", "benchmarks", "generators") for p in (root / d).rglob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "cl_proxyfda.tools" or n.startswith("cl_proxyfda.tools.") for n in names):
                importers.add(path.relative_to(root).as_posix())
    assert importers == {"cl_proxyfda/cli.py", "cl_proxyfda/gpu_check.py"}
