"""torchrun with 2 CPU processes (gloo): same numbers as one process, outputs written once."""
from __future__ import annotations

import json
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

# torch's launcher as a module: a virtual environment need not have the torchrun script
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


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
        [*TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "cl_proxyfda", "run", str(path)],
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
        [*TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", str(Path(__file__).parent / "ddp_plugin_sync.py")],
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
        [*TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "cl_proxyfda", "run", str(path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = RunResults.load(tmp_path / "ddp" / "tiny")
    assert results.matrix().shape == (4, 3) and np.isfinite(results.matrix()).all()


def test_gift_and_zscl_side_batches_are_shared_out_across_two_processes(tmp_path, tiny_stream_root, tiny_pipe):
    """Each process draws its own half of every synthetic (GIFT) and reference (ZSCL) batch
    of the one-process run, and GIFT's teacher table is indexed by the positions it drew."""
    from ddp_side_data import record

    from PIL import Image

    rng = np.random.default_rng(0)
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    names = tmp_path / "classes.txt"
    names.write_text("circle\nsquare\nstar\n", encoding="utf-8")
    strategies = [
        {"name": "gift", "generator": {"name": "diffusers", "model": str(tiny_pipe), "steps": 2, "guidance": 1.0, "progress": False},
         "images_per_experience": 8, "synthetic_batch_size": 4, "base_concepts": ["circle", "square", "star"],
         "cache_dir": str(tmp_path / "synthetic")},
        {"name": "zscl", "reference": "folder", "reference_folder": str(ref), "reference_classnames": str(names), "batch_size": 4},
    ]
    cfg = tiny_config(tiny_stream_root, tmp_path / "runs", strategies=strategies,
                      train={"iterations": 3, "batch_size": 8, "augment": False})
    cfg["stream"]["tasks"] = ["warm", "cool"]
    path = tmp_path / "side.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _, single = record(str(path))  # one process: the global batches (and the synthetic cache, reused below)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run(
        [*TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", str(Path(__file__).parent / "ddp_side_data.py"), str(path), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"side_rank{r}.json").read_text()) for r in range(2)]
    for name in ("gift", "zscl"):
        whole = single.batches[name]
        assert len(whole) == 2 * 3 and all(len(b) == 4 for b in whole)  # 2 experiences x 3 iterations, batches of 4
        first, second = ranks[0]["batches"][name], ranks[1]["batches"][name]
        assert len(first) == len(second) == len(whole)
        for k, batch in enumerate(whole):
            assert len(first[k]) == len(second[k]) == 2
            assert not set(first[k]) & set(second[k])  # disjoint shares
            assert first[k] + second[k] == batch  # together: the one-process batch, in order
    # the table rows at each process's positions are the teacher's embeddings of its own images
    assert single.table_error < 1e-5
    assert all(r["table_error"] < 1e-5 for r in ranks)
