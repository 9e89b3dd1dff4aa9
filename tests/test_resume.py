"""Checkpoints and resume: a run killed with SIGKILL resumes to the same accuracy matrix."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cl_proxyfda import checkpoint as ckpt
from cl_proxyfda.config import parse_config
from cl_proxyfda.results import RunResults
from cl_proxyfda.runner import build_run, execute
from cl_proxyfda.train_log import TRAIN_LOG, read_train_log
from conftest import tiny_config

STRATEGIES = [{"name": "l2sp", "weight": 0.1, "anchor": "previous"}, {"name": "lwf", "alpha": 0.5}]


def _config(root: Path, out: Path, iterations: int) -> dict:
    return tiny_config(root, out, strategies=STRATEGIES, train={"iterations": iterations, "lr": 3e-3})


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "cl_proxyfda", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_sigkill_after_experience_2_then_resume_matches_uninterrupted(tmp_path, tiny_stream_root):
    iterations = 20
    # Uninterrupted reference, in this process.
    ref = execute(build_run(parse_config(_config(tiny_stream_root, tmp_path / "ref", iterations))))

    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tiny_stream_root, tmp_path / "runs", iterations)))
    out = tmp_path / "runs" / "tiny"
    proc = _cli(["run", str(cfg_path)])
    deadline = time.time() + 240
    second = out / "checkpoints" / "exp_002.pt"
    while not second.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "run did not reach experience 2"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "exp_003.pt").exists(), "killed too late: the run had finished"
    partial = RunResults.load(out)
    assert len(partial.rows) == 3  # row 0 + two experiences
    assert (out / TRAIN_LOG).read_text().endswith("\n")  # whole lines only, whenever the kill came

    resumed = _cli(["run", str(cfg_path), "--resume"])
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err.decode()[-2000:]
    assert b"resuming" in err
    final = RunResults.load(out)
    np.testing.assert_allclose(final.matrix(), ref.matrix(), atol=1e-6)
    # the training curves: the rows of experiences 1-2 kept, experience 3's written once
    header, rows = read_train_log(out / TRAIN_LOG)
    ref_header, ref_rows = read_train_log(tmp_path / "ref" / "tiny" / TRAIN_LOG)
    assert header == ref_header and len(rows) == len(ref_rows) == 3 * iterations
    assert [r["global_step"] for r in rows] == [str(s) for s in range(1, 3 * iterations + 1)]
    for r, expected in zip(rows, ref_rows):
        assert (r["experience"], r["iteration"], r["lr"]) == (expected["experience"], expected["iteration"], expected["lr"])
        assert float(r["loss"]) == pytest.approx(float(expected["loss"]), rel=1e-5, abs=1e-7)


def test_run_folder_with_a_run_needs_resume(tmp_path, tiny_stream_root, capsys):
    from cl_proxyfda.cli import main

    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tiny_stream_root, tmp_path / "runs", 2)))
    assert main(["run", str(cfg_path)]) == 0
    capsys.readouterr()
    assert main(["run", str(cfg_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # a resume of a finished run trains nothing more and keeps the matrix
    before = RunResults.load(tmp_path / "runs" / "tiny").matrix()
    assert main(["run", str(cfg_path), "--resume"]) == 0
    np.testing.assert_array_equal(RunResults.load(tmp_path / "runs" / "tiny").matrix(), before)


def test_checkpoint_is_plain_and_loads_weights_only(tmp_path, tiny_stream_root):
    run = build_run(parse_config(_config(tiny_stream_root, tmp_path / "runs", 2)))
    execute(run)
    files = ckpt.list_checkpoints(run.out_dir / "checkpoints")
    assert [f.name for f in files] == ["exp_002.pt", "exp_003.pt"]  # keep_last = 2
    data = torch.load(files[-1], weights_only=True)
    assert data["experience"] == 3 and data["model_name"] == "cl-test-tiny"
    assert set(data["plugins"]) == {"0:l2sp", "1:lwf"}
    assert not any(p.name.endswith(".tmp") for p in (run.out_dir / "checkpoints").iterdir())


def test_corrupted_checkpoint_falls_back_to_previous(tmp_path, tiny_stream_root):
    run = build_run(parse_config(_config(tiny_stream_root, tmp_path / "runs", 2)))
    execute(run)
    folder = run.out_dir / "checkpoints"
    newest = folder / "exp_003.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="exp_003.pt"):
        state = ckpt.load_latest_checkpoint(folder)
    assert state is not None and state["experience"] == 2
    with pytest.raises(Exception, match="exp_003.pt"):
        ckpt.load_checkpoint_file(newest)


def test_checkpoint_of_another_model_is_rejected(tmp_path, tiny_stream_root, capsys):
    from cl_proxyfda.cli import main

    cfg = _config(tiny_stream_root, tmp_path / "runs", 1)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(cfg_path)]) == 0
    folder = tmp_path / "runs" / "tiny" / "checkpoints"
    for f in ckpt.list_checkpoints(folder):
        data = torch.load(f, weights_only=True)
        data["model_name"] = "ViT-B-16"
        torch.save(data, f)
    capsys.readouterr()
    assert main(["run", str(cfg_path), "--resume"]) == 2
    assert "is for model 'ViT-B-16'" in capsys.readouterr().err
