"""`cl-proxyfda generate`: N images per experience into the cache the run reads, nothing on
a rerun, rank shards, one experience, and one-line errors."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from cl_proxyfda.cli import main  # noqa: E402
from cl_proxyfda.config import load_config  # noqa: E402
from cl_proxyfda.runner import build_run, execute  # noqa: E402
from conftest import tiny_config  # noqa: E402

N = 6


def write_config(tmp: Path, root: Path, pipe: Path, strategies: list | None = None) -> Path:
    gift = {
        "name": "gift",
        "generator": {"name": "diffusers", "model": str(pipe), "steps": 2, "guidance": 1.0, "progress": False},
        "images_per_experience": N,
        "synthetic_batch_size": 4,
        "base_concepts": ["circle", "square", "star"],
    }
    cfg = tiny_config(root, tmp / "runs", strategies=strategies if strategies is not None else [gift], train={"iterations": 1, "batch_size": 6})
    cfg["stream"]["tasks"] = ["warm", "cool"]
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def experience_folders(tmp: Path) -> list[Path]:
    return sorted((tmp / "runs" / "synthetic").glob("*/image_folder/default/experience_*"))


def ok_records(folder: Path) -> list[dict]:
    records = []
    for manifest in folder.glob("manifest*.jsonl"):
        records += [json.loads(line) for line in manifest.read_text().splitlines() if line]
    return [r for r in records if r["status"] == "ok"]


def test_generate_makes_n_images_per_experience_and_a_rerun_makes_none(tmp_path, data_root, tiny_pipe, capsys):
    config = write_config(tmp_path, data_root, tiny_pipe)
    assert main(["generate", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"ok: generated {2 * N}, reused 0, dropped 0" in out
    folders = experience_folders(tmp_path)
    assert [f.name for f in folders] == ["experience_000", "experience_001"]
    for folder in folders:
        unique = {(r["prompt"], r["seed"]) for r in ok_records(folder)}
        assert len(list((folder / "images").glob("*.png"))) == len(unique) == N

    assert main(["generate", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"ok: generated 0, reused {2 * N}, dropped 0" in out
    assert len(re.findall(r"^experience \d/2 ", out, flags=re.M)) == 2

    # the run reads the same cache and generates nothing
    run = build_run(load_config(config))
    execute(run, quiet=True)
    assert run.plugins[0].generation_stats == {"generated": 0, "dropped": 0, "reused": N}
    assert experience_folders(tmp_path) == folders


def test_rank_shards_and_a_single_experience(tmp_path, data_root, tiny_pipe, capsys):
    config = write_config(tmp_path, data_root, tiny_pipe)
    assert main(["generate", str(config), "--rank", "1", "--world", "2", "--experience", "cool"]) == 0
    out = capsys.readouterr().out
    assert f"generated {N // 2}," in out and "experience 2/2 cool" in out
    folders = experience_folders(tmp_path)
    assert [f.name for f in folders] == ["experience_001"]
    assert len(ok_records(folders[0])) == N // 2
    assert (folders[0] / "manifest.rank1of2.jsonl").is_file()
    # rank 0 completes the experience; a single process then finds everything
    assert main(["generate", str(config), "--rank", "0", "--world", "2", "--experience", "2"]) == 0
    capsys.readouterr()
    assert main(["generate", str(config), "--experience", "2"]) == 0
    assert f"ok: generated 0, reused {N}, dropped 0" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, data_root, tiny_pipe, capsys):
    no_gift = write_config(tmp_path, data_root, tiny_pipe, strategies=[{"name": "naive"}])
    assert main(["generate", str(no_gift)]) == 2
    assert "no gift strategy" in capsys.readouterr().err
    config = write_config(tmp_path, data_root, tiny_pipe)
    assert main(["generate", str(config), "--experience", "7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--experience" in err
    assert main(["generate", str(config), "--rank", "2", "--world", "2"]) == 2
    assert "--rank" in capsys.readouterr().err
    assert not experience_folders(tmp_path)
