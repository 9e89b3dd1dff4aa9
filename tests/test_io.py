"""cl_proxyfda.io: atomic writes (temp file in the same folder, fsync, os.replace)."""
from __future__ import annotations

import os

import pytest

from cl_proxyfda.io import safe_name, write_atomic, write_atomic_with


def test_text_and_bytes_round_trip_into_new_folders(tmp_path):
    text = write_atomic(tmp_path / "a" / "b" / "x.txt", "héllo\n")
    assert text == tmp_path / "a" / "b" / "x.txt"
    assert text.read_bytes() == "héllo\n".encode("utf-8")
    data = write_atomic(tmp_path / "y.bin", b"\x00\xff")
    assert data.read_bytes() == b"\x00\xff"


def test_a_new_file_is_renamed_over_the_old_one_and_no_temp_stays(tmp_path):
    path = write_atomic(tmp_path / "m.json", "old")
    inode = os.stat(path).st_ino
    write_atomic(path, "new")
    assert path.read_text() == "new"
    assert os.stat(path).st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_a_failing_writer_keeps_the_old_file_and_removes_its_temp(tmp_path):
    path = write_atomic(tmp_path / "ckpt.pt", b"old")
    seen = []

    def writer(handle):
        handle.write(b"partial")
        seen.extend(p.name for p in tmp_path.iterdir() if p.name != "ckpt.pt")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic_with(path, writer)
    assert len(seen) == 1 and seen[0].startswith(".ckpt.pt.") and seen[0].endswith(".tmp")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_a_named_temp_file_is_used_in_the_target_folder(tmp_path):
    seen = []

    def writer(handle):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        handle.write(b"x")

    write_atomic_with(tmp_path / "img.png", writer, tmp_name=".tmp-r0of1-7-img.png")
    assert seen == [[".tmp-r0of1-7-img.png"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]


def test_safe_name():
    assert safe_name("retrieval map/x") == "retrieval_map_x"
    assert safe_name("task_agnostic") == "task_agnostic"
    assert safe_name("///") == "matrix"
