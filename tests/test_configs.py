"""Every shipped config parses; the MTIL configs build their real architecture from random weights."""
from __future__ import annotations

from pathlib import Path

import pytest

from cl_proxyfda.config import apply_overrides, load_config, parse_config
from cl_proxyfda.yaml_files import read_yaml
from cl_proxyfda.models import build_task_model

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.name.startswith("compare")], ids=lambda p: p.stem)
def test_shipped_run_configs_parse(path):
    cfg = load_config(path)
    assert cfg.strategies


def test_mtil_proxyfda_config_builds_vit_b16_from_random_weights():
    path = next(p for p in CONFIGS if p.name == "mtil_order1_proxyfda.yaml")
    cfg = parse_config(apply_overrides(read_yaml(path), ["model.pretrained=none"]))
    assert cfg.stream.name == "mtil" and cfg.stream.args["order"] == "I"
    assert cfg.strategies[0].name == "proxy_fda" and cfg.train.sampler == "class_balanced"
    model, _, _ = build_task_model(cfg.model.name, cfg.model.pretrained, [], cfg.model.train_towers)
    assert model.clip.visual.transformer.resblocks.__len__() == 12
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 85_000_000 < trainable < 90_000_000  # the ViT-B/16 image tower only


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("compare")], ids=lambda p: p.stem)
def test_shipped_comparisons_plan(path, tmp_path):
    from cl_proxyfda.compare import plan_comparison

    plan = plan_comparison(path, tmp_path / "out")
    assert plan.seeds == [0, 1, 2] and plan.variants
    assert not (tmp_path / "out").exists()


def test_union_comparison_holds_every_part():
    from cl_proxyfda.compare import plan_comparison

    union = {v.name for v in plan_comparison(next(p for p in CONFIGS if p.name == "compare_demo.yaml")).variants}
    parts = set()
    for p in CONFIGS:
        if p.name.startswith("compare_demo_"):
            parts |= {v.name for v in plan_comparison(p).variants}
    assert union == parts
