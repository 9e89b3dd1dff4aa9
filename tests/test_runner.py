"""The runner end to end: files written, W&B offline run, report/validate/list commands."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cl_proxyfda.cli import main
from cl_proxyfda.config import parse_config
from cl_proxyfda.metrics import summarize
from cl_proxyfda.runner import build_run, execute
from conftest import TINY_TASKS, tiny_config, write_image_folder_stream
from test_wandb_logger import wandb_cli


@pytest.fixture
def stream_with_control(tmp_path: Path) -> Path:
    root = write_image_folder_stream(tmp_path / "data", {**TINY_TASKS})
    write_image_folder_stream(root, {"basics": ["red", "blue", "green", "gray"]}, seed=5)
    return root


def _leet(*args: str) -> list[dict]:
    proc = subprocess.run([*wandb_cli(), "leet", "inspect", "--json", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip().startswith("{")]


def test_full_run_writes_everything_and_logs_to_wandb(tmp_path, stream_with_control, capsys):
    cfg = tiny_config(
        stream_with_control,
        tmp_path / "runs",
        stream={"control": "basics"},
        logging={"wandb": {"mode": "offline", "project": "tests"}, "plots": True, "progress": True},
        train={"iterations": 3, "warmup": 1},
    )
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(cfg_path)]) == 0
    captured = capsys.readouterr()
    out = tmp_path / "runs" / "tiny"
    for name in ("config.yaml", "metrics.json", "accuracy_matrix.csv", "summary.txt", "accuracy_matrix.png", "stability_plasticity.png"):
        assert (out / name).is_file(), name
    assert "Transfer" in captured.out and "exp 1/3 warm" in captured.err  # summary table and tqdm bar
    metrics = json.loads((out / "metrics.json").read_text())
    matrix = np.array(metrics["rows"])
    assert matrix.shape == (4, 3)
    assert len(metrics["control"]) == 4
    # summary equals the metric functions on the saved matrix
    expected = summarize(matrix, metrics["control"])
    for key in ("transfer", "avg", "last", "bwt", "control_drop"):
        assert metrics["summary"][key] == pytest.approx(expected[key])
    # control-set diagnostics recorded at every row (row 0: no drift from the pre-trained model)
    assert metrics["diagnostics"][0]["control_feature_l2"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["diagnostics"][3]["control_feature_l2"] > 0
    # resolved config round-trips through the schema
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert parse_config(saved).train.iterations == 3
    # the W&B offline run holds the per-experience scalars against `experience`
    wandb_files = list(out.rglob("*.wandb"))
    assert len(wandb_files) == 1
    records = _leet(str(wandb_files[0]))
    history = [r for r in records if r.get("type") == "history"]
    assert history, records[:3]
    text = json.dumps(history)
    for key in ("acc/warm", "acc/cool", "control_acc", "experience"):
        assert key in text
    # report re-renders from the saved files
    (out / "accuracy_matrix.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "accuracy_matrix.png").is_file()
    assert "Transfer" in capsys.readouterr().out


def test_validate_and_list(tmp_path, stream_with_control, capsys):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(stream_with_control, tmp_path / "runs")))
    assert main(["validate", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok:") and "3 tasks" in out and "warm (3)" in out
    assert not (tmp_path / "runs").exists()
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    for name in ("naive", "l2sp", "ldifs", "lwf", "ewc", "wiseft", "image_folder", "mtil", "cl-test-tiny"):
        assert name in listing


def test_epochs_budget_and_label_smoothing(tmp_path, tiny_stream_root):
    cfg = parse_config(tiny_config(tiny_stream_root, tmp_path / "runs", train={"iterations": None, "epochs": 2, "batch_size": 4, "label_smoothing": 0.2}))
    run = build_run(cfg)
    execute(run)
    # steps per experience = epochs x ceil(train images / batch)
    assert run.strategy.total_steps == 6  # last task: 2 classes x 6 images, batch 4 -> 3 steps x 2 epochs
    assert run.strategy._criterion.label_smoothing == pytest.approx(0.2)


def test_lr_schedule_warmup_then_cosine():
    from cl_proxyfda.training import warmup_cosine

    assert [round(warmup_cosine(s, 10, 2, "cosine"), 4) for s in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.5, round(0.5 * (1 + np.cos(np.pi * 7 / 8)), 4)]
    assert warmup_cosine(5, 10, 0, "constant") == 1.0


def test_per_task_lr_and_only_trainable_params_in_optimizer(tmp_path, tiny_stream_root):
    cfg = parse_config(tiny_config(tiny_stream_root, tmp_path / "runs", train={"iterations": 2, "lr": 1e-3, "lr_per_task": {"cool": 5e-3}, "schedule": "constant"}))
    run = build_run(cfg)
    lrs = []

    from avalanche.core import SupervisedPlugin

    class Spy(SupervisedPlugin):
        def before_training_iteration(self, strategy, **kw):
            lrs.append(strategy.optimizer.param_groups[0]["lr"])
            n_opt = sum(p.numel() for g in strategy.optimizer.param_groups for p in g["params"])
            assert n_opt == sum(p.numel() for p in strategy.model.parameters() if p.requires_grad)

    run.strategy.plugins.append(Spy())
    execute(run)
    assert lrs == [1e-3, 1e-3, 5e-3, 5e-3, 1e-3, 1e-3]
    # the text tower is frozen by default
    assert not any(p.requires_grad for n, p in run.model.clip.named_parameters() if not n.startswith("visual."))


def test_nan_loss_stops_with_experience_and_iteration(tmp_path, tiny_stream_root, capsys):
    # experience 1 trains normally; the huge SGD rate of the second task blows the loss up
    cfg = tiny_config(tiny_stream_root, tmp_path / "runs", train={"lr": 1e-3, "lr_per_task": {"cool": 1e30}, "iterations": 20, "optimizer": "sgd"})
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    code = main(["run", str(cfg_path)])
    err = capsys.readouterr().err
    assert code == 3
    assert "training diverged" in err and "experience 2, iteration" in err and "loss became" in err
    out = tmp_path / "runs" / "tiny"
    # the last good checkpoint (after experience 1) is intact and the results stop at row 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["exp_001.pt"]
    state = torch.load(out / "checkpoints" / "exp_001.pt", weights_only=True)
    assert state["experience"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if torch.is_floating_point(v))
    assert len(json.loads((out / "metrics.json").read_text())["rows"]) == 2


# The README's demo stream and model take about a minute here: the test runs the README's
# block itself with only these two calls swapped for the tiny image-folder stream and model.
README_SWAPS = {
    'STREAMS.build("demo", {"seed": 0})': 'STREAMS.build("image_folder", {"root": TINY_ROOT})',
    'build_task_model("demo-clip-tiny", "demo",': 'build_task_model("cl-test-tiny", None,',
}


def readme_python_block() -> str:
    """The README's ``python`` block that composes plugins on a SupervisedTemplate."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M) if "SupervisedTemplate(" in b]
    assert len(blocks) == 1, f"expected one python block composing a SupervisedTemplate in README.md, found {len(blocks)}"
    return blocks[0]


def test_readme_python_example_runs(tiny_stream_root):
    """The README's composition of plugins on a plain Avalanche SupervisedTemplate, as written there."""
    code = readme_python_block()
    for old, new in README_SWAPS.items():
        assert code.count(old) == 1, f"README's python block no longer has {old!r}"
        code = code.replace(old, new)
    namespace: dict = {"TINY_ROOT": str(tiny_stream_root)}
    exec(compile(code, "README.md:python", "exec"), namespace)
    strategy, model = namespace["strategy"], namespace["model"]
    before = strategy.teachers.initial_state
    assert strategy.clock.train_exp_counter == len(namespace["stream"].tasks) == 3  # every experience trained
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the weights moved
    ldifs, l2sp = strategy.plugins[:2]
    assert ldifs.loss_terms["ldifs"] > 0 and l2sp.loss_terms["l2sp"] > 0  # both regularisers took part
    assert math.isfinite(float(strategy.loss))


def test_wandb_online_without_key_falls_back_to_offline_and_the_run_goes_on(tmp_path, tiny_stream_root, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    cfg = tiny_config(tiny_stream_root, tmp_path / "runs", logging={"wandb": {"mode": "online", "project": "nokey"}, "plots": False, "progress": False}, train={"iterations": 1})
    with caplog.at_level("WARNING"):
        results = execute(build_run(parse_config(cfg)))
    assert results.complete
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "wandb" in r.getMessage().lower()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert len(list((tmp_path / "runs" / "tiny").rglob("*.wandb"))) == 1  # logged offline instead


def test_cli_prints_the_wandb_fallback_warning_on_one_line(tmp_path, tiny_stream_root):
    """`cl-proxyfda run` with W&B online and no server: the package's warning reaches the
    terminal (the root logger stays at ERROR for third-party lines); the run goes on."""
    cfg = tiny_config(tiny_stream_root, tmp_path / "runs", logging={"wandb": {"mode": "online", "project": "nonet"}}, train={"iterations": 1})
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="online", WANDB_BASE_URL="http://127.0.0.1:9", WANDB_SILENT="true",  # nothing listens on port 9
               **{var: str(tmp_path / var.lower()) for var in ("WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR")})
    proc = subprocess.run([sys.executable, "-m", "cl_proxyfda", "run", str(cfg_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(ours) == 1, proc.stderr
    assert "W&B could not start in online mode" in ours[0] and "continuing in offline mode" in ours[0]
    assert "error in wandb.init" not in proc.stderr  # W&B's own line for the same event is held back
    assert len(list((tmp_path / "runs" / "tiny").rglob("*.wandb"))) == 1


def test_logging_configuration_lets_package_and_wandb_warnings_through(capsys):
    import logging

    from cl_proxyfda.cli import configure_logging

    root, levels = logging.getLogger(), {n: logging.getLogger(n).level for n in ("", "cl_proxyfda")}
    handlers = {n: list(logging.getLogger(n).handlers) for n in ("", "wandb")}
    try:
        configure_logging()
        configure_logging()  # idempotent: one line per record, not two
        logging.getLogger("cl_proxyfda.runner").warning("ours\nsecond line")
        logging.getLogger("wandb").warning("from wandb")
        logging.getLogger("wandb").info("wandb chatter")
        logging.getLogger("urllib3.connectionpool").warning("third-party retry")
        logging.getLogger("cl_proxyfda.runner").info("our chatter")
        assert capsys.readouterr().err.splitlines() == ["warning: ours\\nsecond line", "warning: from wandb"]
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name, kept in handlers.items():
            logging.getLogger(name).handlers[:] = kept
    assert root.level == levels[""]


def test_saved_config_is_resolved_with_component_defaults(tmp_path, tiny_stream_root):
    implicit = parse_config(tiny_config(tiny_stream_root, tmp_path / "a", strategies=[{"name": "l2sp"}]))
    explicit = parse_config(tiny_config(tiny_stream_root, tmp_path / "a", strategies=[{"name": "l2sp", "weight": 0.5, "anchor": "pretrained"}]))
    assert implicit.to_dict()["strategies"] == explicit.to_dict()["strategies"] == [{"name": "l2sp", "weight": 0.5, "anchor": "pretrained"}]
    assert implicit.to_dict()["stream"]["verify_images"] is True
    assert parse_config(implicit.to_dict()).to_dict() == implicit.to_dict()  # round-trips through the schema


def test_readme_new_method_example_registers_a_plugin(monkeypatch):
    """The README's 'add a method' block, run against a fresh registry (the real one stays as it is)."""
    from cl_proxyfda import registry

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M) if "STRATEGIES.register(" in b]
    assert len(blocks) == 1
    fresh = registry.Registry("strategy")
    monkeypatch.setattr(registry, "STRATEGIES", fresh)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md:python", "exec"), namespace)
    assert fresh.names() == ["my_method"]
    plugin = fresh.build("my_method", {"weight": 2.0})
    assert plugin.params.weight == 2.0 and plugin.name == "my_method"
    with pytest.raises(Exception, match="greater than or equal to 0"):
        namespace["MyPlugin"](weight=-1.0)
