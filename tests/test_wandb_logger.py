"""The project's W&B logger, on real offline wandb runs read back with `wandb leet`."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cl_proxyfda.errors import ConfigError
from cl_proxyfda.results import RunResults
from cl_proxyfda.wandb_logger import WandbLogger

TASKS = ["aircraft", "caltech", "cifar"]
ROWS = [[10.0, 20.0, 30.0], [60.0, 25.0, 31.0], [50.0, 70.0, 32.0], [40.0, 60.0, 80.0]]
CONTROL = [50.0, 48.0, 47.0, 45.0]
# Nothing listens on port 9 of the loopback: connections are refused at once.
UNREACHABLE = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_BASE_URL", UNREACHABLE)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def wandb_cli() -> list[str]:
    """The wandb command line: the script beside this Python, else ``python -m wandb``
    (a venv that reaches wandb through another environment's site-packages has no script)."""
    beside = Path(sys.executable).with_name("wandb")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "wandb"]


def inspect_records(run_dir: Path) -> list[dict]:
    out = subprocess.run([*wandb_cli(), "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def inspect_summary(run_dir: Path) -> dict:
    out = subprocess.run([*wandb_cli(), "leet", "inspect", "--summary", "--json", str(run_dir)],
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def hand_results() -> RunResults:
    return RunResults(TASKS, meta={"run_name": "hand", "seed": 7, "trainable_params": 1234})


def test_offline_run_logs_rows_and_final(tmp_path):
    run_dir = tmp_path / "run"
    results = hand_results()
    config = {"lr": 1e-5, "strategies": ["proxy_fda", "gift"], "out": tmp_path}
    logger = WandbLogger(run_dir, "cl-test", config=config, name="hand-run", group="g")
    assert logger.mode == "offline"
    for i, row in enumerate(ROWS):
        results.add_row(row, control=CONTROL[i], diagnostics={"feature_distance": 0.25 * i},
                        extra={"retrieval_map": [v / 2 for v in row]})
        logger.log_row(results, i, global_step=10 * i)
        logger.log_training({"loss": 1.0 / (i + 1), "loss/proxy_fda": 0.1}, step=10 * i + 5)
    logger.log_final(results, config={"final_note": "done"})
    logger.finish()
    logger.finish()  # idempotent

    local = logger.local_dir
    assert local is not None and local.parent == run_dir / "wandb"
    assert len(list(local.glob("*.wandb"))) == 1

    records = inspect_records(local)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    per_exp = {h["experience"]: h for h in history if "acc/aircraft" in h}
    assert sorted(per_exp) == [0, 1, 2, 3]
    assert per_exp[0]["acc/caltech"] == 20
    assert per_exp[0]["acc_all_mean"] == pytest.approx(20.0)
    assert "acc_new_task" not in per_exp[0] and "acc_seen_mean" not in per_exp[0]
    assert per_exp[2]["acc_new_task"] == 70
    assert per_exp[2]["acc_seen_mean"] == pytest.approx(60.0)  # (50 + 70) / 2
    assert per_exp[3]["acc/cifar"] == 80
    assert per_exp[3]["control_acc"] == 45
    assert per_exp[3]["diag/feature_distance"] == pytest.approx(0.75)
    assert per_exp[3]["retrieval_map/cifar"] == pytest.approx(40.0)
    train = [h for h in history if "train/loss" in h]
    assert [h["global_step"] for h in train] == [5, 15, 25, 35]
    assert [per_exp[i]["global_step"] for i in range(4)] == [0, 10, 20, 30]  # evaluation on the same axis
    assert train[1]["train/loss"] == pytest.approx(0.5)
    assert train[1]["train/loss_proxy_fda"] == pytest.approx(0.1)

    metric_defs = {r["metric"].get("glob_name") or r["metric"].get("name"): r["metric"]
                   for r in records if r["type"] == "metric"}
    assert metric_defs["acc/*"]["step_metric"] == "experience"
    assert metric_defs["retrieval_map/*"]["step_metric"] == "experience"
    assert metric_defs["train/*"]["step_metric"] == "global_step"

    info = inspect_summary(local)
    assert info["state"] == "finished" and info["exit_code"] == 0
    assert info["name"] == "hand-run" and info["project"] == "cl-test"
    summary = info["summary"]
    # Hand values (see test_metrics): Transfer 28.25, Avg 448/9, Last 60, BWT -15.
    assert summary["transfer"] == pytest.approx(28.25)
    assert summary["avg"] == pytest.approx(448 / 9)
    assert summary["last"] == pytest.approx(60.0)
    assert summary["bwt"] == pytest.approx(-15.0)
    assert summary["forgetting_max_per_task"] == [20, 10]
    assert summary["control_drop"] == pytest.approx(5.0)
    assert summary["complete"] is True
    assert summary["extra/retrieval_map/last"] == pytest.approx(30.0)
    assert summary["accuracy_matrix"]["_type"] == "table-file"
    assert summary["accuracy_matrix"]["nrows"] == 4
    assert summary["stability_plasticity_table"]["_type"] == "table-file"

    table = json.loads((local / "files" / summary["accuracy_matrix"]["path"]).read_text())
    assert table["columns"] == ["row", "after", *TASKS, "control"]
    assert table["data"][3] == [3, "cifar", 40, 60, 80, 45]
    assert table["data"][0][1] == "zero-shot"

    cfg = info["config"]
    assert cfg["lr"] == pytest.approx(1e-5)
    assert cfg["strategies"] == ["proxy_fda", "gift"]
    assert cfg["out"] == str(tmp_path)
    assert cfg["final_note"] == "done"
    assert cfg["meta"] == {"run_name": "hand", "seed": 7, "trainable_params": 1234}


def test_control_probe_is_logged_per_row(tmp_path):
    results = hand_results()
    logger = WandbLogger(tmp_path / "run", "cl-test", name="probe-run")
    probe = [90.0, 85.0, 80.0, 70.0]
    for i, row in enumerate(ROWS):
        results.add_row(row, control=CONTROL[i], control_probe=probe[i])
        logger.log_row(results, i)
    logger.log_final(results)
    logger.finish()
    records = inspect_records(logger.local_dir)
    per_exp = {h["experience"]: h for h in (r["history"]["item"] for r in records if r["type"] == "history") if "acc/aircraft" in h}
    assert [per_exp[i]["control_probe"] for i in range(4)] == probe
    summary = inspect_summary(logger.local_dir)["summary"]
    assert summary["control_probe_drop"] == pytest.approx(20.0) and summary["control_probe_last"] == pytest.approx(70.0)
    table = json.loads((logger.local_dir / "files" / summary["accuracy_matrix"]["path"]).read_text())
    assert table["columns"] == ["row", "after", *TASKS, "control", "control_probe"]
    assert table["data"][3] == [3, "cifar", 40, 60, 80, 45, 70]


def test_partial_run_and_images(tmp_path):
    from cl_proxyfda import plots

    results = hand_results()
    results.add_row(ROWS[0])  # zero-shot only: no curves yet, no control set
    with WandbLogger(tmp_path, "cl-test") as logger:
        logger.log_row(results, 0)
        images = plots.render_all(results, tmp_path)
        logger.log_final(results, images=images[:1])
    summary = inspect_summary(logger.local_dir)["summary"]
    assert summary["complete"] is False and summary["experiences_done"] == 0
    assert "transfer" not in summary  # undefined before the first experience
    assert summary["last"] == pytest.approx(20.0)
    assert "stability_plasticity_table" not in summary
    assert summary["plots/accuracy_matrix"]["_type"] == "image-file"
    assert "control_acc" not in summary


def _fallback(tmp_path, caplog) -> WandbLogger:
    caplog.set_level(logging.WARNING, logger="cl_proxyfda.wandb_logger")
    logger = WandbLogger(tmp_path / "run", "cl-test", mode="online", init_timeout=3)
    ours = [r for r in caplog.records if r.name == "cl_proxyfda.wandb_logger"]
    assert len(ours) == 1 and ours[0].levelno == logging.WARNING
    assert "could not start in online mode" in ours[0].getMessage()
    assert "continuing in offline mode" in ours[0].getMessage()
    assert logger.requested_mode == "online" and logger.mode == "offline"
    results = hand_results()
    results.add_row(ROWS[0])
    logger.log_row(results, 0)
    logger.finish()
    assert logger.local_dir.name.startswith("offline-run-")
    history = [r for r in inspect_records(logger.local_dir) if r["type"] == "history"]
    assert history[0]["history"]["item"]["acc/aircraft"] == 10
    return logger


def test_online_without_api_key_falls_back_to_offline(tmp_path, caplog):
    # No key anywhere (the config dir is empty, the server is unreachable).
    _fallback(tmp_path, caplog)


def test_online_with_unreachable_server_falls_back_after_timeout(tmp_path, monkeypatch, caplog):
    import time

    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a well-formed but useless key
    start = time.monotonic()
    _fallback(tmp_path, caplog)
    assert time.monotonic() - start < 30  # init_timeout (3 s) bounds the wait


def test_disabled_mode_writes_nothing(tmp_path):
    results = hand_results()
    results.add_row(ROWS[0])
    logger = WandbLogger(tmp_path / "run", "cl-test", mode="disabled", config={"a": 1})
    assert logger.mode == "disabled" and logger.local_dir is None
    logger.log_row(results, 0)
    logger.log_training({"loss": 1.0}, step=0)
    logger.log_final(results)
    logger.finish()
    assert list((tmp_path / "run").iterdir()) == []


def test_unknown_mode_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="wandb.mode"):
        WandbLogger(tmp_path, "cl-test", mode="shared")
