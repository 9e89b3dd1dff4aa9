"""Baselines: unit tests of their losses/updates and integration runs on a tiny stream."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avalanche.core import SupervisedPlugin

from cl_proxyfda.config import parse_config
from cl_proxyfda.losses.regularizers import feature_distance, interpolate_weights, l2_to_anchor
from cl_proxyfda.runner import build_run, execute
from cl_proxyfda.strategies.ldifs import auto_layers
from conftest import tiny_config


def test_l2_to_anchor_by_hand():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([[0.5]], requires_grad=True)
    loss = l2_to_anchor([("a", a), ("b", b)], {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[1.5]])})
    assert loss.item() == pytest.approx(1 + 4 + 1)
    loss.backward()
    assert torch.allclose(a.grad, torch.tensor([2.0, 4.0])) and torch.allclose(b.grad, torch.tensor([[-2.0]]))


def test_feature_distance_by_hand():
    s = {"x": torch.tensor([[1.0, 0.0], [0.0, 2.0]])}
    t = {"x": torch.tensor([[0.0, 3.0], [0.0, 1.0]])}
    # normalised: rows (1,0) vs (0,1) -> distance 2; (0,1) vs (0,1) -> 0; mean 1
    assert feature_distance(s, t).item() == pytest.approx(1.0)
    assert feature_distance(s, t, normalize=False).item() == pytest.approx((10 + 1) / 2)
    with pytest.raises(ValueError):
        feature_distance(s, {"y": t["x"]})


def test_interpolate_weights():
    start = {"w": torch.zeros(3), "n": torch.tensor(1)}
    end = {"w": torch.ones(3) * 4, "n": torch.tensor(5)}
    mid = interpolate_weights(start, end, 0.25)
    assert torch.allclose(mid["w"], torch.ones(3)) and int(mid["n"]) == 5


def test_auto_layers_vit_b():
    assert auto_layers(12) == ["ln_pre", "block3", "block6", "block9", "block12"]
    assert auto_layers(2) == ["ln_pre", "block1", "block2"]


def _run(tmp_path, root, strategies, **train):
    cfg = parse_config(tiny_config(root, tmp_path / "runs", strategies=strategies, train={"iterations": 4, **train}))
    run = build_run(cfg)
    results = execute(run)
    return run, results


def _weight_drift(run) -> float:
    initial = run.strategy.teachers.initial_state
    now = run.model.state_dict()
    return sum(float((now[k].float() - initial[k].float()).pow(2).sum()) for k in initial if torch.is_floating_point(initial[k]))


@pytest.mark.parametrize("name", ["naive", "l2sp", "ldifs", "lwf", "ewc", "wiseft"])
def test_every_baseline_runs_end_to_end(tmp_path, tiny_stream_root, name):
    run, results = _run(tmp_path, tiny_stream_root, [{"name": name}])
    m = results.matrix()
    assert m.shape == (4, 3) and np.isfinite(m).all()
    assert (tmp_path / "runs" / "tiny" / "metrics.json").is_file()


def test_l2sp_keeps_weights_closer_than_naive(tmp_path, tiny_stream_root):
    naive, _ = _run(tmp_path / "a", tiny_stream_root, [{"name": "naive"}], lr=1e-2)
    l2, _ = _run(tmp_path / "b", tiny_stream_root, [{"name": "l2sp", "weight": 50.0}], lr=1e-2)
    assert _weight_drift(l2) < 0.5 * _weight_drift(naive)


def test_ldifs_adds_a_positive_term_and_keeps_features(tmp_path, tiny_stream_root):
    run, _ = _run(tmp_path, tiny_stream_root, [{"name": "ldifs", "layers": ["ln_pre", "block2"]}], lr=1e-2)
    plugin = run.plugins[0]
    assert plugin.loss_terms["ldifs"] > 0
    # one teacher forward per training batch, shared: 3 experiences x 4 iterations
    assert run.strategy.teachers.forward_count == 12


def test_wiseft_alpha_zero_returns_to_pretrained(tmp_path, tiny_stream_root):
    run, results = _run(tmp_path, tiny_stream_root, [{"name": "wiseft", "alpha": 0.0}], lr=1e-2)
    assert _weight_drift(run) == pytest.approx(0.0, abs=1e-10)
    m = results.matrix()
    for i in range(1, 4):
        assert np.allclose(m[i], m[0])


def test_wiseft_half_is_between(tmp_path, tiny_stream_root):
    naive, _ = _run(tmp_path / "a", tiny_stream_root, [{"name": "naive"}], lr=1e-2, iterations=2)
    wise, _ = _run(tmp_path / "b", tiny_stream_root, [{"name": "wiseft", "alpha": 0.5, "when": "end"}], lr=1e-2, iterations=2)
    assert 0 < _weight_drift(wise) < _weight_drift(naive)


class WeightLog(SupervisedPlugin):
    """Copies of the model's weights at the start and at the end of each experience's
    training (placed first: its after_training_exp runs before WiSE-FT's merge)."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[dict[str, torch.Tensor]] = []
        self.ends: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def _copy(strategy) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in strategy.model.state_dict().items()}

    def before_training_exp(self, strategy, **kwargs):
        self.starts.append(self._copy(strategy))

    def after_training_exp(self, strategy, **kwargs):
        self.ends.append(self._copy(strategy))


@pytest.mark.parametrize("anchor", ["previous", "pretrained"])
def test_wiseft_anchor_by_hand_over_two_experiences(tmp_path, tiny_stream_root, anchor):
    a = 0.7
    cfg = tiny_config(tiny_stream_root, tmp_path / "runs", strategies=[{"name": "wiseft", "alpha": a, "anchor": anchor}],
                      stream={"tasks": ["warm", "cool"]}, model={"train_towers": ["image", "text"]},
                      train={"iterations": 3, "lr": 1e-2})
    run = build_run(parse_config(cfg))
    log = WeightLog()
    run.strategy.plugins[:0] = [log]
    execute(run, quiet=True)
    pre = run.strategy.teachers.initial_state
    final = run.model.state_dict()
    assert len(log.starts) == len(log.ends) == 2
    floats = [k for k, v in pre.items() if torch.is_floating_point(v)]
    assert all(torch.equal(log.starts[0][k], pre[k]) for k in floats)
    merged = []
    for i in range(2):
        base = log.starts[i] if anchor == "previous" else pre
        merged.append({k: (1 - a) * base[k] + a * log.ends[i][k] for k in floats})
    # the merge after experience 1 is where experience 2 starts; the merge after 2 is the final model
    for k in floats:
        torch.testing.assert_close(log.starts[1][k], merged[0][k], rtol=0, atol=1e-6)
        torch.testing.assert_close(final[k], merged[1][k], rtol=0, atol=1e-6)
    moved = [k for k in floats if not torch.equal(log.ends[1][k], log.starts[1][k])]
    assert "clip.visual.proj" in moved and "clip.text_projection" in moved  # both towers trained
    # experience 1 starts from the pre-trained weights, so both anchors agree there;
    # at experience 2 they differ: the other anchor's merge is not the final model
    other = log.starts[1] if anchor == "pretrained" else pre
    gap = max(float(((1 - a) * other[k] + a * log.ends[1][k] - final[k]).abs().max()) for k in moved)
    assert gap > 1e-4
    assert run.plugins[0].applied == 2


def test_lwf_distills_from_the_second_experience(tmp_path, tiny_stream_root):
    run, _ = _run(tmp_path, tiny_stream_root, [{"name": "lwf", "alpha": 1.0}])
    lwf = run.plugins[0].lwf
    assert lwf.prev_model is not None and len(lwf.prev_classes_by_task) >= 2


def test_ewc_computes_importances(tmp_path, tiny_stream_root):
    run, _ = _run(tmp_path, tiny_stream_root, [{"name": "ewc", "ewc_lambda": 10.0}])
    imps = run.plugins[0].importances
    assert len(imps) >= 1
    total = sum(float(p.data.sum()) for table in imps.values() for p in table.values())
    assert total > 0 and math.isfinite(total)
