"""The zscl strategy: finite terms, the pre-trained teacher, weight ensembling, reference
sets from the stream or a folder, and checkpointable state."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from cl_proxyfda.benchmarks.stream import ArrayImageDataset, StreamData  # noqa: E402
from cl_proxyfda.config import parse_config  # noqa: E402
from cl_proxyfda.errors import ConfigError, UserError  # noqa: E402
from cl_proxyfda.runner import build_run, execute  # noqa: E402
from cl_proxyfda.strategies.anchors import trainable_named_parameters  # noqa: E402
from cl_proxyfda.strategies.zscl import ZSCLParams, ZSCLPlugin, reference_images_of, reference_texts_of  # noqa: E402
from conftest import TINY_TASKS, tiny_config, write_image_folder_stream  # noqa: E402


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_image_folder_stream(tmp_path_factory.mktemp("stream") / "data", TINY_TASKS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ref")
    rng = np.random.default_rng(0)
    for i in range(10):
        sub = root / "images" / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    names = root / "classes.txt"
    names.write_text("# reference classes\ncircle\nsquare\n\nstar\ntriangle\nring\n", encoding="utf-8")
    return root / "images", names


def zscl_entry(reference, **over) -> dict:
    folder, names = reference
    return {"name": "zscl", "reference": "folder", "reference_folder": str(folder), "reference_classnames": str(names), "batch_size": 4, **over}


def make_run(tmp: Path, root: Path, strategies: list, tasks=("warm",), iterations: int = 3, towers=("image",)):
    train = {"iterations": iterations, "batch_size": 6, "lr": 1e-2}
    cfg = tiny_config(root, tmp / "runs", strategies=strategies, train=train, model={"train_towers": list(towers)})
    cfg["stream"]["tasks"] = list(tasks)
    return build_run(parse_config(cfg))


class Snapshots(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.before: dict[str, torch.Tensor] = {}
        self.after_each: list[dict[str, torch.Tensor]] = []
        self.terms: list[dict[str, float]] = []

    def before_training_exp(self, strategy, **kwargs):
        self.before = {n: p.detach().clone() for n, p in trainable_named_parameters(strategy)}

    def after_training_iteration(self, strategy, **kwargs):
        self.after_each.append({n: p.detach().clone() for n, p in trainable_named_parameters(strategy)})
        zscl = next(p for p in strategy.plugins if getattr(p, "name", "") == "zscl")
        self.terms.append(dict(zscl.loss_terms))


def test_terms_are_finite_and_l2_grows_from_zero(tmp_path, data_root, reference):
    run = make_run(tmp_path, data_root, [zscl_entry(reference, weight_ensemble=False)], tasks=("warm", "cool"), towers=("image", "text"))
    snaps = Snapshots()
    run.strategy.plugins.append(snaps)
    results = execute(run, quiet=True)
    zscl = run.plugins[0]
    assert len(snaps.terms) == 2 * 3
    for t in snaps.terms:
        assert math.isfinite(t["zscl_distill"]) and t["zscl_distill"] > 0
        assert math.isfinite(t["zscl_l2"]) and t["zscl_l2"] >= 0
    assert snaps.terms[0]["zscl_l2"] == 0.0 and snaps.terms[1]["zscl_l2"] > 0  # start-of-experience anchor
    assert snaps.terms[3]["zscl_l2"] == 0.0  # re-anchored at experience 2
    assert np.isfinite(results.matrix()).all()
    assert zscl.teacher_text_forwards == 1  # the teacher's reference texts once per run
    assert zscl.texts == [f"a photo of a {c}." for c in ("circle", "square", "star", "triangle", "ring")]
    assert len(zscl.images) == 10


def test_teacher_is_the_pretrained_model(tmp_path, data_root, reference):
    run = make_run(tmp_path, data_root, [zscl_entry(reference)], tasks=("warm", "cool"), iterations=2)
    execute(run, quiet=True)
    teacher = run.strategy.teachers.models["pretrained"]
    initial = run.strategy.teachers.initial_state
    assert all(torch.equal(v, initial[k]) for k, v in teacher.state_dict().items())
    assert "previous" not in run.strategy.teachers.models


def test_weight_ensembling_loads_the_running_average(tmp_path, data_root, reference):
    run = make_run(tmp_path / "we", data_root, [zscl_entry(reference, ensemble_every=1)], iterations=3)
    snaps = Snapshots()
    run.strategy.plugins.append(snaps)
    execute(run, quiet=True)
    assert len(snaps.after_each) == 3
    final = dict(trainable_named_parameters(run.strategy))
    trained = snaps.after_each[-1]
    moved = 0.0
    for name, p in final.items():
        expected = (snaps.before[name] + sum(s[name] for s in snaps.after_each)) / 4
        assert torch.allclose(p.detach(), expected, atol=1e-6), name
        moved = max(moved, float((trained[name] - p.detach()).abs().max()))
    assert moved > 1e-4  # the average differs from the last trained weights

    every2 = make_run(tmp_path / "we2", data_root, [zscl_entry(reference, ensemble_every=2)], iterations=3)
    snaps2 = Snapshots()
    every2.strategy.plugins.append(snaps2)
    execute(every2, quiet=True)
    for name, p in dict(trainable_named_parameters(every2.strategy)).items():
        expected = (snaps2.before[name] + snaps2.after_each[1][name]) / 2  # snapshot at iteration 2 only
        assert torch.allclose(p.detach(), expected, atol=1e-6), name


def test_state_round_trip_with_weights_only(tmp_path, data_root, reference):
    run = make_run(tmp_path, data_root, [zscl_entry(reference, ensemble_every=1)], iterations=2)
    execute(run, quiet=True)
    zscl = run.plugins[0]
    saved = torch.load(sorted((run.out_dir / "checkpoints").glob("*.pt"))[-1], weights_only=True)["plugins"]["0:zscl"]
    assert saved["iteration"] == 2 and saved["ensemble"]["count"] == 3
    fresh = ZSCLPlugin(ZSCLParams(**{k: v for k, v in zscl_entry(reference).items() if k != "name"}), run.stream)
    fresh.load_state_dict(saved)
    assert fresh.iteration == 2 and fresh.ensemble.count == 3 and fresh.ensemble.every == 1
    assert all(torch.equal(fresh.anchor[n], zscl.anchor[n]) for n in zscl.anchor)
    assert all(torch.equal(fresh.ensemble.average[n], zscl.ensemble.average[n]) for n in zscl.ensemble.average)


def test_reference_from_the_stream_and_text_sources(reference):
    images = ArrayImageDataset(np.zeros((5, 8, 8, 3), dtype=np.uint8), [0] * 5)
    stream = StreamData(tasks=[], reference=images, base_concepts=["red circle", "blue square"])
    params = ZSCLParams()
    assert reference_images_of(params, stream) is images
    assert reference_texts_of(params, stream) == ["a photo of a red circle.", "a photo of a blue square."]
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    assert len(reference_texts_of(ZSCLParams(texts="imagenet"), stream)) == len(set(IMAGENET_CLASSNAMES))  # 998 distinct
    with_file = ZSCLParams(reference_classnames=str(reference[1]), template="art of a {}")
    assert reference_texts_of(with_file, stream)[0] == "art of a circle"
    with pytest.raises(UserError, match="no reference images"):
        reference_images_of(params, StreamData(tasks=[]))
    with pytest.raises(UserError, match="does not exist"):
        reference_images_of(ZSCLParams(reference="folder", reference_folder="/nonexistent/ref"), stream)


def test_options_are_validated(tmp_path, data_root):
    def parse(entry):
        return parse_config(tiny_config(data_root, tmp_path, strategies=[entry]))

    with pytest.raises(ConfigError, match=r"strategies\[0\].*reference_folder: required"):
        parse({"name": "zscl", "reference": "folder"})
    with pytest.raises(ConfigError, match=r"strategies\[0\]\.temprature: unknown key"):
        parse({"name": "zscl", "temprature": 2})
    defaults = ZSCLParams()
    assert (defaults.temperature, defaults.ensemble_every, defaults.weight_ensemble, defaults.l2_weight) == (2.0, 100, True, 1.0)
