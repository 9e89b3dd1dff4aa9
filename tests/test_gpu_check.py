"""``cl-proxyfda gpu-check`` in its tiny CPU mode: the report files, one row per strategy,
the MTIL rehearsal's matrix and phase timings, the UNet's images/s, a failed phase, and
the one-line error for ``--device cuda`` without CUDA."""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(1)

import cl_proxyfda.gpu_check as gpu_check  # noqa: E402
from cl_proxyfda.cli import main  # noqa: E402
from cl_proxyfda.gpu_check import MTIL_TASKS, STEP_STRATEGIES, TINY, resolve_check_device, write_mtil_miniature  # noqa: E402
from cl_proxyfda.registry import STREAMS  # noqa: E402

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="behaviour of a machine without CUDA")


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    return out, main(["gpu-check", "--tiny", "--device", "cpu", "--out", str(out)])


def test_tiny_check_writes_markdown_and_json_only(tiny_check):
    out, rc = tiny_check
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]  # no temporaries left
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["complete"] is True and report["failed"] == []
    assert report["device"] == "cpu" and report["tiny"] is True
    assert report["torch"] == torch.__version__
    assert report["command"] == f"cl-proxyfda gpu-check --out {out} --tiny --device cpu"
    assert list(report["phases"]) == ["steps", "rehearsal", "unet"]
    assert all(p["status"] == "ok" and positive(p["seconds"]) for p in report["phases"].values())
    md = (out / "gpu_check.md").read_text()
    assert f"torch {torch.__version__}" in md and report["device_name"] in md
    assert f"`{report['command']}`" in md and "process command line" in md
    assert md.count("status: **ok**") == 3


def test_one_row_per_strategy_with_finite_positive_step_times(tiny_check):
    out, _ = tiny_check
    steps = json.loads((out / "gpu_check.json").read_text())["phases"]["steps"]
    names = [name for name, _ in STEP_STRATEGIES]
    assert names == ["naive", "FDA", "Proxy-FDA", "LDIFS", "ZSCL", "GIFT+AWC"]
    assert [row[0] for row in steps["rows"]] == names
    col = {c: i for i, c in enumerate(steps["columns"])}
    for row in steps["rows"]:
        assert positive(row[col["median ms"]]) and positive(row[col["mean ms"]]) and positive(row[col["x naive"]]), row
        assert row[col["peak GPU MB"]] is None  # CPU: no GPU memory to report
    values = steps["values"]
    assert values["naive"]["x_naive"] == 1.0 and values["naive"]["teacher_share"] == 0.0
    for name in ("FDA", "Proxy-FDA", "LDIFS", "ZSCL"):  # each runs a frozen-teacher forward in its step
        assert 0 < values[name]["teacher_share"] < 1, name
    timed = TINY.bench.iterations * TINY.bench.repeats
    assert all(v["timed_iterations"] == timed for v in values.values())
    assert "bf16 autocast" in steps["setting"] and f"batch {TINY.batch_size}" in steps["setting"]
    md = (out / "gpu_check.md").read_text()
    for name in names:
        assert f"| {name} |" in md


def test_rehearsal_matrix_and_phase_timings(tiny_check):
    out, _ = tiny_check
    phase = json.loads((out / "gpu_check.json").read_text())["phases"]["rehearsal"]
    values = phase["values"]
    assert values["task_names"] == list(MTIL_TASKS)
    matrix = values["accuracy_matrix"]
    assert len(matrix) == 3 and all(len(row) == 2 for row in matrix)  # zero-shot row + one per task
    assert all(0.0 <= v <= 100.0 for row in matrix for v in row)
    timings = values["timings_s"]
    assert set(timings) == {"write_data", "setup_and_row0", "EuroSAT/train", "EuroSAT/evaluate", "MNIST/train", "MNIST/evaluate"}
    assert all(positive(t) for t in timings.values())  # setup_and_row0 = run_config's time minus its experiences'
    assert positive(values["train_seconds_per_iteration"]["MNIST"])
    assert positive(values["runner_peak_memory_mb"]) and values["peak_gpu_memory_mb"] is None
    assert "teacher_half: true" in phase["setting"] and "format: torchvision" in phase["setting"]


def test_unet_images_per_second_with_the_fp32_fallback_note(tiny_check):
    out, _ = tiny_check
    phase = json.loads((out / "gpu_check.json").read_text())["phases"]["unet"]
    assert positive(phase["values"]["images_per_second"])
    assert phase["values"]["dtype"] == "float32" and phase["values"]["steps"] == TINY.unet_steps
    assert any("fp16 UNet on CPU falls back to fp32" in n for n in phase["notes"])
    assert phase["rows"][0][0] == phase["values"]["images_per_second"]


def test_miniature_mtil_copies_load_through_torchvision(tmp_path):
    root = write_mtil_miniature(tmp_path / "mtil", eurosat_per_class=5, mnist_train=30, mnist_test=20)
    data = STREAMS.build("mtil", {"root": str(root), "format": "torchvision", "tasks": list(MTIL_TASKS)})
    eurosat, mnist = data.tasks
    assert [t.name for t in data.tasks] == ["EuroSAT", "MNIST"]
    assert (len(eurosat.train), len(eurosat.test)) == (40, 10)  # torchvision's EuroSAT, MTIL's 80/20 random split
    assert sorted(set(eurosat.train.targets + eurosat.test.targets)) == list(range(10))
    assert (len(mnist.train), len(mnist.test)) == (30, 20) and mnist.test.targets[:10] == list(range(10))
    image, _ = mnist.test[0]
    assert image.mode == "RGB" and image.size == (28, 28)
    assert eurosat.test[0][0].size == (64, 64)


@NO_CUDA
def test_cuda_without_cuda_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["gpu-check", "--device", "cuda", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == ["error: --device: cuda requested but no CUDA device is available"]
    assert captured.out == "" and not out.exists()


@NO_CUDA
def test_default_device_on_cpu_implies_tiny_and_says_so():
    device, tiny, notes = resolve_check_device(None, tiny=False)
    assert device.type == "cpu" and tiny is True
    assert notes == ["no CUDA device: running on CPU", "CPU: --tiny implied (the full sizes need a GPU)"]
    assert resolve_check_device("cpu", tiny=True) == (torch.device("cpu"), True, [])


def test_a_failing_phase_is_reported_the_others_still_run_and_exit_is_1(tmp_path, monkeypatch, capsys):
    """With FDA's default k = 8 at batch 8 the FDA and Proxy-FDA runs are rejected by their
    own config check: the steps and rehearsal phases fail, the UNet phase still runs, both
    files are written and the command exits 1 with one error line."""
    monkeypatch.setattr(gpu_check, "TINY", replace(TINY, fda_k=None))
    out = tmp_path / "out"
    assert main(["gpu-check", "--tiny", "--device", "cpu", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: gpu-check: phases failed: steps, rehearsal (see {out / 'gpu_check.md'})"
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["complete"] is False and report["failed"] == ["steps", "rehearsal"]
    steps, rehearsal, unet = (report["phases"][k] for k in ("steps", "rehearsal", "unet"))
    assert steps["error"] == "RuntimeError: not measured: FDA, Proxy-FDA (see the notes)"
    assert any("k: K = 8 neighbours need batches of more than K images" in n for n in steps["notes"])
    rows = {row[0]: row for row in steps["rows"]}
    assert rows["FDA"][2] is None and positive(rows["naive"][2]) and positive(rows["GIFT+AWC"][2])
    assert rehearsal["error"].startswith("ConfigError: strategies[0].k") and "Traceback" in rehearsal["traceback"]
    assert unet["status"] == "ok" and positive(unet["values"]["images_per_second"])
    assert "status: **failed**" in (out / "gpu_check.md").read_text()
