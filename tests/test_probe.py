"""eval.control_probe: linear / kNN probes of frozen image features (the paper's forgetting measure)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_proxyfda.compare import METRIC_COLUMNS, PROBE_COLUMNS, csv_columns, run_comparison
from cl_proxyfda.config import parse_config
from cl_proxyfda.errors import ConfigError, UserError
from cl_proxyfda.probe import knn_probe, linear_probe, split_features, stratified_split
from cl_proxyfda.results import RunResults
from cl_proxyfda.runner import run_config
from cl_proxyfda.testing import clip_like_features
from conftest import TINY_TASKS, tiny_config, write_image_folder_stream

torch.set_num_threads(1)


def rotation(dim: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # a Haar-random orthogonal matrix


def zero_shot(features: torch.Tensor, labels: torch.Tensor, class_embeddings: torch.Tensor) -> float:
    pred = (F.normalize(features, dim=1) @ class_embeddings.T).argmax(dim=1)
    return 100.0 * float((pred == labels).float().mean())


# ------------------------------------------------------------------ the probes
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probes_are_rotation_invariant_zero_shot_is_not(seed):
    # 10 classes in 8 dimensions: hard enough that the probes are not at 100%.
    x, y = clip_like_features(400, 8, 10, seed=seed)
    xr = (x.double() @ rotation(8, seed + 10)).float()
    (tr_x, tr_y), (te_x, te_y) = split_features(x, y)
    (rt_x, _), (re_x, _) = split_features(xr, y)
    one_example = 100.0 / len(te_y)

    lin, c = linear_probe(tr_x, tr_y, te_x, te_y)
    lin_rot, c_rot = linear_probe(rt_x, tr_y, re_x, te_y)
    assert 40.0 < lin < 100.0  # well above chance (10%), not trivially separable
    assert abs(lin - lin_rot) <= one_example + 1e-6
    knn, knn_rot = knn_probe(tr_x, tr_y, te_x, te_y), knn_probe(rt_x, tr_y, re_x, te_y)
    assert knn > 40.0 and abs(knn - knn_rot) <= one_example + 1e-6

    # Zero-shot against fixed class embeddings (the probe-train class means, standing in
    # for a frozen text tower) reads absolute positions: a rotation ruins it.
    class_emb = F.normalize(torch.stack([tr_x[tr_y == k].mean(0) for k in range(10)]), dim=1)
    zs, zs_rot = zero_shot(te_x, te_y, class_emb), zero_shot(re_x, te_y, class_emb)
    assert zs > 40.0 and zs_rot < zs - 25.0


@pytest.mark.parametrize("seed", [0, 1])
def test_scrambled_features_drop_the_probes_to_chance(seed):
    x, y = clip_like_features(640, 32, 8, seed=seed)
    (tr_x, tr_y), (te_x, te_y) = split_features(x, y)
    assert linear_probe(tr_x, tr_y, te_x, te_y)[0] > 95.0 and knn_probe(tr_x, tr_y, te_x, te_y) > 95.0
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 7))
    (sx, sy), (sxt, syt) = split_features(x[perm], y)  # rows no longer belong to their labels
    # chance is 12.5%; 320 test examples give a binomial std of 1.8%
    assert linear_probe(sx, sy, sxt, syt)[0] < 12.5 + 7.5
    assert knn_probe(sx, sy, sxt, syt) < 12.5 + 7.5


def test_linear_probe_chooses_c_and_is_deterministic():
    x, y = clip_like_features(400, 16, 20, seed=1)
    (tr_x, tr_y), (te_x, te_y) = split_features(x, y)
    first, again = linear_probe(tr_x, tr_y, te_x, te_y), linear_probe(tr_x, tr_y, te_x, te_y)
    assert first == again and first[1] in (0.1, 1.0, 10.0, 100.0)
    assert linear_probe(tr_x, tr_y, te_x, te_y, c=first[1])[0] == first[0]


def test_stratified_split_halves_every_class():
    y = torch.tensor([0] * 10 + [1] * 7 + [2] * 1 + [3] * 40)
    a, b = stratified_split(y)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(len(y))) and not set(a) & set(b)
    counts = {k: (int((y[a] == k).sum()), int((y[b] == k).sum())) for k in range(4)}
    assert counts == {0: (5, 5), 1: (4, 3), 2: (1, 0), 3: (20, 20)}
    assert [x.tolist() for x in stratified_split(y)] == [a.tolist(), b.tolist()]
    assert stratified_split(y, seed=1)[0].tolist() != a.tolist()


# ------------------------------------------------------------- real tiny runs
def demo_config(out: Path, probe: str, **eval_keys) -> dict:
    """The demo world with its shipped pretrained model: control = 8 base shapes."""
    cfg = tiny_config(out, out, model={"name": "demo-clip-tiny", "pretrained": "demo", "train_towers": ["image"]},
                      eval={"control_probe": probe, **eval_keys}, train={"iterations": 5, "batch_size": 16, "lr": 1e-3})
    cfg["stream"] = {"name": "demo", "seed": 0, "tasks": ["counting", "shades"], "train_per_class": 8,
                     "test_per_class": 4, "control_per_class": 20, "reference_size": 0}
    return cfg


@pytest.mark.parametrize("probe", ["linear", "knn"])
def test_demo_run_writes_the_probe_for_every_row(tmp_path, probe):
    out = tmp_path / "run"
    results = run_config(parse_config(demo_config(tmp_path, probe)), out_dir=out, quiet=True)
    data = json.loads((out / "metrics.json").read_text())
    values = data["control_probe"]
    assert len(values) == len(data["rows"]) == 3
    assert all(v is not None and math.isfinite(v) and 0.0 <= v <= 100.0 for v in values)
    # The pretrained demo model separates the base shapes: far above chance (12.5%).
    assert values[0] > 60.0
    meta = data["meta"]["control_probe"]
    assert meta["kind"] == probe and meta["split"].startswith("stratified 50/50")
    s = data["summary"]
    assert s["control_probe"] == pytest.approx(values)
    assert s["control_probe_initial"] == pytest.approx(values[0]) and s["control_probe_last"] == pytest.approx(values[-1])
    assert s["control_probe_drop"] == pytest.approx(values[0] - values[-1])
    assert all(d["probe_seconds"] > 0 for d in data["diagnostics"])
    # 160 probe-test images: accuracies are multiples of 1/160.
    assert all(abs(v * 1.6 - round(v * 1.6)) < 1e-6 for v in values)
    loaded = RunResults.load(out)
    assert loaded.control_probe == pytest.approx(results.control_probe) and loaded.control_probe == pytest.approx(values)
    table = (out / "summary.txt").read_text()
    assert "Control probe" in table and f"drop {values[0] - values[-1]:.1f}" in table
    assert table.splitlines()[3].split()[-1] == "probe"


def test_probe_uses_the_control_train_split_and_probes_tasks(tmp_path):
    root = write_image_folder_stream(tmp_path / "data", {**TINY_TASKS, "ctrl": ["gray", "red", "blue"]})
    cfg = tiny_config(root, tmp_path, stream={"tasks": ["warm", "cool"], "control": "ctrl"},
                      eval={"control_probe": "linear", "probe_tasks": True})
    results = run_config(parse_config(cfg), out_dir=tmp_path / "run", quiet=True)
    assert results.meta["control_probe"]["split"] == "train/test"
    assert len(results.control_probe) == 3
    # 3 classes x 4 test images: multiples of 100/12.
    assert all(abs(v * 0.12 - round(v * 0.12)) < 1e-6 for v in results.control_probe)
    probe = results.extra_matrices["linear_probe"]
    assert np.asarray(probe).shape == (3, 2) and np.isfinite(probe).all()
    assert results.summary()["extra"]["linear_probe"]["last"] == pytest.approx(np.mean(probe[-1]))
    assert (tmp_path / "run" / "linear_probe_matrix.csv").is_file()


def test_default_is_off_and_old_results_still_load(tmp_path):
    cfg = parse_config(tiny_config(tmp_path, tmp_path))
    assert cfg.eval.control_probe == "none" and cfg.eval.probe_tasks is False
    r = RunResults(task_names=["a", "b"])
    r.add_row([10, 20], control=50.0)
    old = r.to_dict()
    assert "control_probe" not in old and "control_probe" not in old["summary"]  # files without a probe are unchanged
    back = RunResults.from_dict(old)
    assert back.control_probe == [] and "control_probe_drop" not in back.summary()
    assert "probe" not in back.format_table()


def test_probe_must_be_given_for_every_row_or_none():
    r = RunResults(task_names=["a"])
    r.add_row([10], control_probe=80.0)
    with pytest.raises(ValueError, match="control probe"):
        r.add_row([20])
    with pytest.raises(ValueError, match="control_probe has 2 values"):
        RunResults(task_names=["a"], rows=[[1.0]], control_probe=[1.0, 2.0])


def test_bad_probe_settings_are_one_line_errors(tmp_path, data_root):
    with pytest.raises(ConfigError, match=r"^eval.probe_tasks: needs eval.control_probe"):
        parse_config(tiny_config(data_root, tmp_path, eval={"probe_tasks": True}))
    with pytest.raises(ConfigError, match=r"^eval.control_probe"):
        parse_config(tiny_config(data_root, tmp_path, eval={"control_probe": "svm"}))
    cfg = parse_config(tiny_config(data_root, tmp_path, eval={"control_probe": "knn"}))
    with pytest.raises(UserError, match=r"^eval.control_probe: knn needs a control set"):
        run_config(cfg, out_dir=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_compare_gets_probe_columns(tmp_path):
    root = write_image_folder_stream(tmp_path / "data", {**TINY_TASKS, "ctrl": ["gray", "red"]})
    base = tiny_config(root, tmp_path / "unused", stream={"tasks": ["warm", "cool"], "control": "ctrl"},
                       train={"iterations": 2}, eval={"control_probe": "knn", "probe_k": 3})
    base.pop("strategies")
    spec = {"name": "probe_cmp", "base": base, "seeds": [0],
            "variants": [{"name": "naive", "strategies": [{"name": "naive"}]},
                         {"name": "l2sp", "strategies": [{"name": "l2sp", "weight": 10}]}]}
    result = run_comparison(spec, tmp_path / "cmp", log=lambda line: None)
    with open(tmp_path / "cmp" / "comparison.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == csv_columns(result.rows) and len(csv_columns(result.rows)) == len(csv_columns()) + 4
    for row in rows:
        saved = RunResults.load(tmp_path / "cmp" / "variants" / row["variant"] / "seed0").summary()
        assert float(row["control_probe_last_mean"]) == pytest.approx(saved["control_probe_last"])
        assert float(row["control_probe_drop_mean"]) == pytest.approx(saved["control_probe_drop"])
    table = [l for l in result.markdown.splitlines() if l.startswith("|")]
    assert all(len(l.strip("|").split("|")) == 2 + len(METRIC_COLUMNS) + len(PROBE_COLUMNS) for l in table)
    assert "Control probe" in table[0]
    assert len(result.row("naive").curves["control_probe"]) == 3


def test_stability_plot_draws_the_probe_curve(tmp_path):
    from cl_proxyfda.plots import plot_stability_plasticity

    def results(probe: bool) -> RunResults:
        r = RunResults(task_names=["a", "b"], meta={"control_probe": {"kind": "linear"}})
        for i, row in enumerate([[10, 20], [80, 20], [60, 90]]):
            r.add_row(row, control=[70, 50, 40][i], control_probe=[90, 85, 80][i] if probe else None)
        return r

    with_probe = plot_stability_plasticity(results(True), tmp_path / "p.png").read_bytes()
    without = plot_stability_plasticity(results(False), tmp_path / "n.png").read_bytes()
    assert with_probe != without
    again = plot_stability_plasticity(RunResults.from_dict(results(True).to_dict()), tmp_path / "q.png").read_bytes()
    assert again == with_probe


def test_resumed_run_continues_the_probe_rows(tmp_path, data_root):
    import shutil

    from cl_proxyfda.runner import build_run, execute

    cfg = tiny_config(data_root, tmp_path, stream={"tasks": ["warm", "cool"], "control": "mixed"},
                      eval={"control_probe": "linear"}, checkpoint={"keep_last": 3}, train={"iterations": 4})
    full = execute(build_run(parse_config(cfg), tmp_path / "full"), quiet=True)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    (part / "checkpoints" / "exp_002.pt").unlink()  # as if killed after experience 1
    resumed = execute(build_run(parse_config(cfg), part), resume=True, quiet=True)
    assert len(resumed.control_probe) == 3
    assert resumed.control_probe == pytest.approx(full.control_probe, abs=1e-9)
    assert RunResults.load(part).control_probe == pytest.approx(full.control_probe, abs=1e-9)
