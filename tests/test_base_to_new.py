"""Base-to-new evaluation of prompt tuning: class splits, H, and an end-to-end tiny run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cl_proxyfda.base_to_new import (
    BaseToNewSettings,
    ClassSubset,
    format_base_to_new,
    harmonic_mean,
    run_base_to_new,
    split_classes,
)
from cl_proxyfda.benchmarks.image_folder import ImageFolderStreamParams, build_image_folder_stream
from cl_proxyfda.benchmarks.stream import ArrayImageDataset, StreamData
from cl_proxyfda.errors import UserError
from conftest import write_image_folder_stream

torch.set_num_threads(1)


def test_split_classes():
    assert split_classes(5) == ([0, 1, 2], [3, 4])  # ceil(C / 2) base classes, as CoCoOp
    assert split_classes(4) == ([0, 1], [2, 3])
    base, new = split_classes(11, "seeded", seed=3)
    assert (base, new) == split_classes(11, "seeded", seed=3)
    assert len(base) == 6 and sorted(base + new) == list(range(11)) and not set(base) & set(new)
    assert split_classes(11, "seeded", seed=4) != (base, new)
    with pytest.raises(UserError):
        split_classes(1)


def test_harmonic_mean_reproduces_published_h():
    assert harmonic_mean(82.69, 63.22) == pytest.approx(71.66, abs=0.005)  # CoOp
    assert harmonic_mean(83.16, 73.67) == pytest.approx(78.13, abs=0.005)  # CoOp + Proxy-FDA
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(50.0, 50.0) == 50.0


def test_class_subset_relabels():
    images = np.zeros((6, 4, 4, 3), np.uint8)
    ds = ClassSubset(ArrayImageDataset(images, [0, 3, 1, 3, 2, 1]), [1, 3])
    assert ds.targets == [1, 0, 1, 0] and [ds[i][1] for i in range(len(ds))] == ds.targets
    assert ds.indices == [1, 2, 3, 5]


def test_base_to_new_end_to_end(tmp_path):
    root = write_image_folder_stream(
        tmp_path / "data",
        {"warm": ["red", "orange", "yellow", "purple"], "cool": ["blue", "cyan", "green", "gray"]},
        train_per_class=3,
        test_per_class=3,
    )
    stream = build_image_folder_stream(ImageFolderStreamParams(root=str(root)))
    stream = StreamData(tasks=stream.tasks, base_concepts=["circle", "square", "star", "dog", "red"])
    settings = BaseToNewSettings(
        model_name="cl-test-tiny",
        shots=2,
        iterations=3,
        batch_size=4,
        prompt={"n_ctx": 4},
        fda={"k": 2, "min_anchors": 5},
        eval_batch_size=16,
    )
    result = run_base_to_new(stream, settings)
    assert list(result["tasks"]) == ["cool", "warm"]
    cool = result["tasks"]["cool"]
    assert cool["base_classes"] == ["blue", "cyan"] and cool["new_classes"] == ["gray", "green"]
    for entry in result["tasks"].values():
        for variant in ("zero_shot", "coop", "coop_prompt_fda"):
            s = entry[variant]
            assert 0 <= s["base"] <= 100 and 0 <= s["new"] <= 100
            assert s["h"] == pytest.approx(harmonic_mean(s["base"], s["new"]))
        for variant in ("coop", "coop_prompt_fda"):
            assert entry[variant]["steps"] == 3 and math.isfinite(entry[variant]["final_loss"])
            assert entry[variant]["delta_new"] == pytest.approx(entry[variant]["new"] - entry["zero_shot"]["new"])
        # both variants start from the same context; Proxy-FDA adds its loss on top
        assert entry["coop_prompt_fda"]["final_loss"] != entry["coop"]["final_loss"]
    for variant, s in result["mean"].items():
        base = np.mean([e[variant]["base"] for e in result["tasks"].values()])
        new = np.mean([e[variant]["new"] for e in result["tasks"].values()])
        assert s["base"] == pytest.approx(base) and s["new"] == pytest.approx(new)
        assert s["h"] == pytest.approx(harmonic_mean(base, new))
    table = format_base_to_new(result)
    assert "coop_prompt_fda" in table and table.count("\n") == 2 * 3 + 3
    # augmented views go through the train transform; plain CoOp only
    views = run_base_to_new(stream.tasks[:1], settings, variants=["coop"], augment_views=2)
    assert list(views["mean"]) == ["zero_shot", "coop"]


def test_base_to_new_needs_a_shared_context():
    with pytest.raises(UserError, match="shared context"):
        run_base_to_new([], {"prompt": {"class_specific": True}})
    with pytest.raises(UserError, match="no tasks"):
        run_base_to_new([], {"model_name": "cl-test-tiny"})


def test_base_to_new_command_on_the_demo_stream(tmp_path, capsys):
    from cl_proxyfda.cli import main

    assert main(["base-to-new", "--epochs", "1", "--shots", "2", "--seeds", "0", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| coop_prompt_fda |" in table and "| zero_shot |" in table
    import json

    runs = json.loads((tmp_path / "base_to_new.json").read_text())
    assert len(runs) == 1 and 0 <= runs[0]["mean"]["coop"]["h"] <= 100
