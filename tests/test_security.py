"""Security: safe YAML, weights-only checkpoints, no config-driven code execution."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cl_proxyfda.checkpoint import load_checkpoint_file
from cl_proxyfda.yaml_files import read_yaml
from cl_proxyfda.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("cl_proxyfda", "strategies", "benchmarks", "generators") for p in (REPO / d).rglob("*.py")]
MARKER = Path("/tmp/cl_proxyfda_security_marker")


class Exploit:
    """Unpickling this would create a marker file."""

    def __reduce__(self):
        return (MARKER.write_text, ("pwned",))


def test_yaml_object_tags_are_not_executed(tmp_path):
    MARKER.unlink(missing_ok=True)
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"!!python/object/apply:pathlib.Path.write_text [!!python/object/apply:pathlib.Path ['{MARKER}'], 'x']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        read_yaml(cfg)
    assert not MARKER.exists()


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    MARKER.unlink(missing_ok=True)
    path = tmp_path / "exp_001.pt"
    torch.save({"format": 1, "model": {}, "payload": Exploit()}, path)
    with pytest.raises(UserError, match="exp_001.pt"):
        load_checkpoint_file(path)
    assert not MARKER.exists()


def test_model_weights_loader_refuses_pickled_code(tmp_path):
    from cl_proxyfda.models import create_clip

    MARKER.unlink(missing_ok=True)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"x": Exploit()}}, path)
    with pytest.raises(Exception):
        create_clip("cl-test-tiny", str(path))
    assert not MARKER.exists()


@pytest.mark.parametrize("pattern", [r"(?<![\w.])eval\(", r"(?<![\w.])exec\(", r"__import__\(", r"import_module\(", r"yaml\.load\(", r"yaml\.unsafe_load", r"pickle\.loads?\("])
def test_no_dynamic_code_paths_in_the_package(pattern):
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in SOURCES for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert offenders == []


def test_every_torch_load_is_weights_only():
    offenders = []
    for p in SOURCES:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{p.relative_to(REPO)}:{i}")
    assert offenders == []


def test_registry_names_are_looked_up_not_imported():
    from cl_proxyfda.config import parse_config

    with pytest.raises(UserError, match="unknown strategy 'os.system'"):
        parse_config({"model": {"name": "cl-test-tiny"}, "stream": {"name": "image_folder", "root": "."}, "strategies": [{"name": "os.system"}]})
