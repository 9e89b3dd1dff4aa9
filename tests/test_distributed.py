"""torchrun with 2 CPU processes (gloo): same numbers as one process, outputs written once."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from cl_proxyfda.config import parse_config
from cl_proxyfda.results import RunResults
from cl_proxyfda.runner import build_run, execute
from conftest import tiny_config

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def free_port() -> int:
    """A TCP port nobody listens on now (fixed ports collide with other test runs)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, tiny_stream_root):
    # No augmentation: the two runs then differ only in float summation order.
    sections = {"train": {"iterations": 6, "batch_size": 8, "lr": 3e-3, "augment": False}, "strategies": [{"name": "l2sp", "weight": 0.1}]}
    single = execute(build_run(parse_config(tiny_config(tiny_stream_root, tmp_path / "single", **sections))))

    cfg = tiny_config(tiny_stream_root, tmp_path / "ddp", **sections)
    cfg["logging"] = {"wandb": {"mode": "offline", "project": "ddp-test"}, "plots": True, "progress": True}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "cl_proxyfda", "run", str(path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "ddp" / "tiny"
    ddp = RunResults.load(out)
    # Stated tolerance: at most one test image of difference per entry (test sets have 8-12 images).
    assert np.abs(ddp.matrix() - single.matrix()).max() <= 100 / 8 + 1e-9
    assert np.abs(ddp.matrix() - single.matrix()).mean() <= 2.0
    # written once: one summary table, one W&B run, one set of checkpoints
    assert proc.stdout.count("Transfer") == 1
    assert len(list(out.rglob("*.wandb"))) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["exp_002.pt", "exp_003.pt"]


def test_whole_classes_per_process_from_class_balanced_batches():
    from cl_proxyfda.benchmarks.samplers import ClassBalancedBatchSampler
    from cl_proxyfda.distributed import DistContext, ShardedBatches

    targets = np.repeat(np.arange(12), 10)
    sampler = ClassBalancedBatchSampler(targets, m_classes=4, n_per_class=4, iterations=5, seed=0)
    for world in (2, 4):
        shares = []
        for r in range(world):
            sampler.set_epoch(0)  # every process runs the same pass
            shares.append(list(ShardedBatches(sampler, DistContext(rank=r, world=world))))
        sampler.set_epoch(0)
        for i, batch in enumerate(sampler):
            parts = [shares[r][i] for r in range(world)]
            assert sorted(sum(parts, [])) == sorted(batch)  # the shares make up the global batch
            per_class = [np.bincount(targets[p], minlength=12) for p in parts]
            for counts in per_class:  # each process: whole classes of n = 4 images
                assert set(counts[counts > 0].tolist()) == {4}
            assert (np.sum([c > 0 for c in per_class], axis=0) <= 1).all()  # no class split across processes


def test_proxy_fda_parameters_stay_identical_across_processes():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run(
        [TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", str(Path(__file__).parent / "ddp_plugin_sync.py")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("same=True moved=True") == 2


def test_two_processes_run_proxy_fda_with_class_balanced_batches(tmp_path, tiny_stream_root):
    sections = {"train": {"iterations": 3, "batch_size": 8, "images_per_class": 2, "augment": False},
                "strategies": [{"name": "proxy_fda", "k": 3}]}
    cfg = tiny_config(tiny_stream_root, tmp_path / "ddp", **sections)
    assert parse_config(cfg).sampler_layout() == ("class_balanced", 4, 2)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "cl_proxyfda", "run", str(path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = RunResults.load(tmp_path / "ddp" / "tiny")
    assert results.matrix().shape == (4, 3) and np.isfinite(results.matrix()).all()
