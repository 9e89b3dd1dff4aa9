"""The cost ledger: counts checked by hand on the tiny model, and a real run's ledger."""
from __future__ import annotations

import json

import pytest

from cl_proxyfda.adapters import AdapterConfig, inject_adapters
from cl_proxyfda.config import parse_config
from cl_proxyfda.ledger import build_ledger, parameter_counts
from cl_proxyfda.models import build_task_model
from cl_proxyfda.runner import build_run, execute
from conftest import tiny_config

# cl-test-tiny: image tower width 64, 2 blocks (see cl_proxyfda/model_configs/cl-test-tiny.json)
WIDTH, BLOCKS = 64, 2


def test_vefa_adds_one_scale_per_input_dimension_of_each_adapted_map():
    model, _, _ = build_task_model("cl-test-tiny", None)
    inject_adapters(model.clip, AdapterConfig(type="vefa", targets=["q", "k", "v", "o"]))
    model.set_trainable(["image"])
    counts = parameter_counts(model)
    by_hand = BLOCKS * 4 * WIDTH  # q, k, v and o each take a 64-dim input: 512
    assert counts["inference_params_added"] == by_hand == 512
    assert counts["trainable_params"] == by_hand  # only the adapters train
    assert counts["trainable_share"] == pytest.approx(by_hand / counts["total_params"])


def test_full_fine_tuning_adds_nothing_at_inference_and_trains_the_image_tower():
    model, _, _ = build_task_model("cl-test-tiny", None, train_towers=["image"])
    counts = parameter_counts(model)
    visual = sum(p.numel() for p in model.clip.visual.parameters())
    assert counts["inference_params_added"] == 0
    assert counts["trainable_params"] == visual
    assert counts["total_params"] == sum(p.numel() for p in model.parameters())


def test_a_run_writes_its_ledger(tmp_path, data_root):
    cfg = tiny_config(data_root, tmp_path, strategies=[{"name": "fda", "k": 3}, {"name": "l2sp", "weight": 0.1}])
    cfg["train"]["sampler"] = "random"
    run = build_run(parse_config(cfg))
    results = execute(run, quiet=True)
    ledger = results.meta["ledger"]
    total = ledger["total_params"]
    # FDA keeps one frozen fp32 copy of the pre-trained model: 4 bytes a parameter (+ small buffers)
    assert ledger["teacher_copies"] == 1
    assert ledger["teacher_mb"] == pytest.approx(total * 4 / 2**20, rel=0.02)
    # L2-SP keeps the anchor weights of the trainable tensors: 4 bytes a trainable parameter
    assert ledger["plugin_state_mb"] >= ledger["trainable_params"] * 4 / 2**20 * 0.99
    assert ledger["synthetic_images"] == 0 and ledger["reference_images"] == 0 and ledger["inference_params_added"] == 0
    assert ledger["device_hours"] == pytest.approx(ledger["wall_seconds"] / 3600)
    assert ledger["peak_rss_mb"] > 100 and ledger["peak_gpu_mb"] == 0.0 and ledger["task_label_at_test"] is True
    saved = json.loads((run.out_dir / "metrics.json").read_text())["meta"]["ledger"]
    assert saved["trainable_params"] == ledger["trainable_params"]
    assert "Cost: trainable" in (run.out_dir / "summary.txt").read_text()


def test_plugins_report_extra_data():
    class Reporter:
        def __init__(self, n: int) -> None:
            self.n = n

        def ledger(self) -> dict[str, float]:
            return {"reference_images": self.n, "synthetic_images": 2 * self.n}

    import torch

    model, _, _ = build_task_model("cl-test-tiny", None)
    ledger = build_ledger(model, [Reporter(3), Reporter(4)], None, torch.device("cpu"), wall_seconds=7200.0, processes=2)
    assert ledger["reference_images"] == 7 and ledger["synthetic_images"] == 14
    assert ledger["device_hours"] == pytest.approx(4.0) and ledger["teacher_copies"] == 0
