"""The run-folder contract: --resume refuses another config and restores lost results,
one writer at a time (a lock), unusable output paths and hand-edited checkpoints give
one line and exit 2, and the messages users see say what happened."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cl_proxyfda import checkpoint as ckpt
from cl_proxyfda.cli import main
from cl_proxyfda.errors import UserError
from cl_proxyfda.results import RunResults
from cl_proxyfda.runfolder import RESULT_NEUTRAL_KEYS, FolderLock, config_differences
from conftest import tiny_config

FILES = ("metrics.json", "accuracy_matrix.csv", "summary.txt", "config.yaml")


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder``: its mtime and bytes (a bad input must change none)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root) -> tuple[Path, Path]:
    """A finished three-experience run: (its run file, its run folder)."""
    base = tmp_path_factory.mktemp("finished")
    cfg = tiny_config(data_root, base / "runs", train={"iterations": 2}, strategies=[{"name": "l2sp", "weight": 0.1}])
    path = base / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    return path, base / "runs" / "tiny"


@pytest.fixture
def copy_of(finished, tmp_path) -> tuple[Path, Path]:
    """A private copy of the finished run, with a run file that points at it."""
    src_cfg, src_dir = finished
    out = tmp_path / "runs" / "tiny"
    shutil.copytree(src_dir, out)
    data = yaml.safe_load(src_cfg.read_text())
    data["run"]["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, out


# ------------------------------------------------------------- same config only
def test_differences_are_dotted_paths_and_skip_result_neutral_keys():
    old = {"train": {"lr": 1e-3, "workers": 0}, "run": {"seed": 0, "name": "a"}, "strategies": [{"name": "l2sp", "weight": 0.1}], "logging": {"plots": True}}
    new = {"train": {"lr": 1e-3, "workers": 4}, "run": {"seed": 1, "name": "b"}, "strategies": [{"name": "l2sp", "weight": 0.2}], "logging": {"plots": False}}
    assert config_differences(old, new) == ["run.seed", "strategies[0].weight"]
    assert config_differences(old, {**new, "strategies": []}) == ["run.seed", "strategies"]
    assert "run.name" in config_differences(old, new, ignore=()) and "logging" in RESULT_NEUTRAL_KEYS


def test_keys_added_or_removed_later_match_folders_only_at_their_former_value():
    old = {"train": {"lr": 1e-3}}
    assert config_differences(old, {"train": {"lr": 1e-3, "teacher_table": False}}) == []
    assert config_differences(old, {"train": {"lr": 1e-3, "teacher_table": True}}) == ["train.teacher_table"]
    assert config_differences(old, {"train": {"lr": 1e-3, "brand_new": False}}) == ["train.brand_new"]
    # a key removed later: a folder that had it at its former value continues
    assert config_differences({"eval": {"every_experience": True}}, {"eval": {}}) == []
    assert config_differences({"eval": {"every_experience": False}}, {"eval": {}}) == ["eval.every_experience"]
    # in a strategy entry, at any position: Proxy-FDA folders from before generator_hidden used width 32
    before = {"strategies": [{"name": "naive"}, {"name": "proxy_fda", "k": 8}]}
    assert config_differences(before, {"strategies": [{"name": "naive"}, {"name": "proxy_fda", "k": 8, "generator_hidden": 32}]}) == []
    assert config_differences(before, {"strategies": [{"name": "naive"}, {"name": "proxy_fda", "k": 8, "generator_hidden": 16}]}) == [
        "strategies[1].generator_hidden"
    ]


@pytest.mark.parametrize(
    "overrides,keys",
    [
        (["train.lr=0.5"], "train.lr"),
        (["strategies.0.weight=2", "run.seed=3"], "run.seed, strategies[0].weight"),
        (["eval.retrieval=true"], "eval.retrieval"),
    ],
)
def test_resume_with_another_config_is_refused_and_touches_nothing(copy_of, capsys, overrides, keys):
    path, out = copy_of
    before = _snapshot(out)
    args = ["run", str(path), "--resume"] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert "different config" in line and f"(differs at {keys})" in line, line
    assert _snapshot(out) == before


def test_resume_falls_back_to_the_checkpoint_config_when_config_yaml_is_gone(copy_of, capsys):
    path, out = copy_of
    (out / "config.yaml").unlink()
    before = _snapshot(out)
    assert main(["run", str(path), "--resume", "--set", "train.batch_size=4"]) == 2
    assert "differs at train.batch_size" in _one_error_line(capsys)
    assert _snapshot(out) == before


def test_resume_checks_the_checkpoint_config_too(copy_of, capsys):
    path, out = copy_of
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["train"]["lr"] = 0.5  # config.yaml edited by hand; the checkpoints trained with the old rate
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    before = _snapshot(out)
    assert main(["run", str(path), "--resume", "--set", "train.lr=0.5"]) == 2
    assert "differs at train.lr" in _one_error_line(capsys)
    assert _snapshot(out) == before


def test_resume_with_result_neutral_changes_goes_on(copy_of, capsys):
    path, out = copy_of
    before = RunResults.load(out).matrix()
    args = ["run", str(path), "--resume", "--set", "eval.batch_size=16", "--set", "run.threads=1", "--set", "checkpoint.keep_last=5", "--set", "logging.plots=true"]
    assert main(args) == 0
    assert "resuming" in capsys.readouterr().err
    np.testing.assert_array_equal(RunResults.load(out).matrix(), before)
    assert yaml.safe_load((out / "config.yaml").read_text())["eval"]["batch_size"] == 16


# ---------------------------------------------------- finished run, lost results
@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_resume_of_a_finished_run_rewrites_lost_results_from_the_checkpoint(copy_of, capsys, damage):
    path, out = copy_of
    expected = {name: (out / name).read_bytes() for name in ("metrics.json", "accuracy_matrix.csv")}
    matrix = RunResults.load(out).matrix()
    for name in ("metrics.json", "accuracy_matrix.csv", "summary.txt"):
        if damage == "deleted":
            (out / name).unlink()
        else:
            (out / name).write_bytes(b"{\x00 not what it was")
    assert main(["run", str(path), "--resume"]) == 0
    assert "Avg" in capsys.readouterr().out
    restored = RunResults.load(out)
    np.testing.assert_array_equal(restored.matrix(), matrix)
    assert restored.complete
    assert (out / "accuracy_matrix.csv").read_bytes() == expected["accuracy_matrix.csv"]
    assert (out / "summary.txt").read_text().startswith("tiny: 3/3 experiences")


# ------------------------------------------------------------------------ lock
def test_a_locked_run_folder_refuses_a_second_writer(copy_of, capsys):
    path, out = copy_of
    before = _snapshot(out)
    with FolderLock(out):
        assert main(["run", str(path), "--resume"]) == 2
        line = _one_error_line(capsys)
    assert "in use by another run" in line and str(out) in line
    assert _snapshot(out) == before
    assert main(["run", str(path), "--resume"]) == 0  # free again once the holder is gone


def test_two_processes_on_one_run_folder(tmp_path, data_root, capsys):
    """A real second process: the first run holds the lock while it trains."""
    cfg = tiny_config(data_root, tmp_path / "runs", train={"iterations": 400})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "runs" / "tiny"
    first = subprocess.Popen([sys.executable, "-m", "cl_proxyfda", "run", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not (out / "metrics.json").exists():  # row 0 is written under the lock
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        assert first.poll() is None, "the first run finished too early for this test"
        assert main(["run", str(path), "--resume"]) == 2
        assert "in use by another run" in _one_error_line(capsys)
    finally:
        first.kill()
        first.wait()


def test_lock_is_released_by_a_killed_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cl_proxyfda.runfolder import FolderLock; FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout.readline().strip() == b"held"
    with pytest.raises(UserError, match="in use by another run"):
        FolderLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    FolderLock(tmp_path).acquire().release()


def test_a_locked_comparison_folder_refuses_a_second_comparison(tmp_path, data_root):
    from cl_proxyfda.compare import run_comparison

    base = tiny_config(data_root, tmp_path / "unused", train={"iterations": 1})
    spec = {"name": "cmp", "base": base, "variants": [{"name": "naive"}]}
    out = tmp_path / "cmp"
    out.mkdir()
    with FolderLock(out):
        with pytest.raises(UserError, match="comparison folder: .* is in use by another run"):
            run_comparison(spec, out, log=lambda line: None)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# ---------------------------------------------------------------- output paths
def _bad_out(tmp_path: Path, data_root: Path, capsys, out: Path, name: str = "tiny") -> str:
    cfg = tiny_config(data_root, tmp_path / "unused", run={"name": name})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["run", str(path), "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == listing, "nothing may be written"
    return line


def test_dangling_symlink_as_output_folder(tmp_path, data_root, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    assert "is a symlink to" in _bad_out(tmp_path, data_root, capsys, tmp_path / "link")
    assert "does not exist" in _bad_out(tmp_path, data_root, capsys, tmp_path / "link" / "run")


def test_symlink_loop_as_output_folder(tmp_path, data_root, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert "symlink loop" in _bad_out(tmp_path, data_root, capsys, tmp_path / "a" / "run")


def test_output_folder_below_a_file(tmp_path, data_root, capsys):
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in _bad_out(tmp_path, data_root, capsys, tmp_path / "file" / "run")


def test_output_folder_that_cannot_be_created(tmp_path, data_root, capsys):
    # /sys/kernel refuses new folders even to root (a read-only folder for everyone)
    line = _bad_out(tmp_path, data_root, capsys, Path("/sys/kernel/cl-proxyfda-run"))
    assert "/sys/kernel" in line
    assert not Path("/sys/kernel/cl-proxyfda-run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the /sys case above covers root")
def test_read_only_folder(tmp_path, data_root, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert "not writable" in _bad_out(tmp_path, data_root, capsys, ro / "run")
    finally:
        ro.chmod(0o755)


def test_too_long_names(tmp_path, data_root, capsys):
    assert "more than a folder name may be" in _bad_out(tmp_path, data_root, capsys, tmp_path / ("x" * 300))
    line = _bad_out(tmp_path, data_root, capsys, tmp_path / "runs", name="r" * 300)
    assert line.startswith("error: run.name: must be at most 255 bytes")


# ---------------------------------------------------------------- checkpoints
def _edit_latest(out: Path, change) -> Path:
    path = ckpt.list_checkpoints(out / "checkpoints")[-1]
    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, path)
    return path


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda d: d.update(experience=-1), "'experience' must be a positive integer (got -1)"),
        (lambda d: d.update(experience=99), "says experience 99 but is named for experience 3"),
        (lambda d: d.pop("rng"), "the RNG state is missing"),
        (lambda d: d["rng"]["numpy"].update(key=torch.zeros(3)), "the RNG state is missing or malformed"),
        (lambda d: d.update(plugins=[1, 2]), "'plugins' is missing or not a dict"),
    ],
)
def test_hand_edited_checkpoint_is_not_trusted(copy_of, change, words):
    _, out = copy_of
    path = _edit_latest(out, change)
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ckpt.load_checkpoint_file(path)


def test_checkpoint_beyond_the_stream_is_refused(copy_of, capsys):
    path, out = copy_of
    latest = ckpt.list_checkpoints(out / "checkpoints")[-1]
    data = torch.load(latest, weights_only=True)
    data["experience"] = 99
    torch.save(data, out / "checkpoints" / "exp_099.pt")
    before = _snapshot(out)
    assert main(["run", str(path), "--resume"]) == 2
    assert "after experience 99, the stream has experiences 1..3" in _one_error_line(capsys)
    assert _snapshot(out) == before


def test_checkpoint_whose_rows_do_not_match_is_refused(copy_of, capsys):
    path, out = copy_of
    _edit_latest(out, lambda d: d["results"].update(rows=d["results"]["rows"][:2]))
    assert main(["run", str(path), "--resume"]) == 2
    assert "holds results that do not match experience 3" in _one_error_line(capsys)


def test_fifo_named_like_a_checkpoint_is_ignored(copy_of):
    path, out = copy_of
    os.mkfifo(out / "checkpoints" / "exp_009.pt")
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["exp_002.pt", "exp_003.pt"]
    with pytest.raises(UserError, match="not a regular file"):
        ckpt.load_checkpoint_file(out / "checkpoints" / "exp_009.pt")
    proc = subprocess.run([sys.executable, "-m", "cl_proxyfda", "run", str(path), "--resume"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------ what users see
def test_resume_without_a_checkpoint_says_it_starts_again(tmp_path, data_root, capsys):
    cfg = tiny_config(data_root, tmp_path / "runs", train={"iterations": 1}, checkpoint={"enabled": False})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resume: no checkpoint in" in err and "starting" in err and "again from the first experience" in err


def test_divergence_in_the_first_experience_says_no_checkpoint_exists(tmp_path, data_root, capsys):
    cfg = tiny_config(data_root, tmp_path / "runs", train={"lr": 1e30, "iterations": 20, "optimizer": "sgd"})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 3
    err = capsys.readouterr().err
    assert "experience 1, iteration" in err and "no checkpoint was written" in err and "is kept" not in err
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()


def test_interrupt_message_starts_on_its_own_line(tmp_path, data_root, capsys, monkeypatch):
    """Ctrl-C during training: the progress bar is cleared, the message is a line of its own."""
    from cl_proxyfda.training import CLStrategy

    cfg = tiny_config(data_root, tmp_path / "runs", train={"iterations": 30}, logging={"progress": True, "plots": False, "wandb": {"mode": "disabled"}})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    calls = {"n": 0}
    step = CLStrategy.optimizer_step

    def interrupted_step(self):  # the 12th optimizer step gets the KeyboardInterrupt
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        step(self)

    monkeypatch.setattr(CLStrategy, "optimizer_step", interrupted_step)
    assert main(["run", str(path)]) == 130
    err = capsys.readouterr().err
    assert "exp 1/3 warm" in err, "the progress bar was drawn"
    before, _, after = err.partition("interrupted; completed experiences are saved")
    assert after.strip() == "(use --resume)"
    assert before.endswith("\n") and before.rstrip("\n").endswith("\r"), repr(before[-80:])


def test_class_folders_with_colliding_prompts_are_refused(tmp_path, data_root, capsys):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    for split in ("train", "test"):
        shutil.copytree(root / "warm" / split / "red", root / "warm" / split / "Red")
    cfg = tiny_config(root, tmp_path / "runs")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 2
    line = _one_error_line(capsys)
    assert "class folders 'Red' and 'red' both give the class name 'red'" in line
    assert not (tmp_path / "runs").exists()
