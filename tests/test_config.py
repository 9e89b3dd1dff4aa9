"""Config validation: one-line errors naming the key path, exit code 2, nothing written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cl_proxyfda.cli import main
from cl_proxyfda.config import apply_overrides, load_config, parse_config
from cl_proxyfda.errors import ConfigError
from conftest import tiny_config


def write(tmp_path: Path, data: dict | str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


BAD_CASES = [
    # (description, mutation of the config mapping, expected key path, expected words)
    ("unknown top-level key", lambda c: c.update(trian={"lr": 1}), "trian", "unknown key"),
    ("unknown nested key", lambda c: c["train"].update(learning_rate=1), "train.learning_rate", "unknown key"),
    ("wrong type", lambda c: c["train"].update(batch_size="big"), "train.batch_size", "integer"),
    ("negative lr", lambda c: c["train"].update(lr=-1e-3), "train.lr", "greater than 0"),
    ("zero iterations", lambda c: c["train"].update(iterations=0), "train.iterations", "greater than 0"),
    ("bad device", lambda c: c["run"].update(device="tpu"), "run.device", "cpu"),
    ("missing model", lambda c: c.pop("model"), "model", "required"),
    ("unknown strategy", lambda c: c.update(strategies=[{"name": "nope"}]), "strategies[0].name", "unknown strategy 'nope'"),
    ("bad strategy arg", lambda c: c.update(strategies=[{"name": "l2sp", "weight": -1}]), "strategies[0].weight", "greater than or equal to 0"),
    ("unknown strategy arg", lambda c: c.update(strategies=[{"name": "l2sp", "wieght": 1}]), "strategies[0].wieght", "unknown key"),
    ("unknown stream", lambda c: c.update(stream={"name": "imagenet21k"}), "stream.name", "unknown stream"),
    ("epochs and iterations", lambda c: c["train"].update(epochs=2), "train.epochs", "either"),
    ("class-balanced batch mismatch", lambda c: c["train"].update(sampler="class_balanced", classes_per_batch=2, images_per_class=2), "train.batch_size", "class_balanced"),
    ("bad lr override", lambda c: c["train"].update(lr_per_task={"warm": 0}), "train.lr_per_task", "must be > 0"),
    ("run name with slash", lambda c: c["run"].update(name="a/b"), "run.name", "plain folder name"),
    ("removed key", lambda c: c["eval"].update(every_experience=True), "eval.every_experience", "was removed"),
    ("zero train_every", lambda c: c["logging"].update(train_every=0), "logging.train_every", "greater than or equal to 1"),
]


@pytest.mark.parametrize("desc,mutate,path,words", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_config_is_one_line_exit_2_nothing_written(tmp_path, tiny_stream_root, capsys, desc, mutate, path, words):
    out = tmp_path / "runs"
    cfg = tiny_config(tiny_stream_root, out)
    mutate(cfg)
    code = main(["run", str(write(tmp_path, cfg))])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {path}:"), err
    assert words in err, err
    assert not out.exists()


def test_missing_data_root_names_the_path(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "nowhere", tmp_path / "runs")
    code = main(["run", str(write(tmp_path, cfg))])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_missing_checkpoint_file_names_it(tmp_path, tiny_stream_root, capsys):
    cfg = tiny_config(tiny_stream_root, tmp_path / "runs", model={"pretrained": str(tmp_path / "missing.safetensors")})
    code = main(["run", str(write(tmp_path, cfg))])
    err = capsys.readouterr().err
    assert code == 2 and "model.pretrained" in err and "missing.safetensors" in err


def test_unknown_model_name(tmp_path, tiny_stream_root, capsys):
    cfg = tiny_config(tiny_stream_root, tmp_path / "runs", model={"name": "ViT-Z-99"})
    assert main(["run", str(write(tmp_path, cfg))]) == 2
    assert "model.name: unknown open_clip model 'ViT-Z-99'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,words",
    [
        ("run: [unclosed\n", "not valid YAML at line"),
        ("!!python/object/apply:os.system ['echo hacked']\n", "not valid YAML"),
        ("", "is empty"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_unreadable_yaml(tmp_path, capsys, text, words):
    code = main(["validate", str(write(tmp_path, text))])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_non_utf8_file(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run: {name: caf\xe9}\n".encode("latin-1"))
    assert main(["validate", str(path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_overrides_are_validated_and_applied(tmp_path, tiny_stream_root):
    path = write(tmp_path, tiny_config(tiny_stream_root, tmp_path / "runs"))
    cfg = load_config(path, ["train.lr=0.01", "strategies.0.name=l2sp", "run.seed=7"])
    assert cfg.train.lr == 0.01 and cfg.strategies[0].name == "l2sp" and cfg.run.seed == 7
    with pytest.raises(ConfigError, match=r"^train\.lr: "):
        load_config(path, ["train.lr=-5"])
    with pytest.raises(ConfigError, match="--set"):
        apply_overrides({}, ["novalue"])


def test_override_error_through_cli(tmp_path, tiny_stream_root, capsys):
    path = write(tmp_path, tiny_config(tiny_stream_root, tmp_path / "runs"))
    assert main(["run", str(path), "--set", "train.batch_size=zero"]) == 2
    assert "train.batch_size" in capsys.readouterr().err


def test_defaults_fill_in(tmp_path, tiny_stream_root):
    cfg = parse_config({"model": {"name": "cl-test-tiny"}, "stream": {"name": "image_folder", "root": str(tiny_stream_root)}})
    assert cfg.strategies[0].name == "naive"
    assert cfg.logging.wandb.mode == "offline"
    assert cfg.train.optimizer == "adamw"


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    path = write(tmp_path, {"model": {"name": "cl-test-tiny"}, "stream": {"name": "image_folder", "root": str(tmp_path)}, "bogus": 1})
    proc = subprocess.run([sys.executable, "-m", "cl_proxyfda", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: bogus: unknown key"
    assert "Traceback" not in proc.stderr


def test_auto_sampler_is_class_balanced_for_fda_runs_only(tmp_path):
    from cl_proxyfda.config import parse_config

    base = {"model": {"name": "cl-test-tiny"}, "stream": {"name": "demo"}, "train": {"batch_size": 32}}
    assert parse_config({**base, "strategies": [{"name": "naive"}]}).sampler_layout() == ("random", 8, 4)
    assert parse_config({**base, "strategies": [{"name": "l2sp"}, {"name": "proxy_fda"}]}).sampler_layout() == ("class_balanced", 8, 4)
    odd = {**base, "train": {"batch_size": 30}, "strategies": [{"name": "fda", "k": 8}]}
    assert parse_config(odd).sampler_layout()[0] == "random"  # 30 does not split into classes of 4
    pinned = {**base, "train": {"batch_size": 32, "sampler": "random"}, "strategies": [{"name": "fda"}]}
    assert parse_config(pinned).sampler_layout()[0] == "random"


def test_removed_key_says_why_also_through_set_and_validate(tmp_path, tiny_stream_root, capsys):
    path = write(tmp_path, tiny_config(tiny_stream_root, tmp_path / "runs"))
    with pytest.raises(ConfigError) as err:
        load_config(path, ["eval.every_experience=false"])
    assert str(err.value) == (
        "eval.every_experience: was removed: it was never read, and evaluation runs after every experience always; delete the key"
    )
    assert main(["validate", str(path), "--set", "eval.every_experience=true"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"error: {err.value}"]
    assert "every_experience" not in parse_config(tiny_config(tiny_stream_root, tmp_path)).to_dict()["eval"]
