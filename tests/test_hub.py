"""The real download path, offline: weights and pipelines from a hub cache the tests write.

Nothing here reaches the network. "No network" is an unreachable endpoint on the
loopback (port 9, connection refused); "offline mode" is ``HF_HUB_OFFLINE``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from cl_proxyfda.cli import main
from cl_proxyfda.errors import UserError
from cl_proxyfda.hub import HubFiles, availability, fetch, open_clip_files
from cl_proxyfda.models import create_clip, register_model_configs
from hub_cache import write_hub_folder, write_hub_repo

REPO_ROOT = Path(__file__).resolve().parents[1]
TAG_REPO = "cl-test/cl-test-tiny-hubtest"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache used by huggingface_hub for this test, offline mode on."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def no_network(monkeypatch):
    """Offline mode off, and the hub endpoint unreachable (refused on the loopback)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def hubtest_tag(monkeypatch):
    """Register a weights tag ``hubtest`` for the package's tiny model, stored on the hub
    like OpenAI's ViT-B/16 tag (a repository with a trailing slash, QuickGELU)."""
    register_model_configs()
    table = dict(open_clip.pretrained._PRETRAINED)
    table["cl-test-tiny"] = {"hubtest": open_clip.pretrained._pcfg(hf_hub=f"{TAG_REPO}/", quick_gelu=True)}
    monkeypatch.setattr(open_clip.pretrained, "_PRETRAINED", table)
    return "hubtest"


def tiny_weights(seed: int = 7, quick_gelu: bool = True) -> dict[str, torch.Tensor]:
    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model("cl-test-tiny", pretrained=None, force_quick_gelu=quick_gelu)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def safetensors_bytes(state: dict[str, torch.Tensor], tmp_path: Path) -> bytes:
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    return path.read_bytes()


def assert_same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def test_tag_weights_resolve_from_the_cache_offline(hub_cache, hubtest_tag, tmp_path):
    state = tiny_weights()
    write_hub_repo(hub_cache, TAG_REPO, {"open_clip_model.safetensors": safetensors_bytes(state, tmp_path)})
    model, _, _, _ = create_clip("cl-test-tiny", hubtest_tag)
    assert_same_weights(model, state)
    # The tag was trained with QuickGELU, so the model is built with it (open_clip only warns).
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_tag_weights_resolve_from_the_cache_without_network(hub_cache, hubtest_tag, no_network, tmp_path):
    state = tiny_weights(seed=3)
    write_hub_repo(hub_cache, TAG_REPO, {"open_clip_model.safetensors": safetensors_bytes(state, tmp_path)})
    model, _, _, _ = create_clip("cl-test-tiny", hubtest_tag)
    assert_same_weights(model, state)


def test_bin_weights_are_found_when_no_safetensors_twin_exists(hub_cache, hubtest_tag, tmp_path):
    state = tiny_weights(seed=5)
    path = tmp_path / "w.bin"
    torch.save(state, path)
    write_hub_repo(hub_cache, TAG_REPO, {"open_clip_pytorch_model.bin": path.read_bytes()})
    model, _, _, _ = create_clip("cl-test-tiny", hubtest_tag)
    assert_same_weights(model, state)


def test_hf_hub_model_name_resolves_config_and_weights_from_the_cache(hub_cache, tmp_path):
    register_model_configs()
    state = tiny_weights(seed=11, quick_gelu=False)
    config = {"model_cfg": open_clip.get_model_config("cl-test-tiny"), "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    write_hub_repo(
        hub_cache,
        "cl-test/tiny-clip",
        {"open_clip_config.json": json.dumps(config).encode(), "open_clip_model.safetensors": safetensors_bytes(state, tmp_path)},
    )
    model, _, preprocess_eval, _ = create_clip("hf-hub:cl-test/tiny-clip")
    assert_same_weights(model, state)
    normalize = preprocess_eval.transforms[-1]
    assert list(normalize.mean) == [0.5] * 3  # the repository's preprocessing, not the default


def test_missing_weights_offline_name_repo_file_and_remedy(hub_cache, hubtest_tag):
    with pytest.raises(UserError) as info:
        create_clip("cl-test-tiny", hubtest_tag)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("model.pretrained: cannot get the weights of cl-test-tiny (hubtest)")
    assert f"{TAG_REPO}/open_clip_model.safetensors or open_clip_pytorch_model.bin" in text
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in text and "cl-proxyfda prefetch" in text


def test_missing_weights_without_network_say_so(hub_cache, no_network):
    files = HubFiles("model.pretrained", "weights of X (y)", "cl-test/absent", (("model.safetensors",),))
    with pytest.raises(UserError, match=r"cl-test/absent/model.safetensors\): the hub could not be reached \(no network\?\)"):
        fetch(files)


def test_availability_reports_cached_downloadable_and_unreachable(hub_cache, hubtest_tag, monkeypatch, tmp_path):
    files = open_clip_files("cl-test-tiny", hubtest_tag)
    assert files is not None and files.repo_id == TAG_REPO
    usable, line = availability(files)
    assert not usable and "not in the local cache and offline mode is on" in line
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    usable, line = availability(files)
    assert usable and "the run will download" in line
    write_hub_repo(hub_cache, TAG_REPO, {"open_clip_model.safetensors": safetensors_bytes(tiny_weights(), tmp_path)})
    usable, line = availability(files)
    assert usable and "in the local cache" in line
    assert open_clip_files("cl-test-tiny", None) is None
    vitb16 = open_clip_files("ViT-B-16", "openai")
    assert vitb16 is not None and vitb16.repo_id == "timm/vit_base_patch16_clip_224.openai"


def write_run_file(tmp_path: Path, model: dict, strategies: list | None = None) -> Path:
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["model"].update(model)
    cfg["run"]["output_dir"] = str(tmp_path / "runs")
    cfg["logging"] = {"wandb": {"mode": "disabled"}, "plots": False, "progress": False}
    if strategies is not None:
        cfg["strategies"] = strategies
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_prefetch_then_offline_for_weights_and_pipeline(hub_cache, hubtest_tag, tiny_pipe, tmp_path, capsys):
    gift = {"name": "gift", "generator": {"name": "diffusers", "model": "cl-test/tiny-sd", "steps": 2}, "images_per_experience": 4}
    run_file = write_run_file(tmp_path, {"name": "cl-test-tiny", "pretrained": hubtest_tag}, [gift])
    # Nothing cached: each missing item is listed with its repository, exit 2.
    assert main(["prefetch", str(run_file)]) == 2
    err = capsys.readouterr().err
    assert f"FAIL model cl-test-tiny (hubtest): model.pretrained: cannot get the weights of cl-test-tiny (hubtest) ({TAG_REPO}/" in err
    assert "FAIL strategies[0] gift pipeline cl-test/tiny-sd: generator.model: cannot get the text-to-image pipeline cl-test/tiny-sd" in err
    assert "error: 2 of 4 items could not be fetched" in err
    # As a login node would leave it: both in the hub cache.
    write_hub_repo(hub_cache, TAG_REPO, {"open_clip_model.safetensors": safetensors_bytes(tiny_weights(), tmp_path)})
    snapshot = write_hub_folder(hub_cache, "cl-test/tiny-sd", tiny_pipe)
    assert main(["prefetch", str(run_file)]) == 0
    out = capsys.readouterr().out
    assert f"ok   model cl-test-tiny (hubtest): hub file {TAG_REPO}/" in out
    assert f"ok   strategies[0] gift pipeline cl-test/tiny-sd: hub repository cl-test/tiny-sd -> {snapshot}" in out
    assert f"ok: everything {run_file} needs is on this machine; it can run offline" in out
    # The pipeline then loads through the real diffusers path, offline, by hub id.
    from cl_proxyfda.generators.diffusers_backend import DiffusersGenerator

    images = DiffusersGenerator("cl-test/tiny-sd", steps=2, batch_size=2, device="cpu", drop_black=False, progress=False).generate(["a red circle"], [0])
    assert len(images) == 1


def test_validate_reports_weights_and_lists_every_problem(hub_cache, hubtest_tag, tmp_path, capsys):
    run_file = write_run_file(tmp_path, {"name": "cl-test-tiny", "pretrained": hubtest_tag})
    assert main(["validate", str(run_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.pretrained: weights of cl-test-tiny (hubtest)") and "not in the local cache" in err[0]
    write_hub_repo(hub_cache, TAG_REPO, {"open_clip_model.safetensors": safetensors_bytes(tiny_weights(), tmp_path)})
    assert main(["validate", str(run_file)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and "  weights: weights of cl-test-tiny (hubtest): in the local cache" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("stream: {name: demo}\ntrainx: {}\nrun: {seed: zero}\n")
    assert main(["validate", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert sorted(lines) == sorted(
        ["error: run.seed: Input should be a valid integer, unable to parse string as an integer (got 'zero')",
         "error: model: required key is missing", "error: trainx: unknown key"]
    )


def test_the_issue_command_fails_with_one_honest_line(tmp_path):
    """`run` with OpenAI weights on a machine without them: one line, exit 2, nothing written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "cl_proxyfda", "run", str(REPO_ROOT / "configs" / "quickstart.yaml"), "--set", "model.name=ViT-B-16",
         "--set", "model.pretrained=openai", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: model.pretrained: cannot get the weights of ViT-B-16 (openai) (timm/vit_base_patch16_clip_224.openai/")
    assert "ERROR:root" not in proc.stderr and not out.exists()


def test_the_package_never_switches_offline_mode_on(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["list"]) == 0
    assert "HF_HUB_OFFLINE" not in os.environ
    for path in list((REPO_ROOT / "cl_proxyfda").rglob("*.py")) + [p for d in ("strategies", "benchmarks", "generators") for p in (REPO_ROOT / d).rglob("*.py")]:
        text = path.read_text()
        assert 'environ.setdefault("HF_HUB_OFFLINE"' not in text and 'environ["HF_HUB_OFFLINE"]' not in text, path
