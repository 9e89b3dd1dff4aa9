"""Every registered strategy runs under ``eval.task_agnostic: true`` (X-TAIL evaluation).

One entry per registered name in ``SETUPS`` (the smallest valid set-up of that strategy);
a newly registered strategy without an entry fails ``test_every_strategy_has_a_setup``.
Each run: the tiny model, 2 tasks of the colour stream (no shared class name, so the
union head is the two task heads stacked), 2 iterations per task.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cl_proxyfda import metrics
from cl_proxyfda.config import parse_config
from cl_proxyfda.registry import STRATEGIES, load_builtin_components
from cl_proxyfda.runner import build_run, execute
from conftest import TINY_TASKS, tiny_config

TASKS = ["warm", "cool"]


def _write_images(folder: Path, count: int = 6) -> Path:
    """A labelled folder of random images (ZSCL's reference set, infusing's generic set)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / ("circle" if i % 2 else "square")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    return folder


def _zscl(aux: Path) -> dict:
    (aux / "classes.txt").write_text("circle\nsquare\n", encoding="utf-8")
    return {"strategies": [{"name": "zscl", "reference": "folder", "reference_folder": str(aux / "images"),
                            "reference_classnames": str(aux / "classes.txt"), "batch_size": 4}]}


def _gift(aux: Path, **over) -> dict:
    return {"name": "gift", "generator": {"name": "world", "image_size": 32}, "images_per_experience": 6,
            "synthetic_batch_size": 3, "base_concepts": ["circle", "square"], "cache_dir": str(aux / "synthetic"), **over}


def _generic(aux: Path) -> dict:
    return {"source": "folder", "root": str(aux / "images"), "batch_size": 4}


BOTH = {"model": {"train_towers": ["image", "text"]}}  # text training: the union head must follow
PROMPTS = {"model": {"prompt_learner": {"n_ctx": 2}}}
# name -> (aux folder -> the config sections of its smallest valid run)
SETUPS: dict[str, Callable[[Path], dict]] = {
    "naive": lambda aux: {"strategies": [{"name": "naive"}], **BOTH},
    "l2sp": lambda aux: {"strategies": [{"name": "l2sp"}], **BOTH},
    "ldifs": lambda aux: {"strategies": [{"name": "ldifs", "layers": ["ln_pre", "block2"]}]},
    "lwf": lambda aux: {"strategies": [{"name": "lwf"}], **BOTH},
    "ewc": lambda aux: {"strategies": [{"name": "ewc"}], **BOTH},
    "wiseft": lambda aux: {"strategies": [{"name": "wiseft", "alpha": 0.5}], **BOTH},
    "fda": lambda aux: {"strategies": [{"name": "fda", "k": 2}]},
    "proxy_fda": lambda aux: {"strategies": [{"name": "proxy_fda", "k": 2}]},
    "zscl": lambda aux: {**_zscl(aux), **BOTH},
    "gift": lambda aux: {"strategies": [_gift(aux)], **BOTH},
    "awc": lambda aux: {"strategies": [_gift(aux), {"name": "awc"}], **BOTH},  # awc's importance: gift's synthetic loss
    "coop": lambda aux: {"strategies": [{"name": "coop"}], **PROMPTS},
    "prompt_fda": lambda aux: {"strategies": [{"name": "coop"}, {"name": "prompt_fda", "k": 2}], **PROMPTS},
    "infusing": lambda aux: {"strategies": [{"name": "infusing", "generic": _generic(aux), "select": {"every": 1}}]},
    "infusing_generic": lambda aux: {"strategies": [{"name": "infusing_generic", **_generic(aux)}]},
    "infusing_head": lambda aux: {"strategies": [{"name": "infusing_head"}]},
    "infusing_l2": lambda aux: {"strategies": [{"name": "infusing_l2"}]},
    "infusing_select": lambda aux: {"strategies": [{"name": "naive"}, {"name": "infusing_select", "every": 1}]},
}


def registered() -> list[str]:
    load_builtin_components()
    return STRATEGIES.names()


def test_every_strategy_has_a_setup():
    missing = sorted(set(registered()) - set(SETUPS))
    assert not missing, f"registered strategies without a task-agnostic set-up in SETUPS: {missing}"
    assert not set(SETUPS) - set(registered()), "SETUPS names a strategy that is not registered"


@pytest.fixture(scope="module")
def aux(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("aux")
    _write_images(root / "images")
    return root


def final_union_row(run) -> list[float]:
    """Task-agnostic accuracy of the run's final model, from fresh heads (no cache)."""
    model = run.model.eval()
    with torch.no_grad():
        if model.prompt_learner is not None:
            heads = [model.prompt_learner._compute(t) for t in range(len(run.stream.tasks))]
        else:
            heads = []
            for t in run.stream.tasks:
                rows = [F.normalize(model.clip.encode_text(model.tokenizer([tpl.format(c) for tpl in t.templates])), dim=-1).mean(0) for c in t.classnames]
                heads.append(F.normalize(torch.stack(rows), dim=-1))
        union = torch.cat(heads)
        offsets = np.cumsum([0] + [len(h) for h in heads])
        out = []
        for k, t in enumerate(run.stream.tasks):
            images = torch.stack([run.evaluator.transform(t.test[i][0]) for i in range(len(t.test))])
            labels = torch.tensor([t.test[i][1] for i in range(len(t.test))])
            pred = (F.normalize(model.clip.encode_image(images), dim=-1) @ union.t()).argmax(1)
            out.append(100.0 * int((pred == labels + int(offsets[k])).sum()) / len(labels))
    return out


@pytest.mark.parametrize("name", registered())
def test_strategy_runs_task_agnostically(tmp_path, data_root, aux, name):
    if name not in SETUPS:
        pytest.fail(f"strategy {name!r} is registered but has no entry in SETUPS")
    sections = SETUPS[name](aux)
    cfg = tiny_config(data_root, tmp_path / "runs", stream={"tasks": TASKS},
                      train={"lr": 1e-2, "iterations": 2, "batch_size": 6},
                      eval={"batch_size": 12, "task_agnostic": True}, **sections)
    run = build_run(parse_config(cfg))
    results = execute(run, quiet=True)
    data = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    ta = np.asarray(data["extra_matrices"]["task_agnostic"], dtype=float)
    assert ta.shape == (3, 2)
    assert np.isfinite(ta).all() and ((ta >= 0) & (ta <= 100)).all()
    # no shared names: the union head is the task heads stacked, so an image right over
    # the union is right over its own task's classes
    assert (ta <= np.asarray(results.rows) + 1e-9).all()
    # the last row is the final model's, with heads that follow its (text) weights
    assert ta[-1] == pytest.approx(final_union_row(run), abs=1e-6)
    summary = data["summary"]["extra"]["task_agnostic"]
    expected = metrics.summarize(ta)
    for key in ("transfer", "avg", "last"):
        assert summary[key] == pytest.approx(expected[key], abs=1e-9)
    assert data["meta"]["task_agnostic"] == {"classes": sum(len(TINY_TASKS[t]) for t in TASKS), "templates": "task", "shared_names": {}}
