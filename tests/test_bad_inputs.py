"""A corpus of bad run files (tests/bad_inputs/*.yaml): each must give a one-line error
naming the problem, exit code 2, no traceback, and write nothing.

Each file starts with ``# expect: <text>``; placeholders (@DATA@, @OUT@, ...) are
replaced by paths the test creates.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cl_proxyfda.cli import main
from conftest import TINY_TASKS, write_image_folder_stream

CORPUS = sorted((Path(__file__).parent / "bad_inputs").glob("*.yaml"))


def expected(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: "), path
    return first[len("# expect: ") :]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bad")
    data = write_image_folder_stream(base / "data", TINY_TASKS, train_per_class=3, test_per_class=2)
    zero = write_image_folder_stream(base / "zero", {"warm": ["red", "orange"]}, 2, 2)
    (zero / "warm" / "train" / "red" / "zero-byte.png").write_bytes(b"")
    garbage = write_image_folder_stream(base / "garbage", {"warm": ["red", "orange"]}, 2, 2)
    (garbage / "warm" / "test" / "orange" / "garbage.png").write_bytes(b"\x89PNG not really an image")
    empty = base / "empty"
    (empty / "warm" / "train").mkdir(parents=True)
    (empty / "warm" / "test").mkdir(parents=True)
    afile = base / "a_file"
    afile.write_text("not a folder")
    from cl_proxyfda.models import create_clip

    clip = create_clip("cl-test-tiny", None)[0]
    ckpt = base / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(ckpt))
    return {"DATA": data, "BROKEN_ZERO": zero, "BROKEN_GARBAGE": garbage, "BROKEN_EMPTY": empty, "FILE": afile, "TINY_CKPT": ckpt}


def materialise(src: Path, places: dict[str, Path], out: Path) -> Path:
    raw = src.read_bytes()
    for key, value in {**places, "OUT": out}.items():
        raw = raw.replace(f"@{key}@".encode(), str(value).encode())
    dst = out.parent / src.name
    dst.write_bytes(raw)
    return dst


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_input(path, places, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = materialise(path, places, out)
    snapshot = {p: p.stat().st_mtime for p in places["DATA"].rglob("*")}
    code = main(["run", str(cfg)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    assert expected(path) in lines[0], lines[0]
    assert not out.exists(), "a bad input must not write the output folder"
    assert not (tmp_path / "pwned").exists()
    assert {p: p.stat().st_mtime for p in places["DATA"].rglob("*")} == snapshot


def test_bad_input_through_a_real_process(places, tmp_path):
    cfg = materialise(Path(__file__).parent / "bad_inputs" / "negative_lr.yaml", places, tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "cl_proxyfda", "run", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [line for line in proc.stderr.strip().splitlines() if line.startswith("error: ")]
    assert "train.lr" in proc.stderr and "Traceback" not in proc.stderr
