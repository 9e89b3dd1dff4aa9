"""AWC: per-tensor normalised importance, the penalty, the static (EWC-like) mode."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_proxyfda.losses.awc import (
    TINY_IMPORTANCE,
    ImportanceTracker,
    awc_penalty,
    awc_penalty_and_grad,
    importance_from_grads,
    importance_from_parameters,
    normalized_squared_gradient,
    snapshot,
)


def test_importance_of_a_hand_example():
    # g = [1, 2, 3] -> g^2 = [1, 4, 9], mean 14/3 -> F = [3/14, 12/14, 27/14]
    f = normalized_squared_gradient(torch.tensor([1.0, -2.0, 3.0]), torch.zeros(3))
    assert torch.allclose(f, torch.tensor([3 / 14, 12 / 14, 27 / 14]))


def test_each_tensor_importance_averages_to_one_whatever_its_gradient_scale():
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.zeros(4, 5), "b": torch.zeros(7), "c": torch.zeros(2, 3, 3)}
    grads = {"a": torch.randn(4, 5, generator=g) * 1e-6, "b": torch.randn(7, generator=g) * 10, "c": torch.randn(2, 3, 3, generator=g)}
    imp = importance_from_grads(grads, params)
    for name, f in imp.items():
        assert f.shape == params[name].shape
        assert f.mean().item() == pytest.approx(1.0, rel=1e-5)
        ratio = f / grads[name].pow(2)
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4)  # proportional to g^2
    # The normalisation makes F invariant to the gradient's scale (e.g. an AMP loss scale).
    scaled = importance_from_grads({n: 1024.0 * v for n, v in grads.items()}, params)
    for name in imp:
        assert torch.allclose(scaled[name], imp[name], rtol=1e-5)


def test_zero_missing_and_logit_scale_gradients_give_the_tiny_constant_without_nan():
    params = {"zero": torch.ones(3), "none": torch.ones(2, 2), "clip.logit_scale": torch.ones(()), "nan": torch.ones(2)}
    grads = {"zero": torch.zeros(3), "none": None, "clip.logit_scale": torch.tensor(5.0), "nan": torch.tensor([float("nan"), 1.0])}
    imp = importance_from_grads(grads, params)
    for name, f in imp.items():
        assert f.shape == params[name].shape
        assert torch.isfinite(f).all()
        assert torch.all(f == TINY_IMPORTANCE), name
    assert set(imp) == set(params)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_all_tensors_at_once_equal_the_per_tensor_formula(device):
    # ~40 tensors of mixed sizes and scales, a zero one, a missing one, a non-finite one,
    # logit_scale, and one of 2.4M elements (float32 sums of that many terms must not drift)
    g = torch.Generator().manual_seed(3)
    shapes = [(7, 5), (16,), (3, 4, 4), (1,), (64, 32)] * 8 + [(2_400_000,)]
    params = {f"t{i}": torch.zeros(s, device=device) for i, s in enumerate(shapes)}
    grads = {n: (torch.randn(p.shape, generator=g) * 10.0 ** (i % 7 - 3)).to(device) for i, (n, p) in enumerate(params.items())}
    grads["t1"] = torch.zeros(16, device=device)
    grads["t2"] = None
    grads["t3"] = torch.tensor([float("inf")], device=device)
    params["visual.logit_scale"], grads["visual.logit_scale"] = torch.zeros((), device=device), torch.ones((), device=device)
    imp = importance_from_grads(grads, params, eps=1e-20)
    assert list(imp) == list(params)
    for name, f in imp.items():
        assert f.shape == params[name].shape and f.dtype == torch.float32 and f.device.type == device
        grad = grads[name]
        if name in ("t1", "t2", "t3", "visual.logit_scale"):
            assert torch.all(f == TINY_IMPORTANCE), name
            continue
        sq = grad.double().pow(2)
        expected = sq / (sq.mean() + 1e-20)
        assert torch.allclose(f.double(), expected, rtol=2e-6, atol=0), name
        assert f.double().mean().item() == pytest.approx(1.0, rel=2e-6), name


@pytest.mark.parametrize("device", DEVICES)
def test_penalty_value_and_analytic_gradient_equal_autograd(device):
    g = torch.Generator().manual_seed(4)
    shapes = [(7, 5), (16,), (3, 4, 4), (1,), (64, 32)] * 6
    named = [(f"t{i}", nn.Parameter(torch.randn(s, generator=g).to(device))) for i, s in enumerate(shapes)]
    anchor = {n: (p.detach() + 0.1 * torch.randn(p.shape, generator=g).to(device)) for n, p in named}
    importance = {n: torch.rand(p.shape, generator=g).to(device) * 3.0 for n, p in named}
    importance["t0"] = torch.full((7, 5), TINY_IMPORTANCE, device=device)
    for weight in (0.3, 25.0):
        ref = awc_penalty(named, anchor, importance, weight=weight)
        ref_grads = torch.autograd.grad(ref, [p for _, p in named])
        value, grads = awc_penalty_and_grad(named, anchor, importance, weight=weight)
        assert not value.requires_grad and not any(t.requires_grad for t in grads)
        assert value.item() == pytest.approx(ref.item(), rel=1e-6)
        assert len(grads) == len(named)
        for (name, p), got, want in zip(named, grads, ref_grads):
            assert got.shape == p.shape
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-7 * float(want.abs().max())), name
    # the hand example of test_penalty_hand_example_and_gradient
    theta = nn.Parameter(torch.tensor([1.0, 2.0, 4.0], device=device))
    value, (grad,) = awc_penalty_and_grad([("t", theta)], {"t": torch.tensor([0.0, 2.0, 1.0], device=device)},
                                          {"t": torch.tensor([2.0, 5.0, 0.5], device=device)}, weight=0.1)
    assert value.item() == pytest.approx(0.65) and torch.allclose(grad.cpu(), torch.tensor([0.4, 0.0, 0.3]))
    with pytest.raises(KeyError, match="has no anchor"):
        awc_penalty_and_grad([("other", theta)], {"t": theta.detach()}, {"other": theta.detach()})
    with pytest.raises(KeyError, match="has no importance"):
        awc_penalty_and_grad([("t", theta)], {"t": theta.detach()}, {})


def test_importance_from_a_real_backward():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)
            self.logit_scale = nn.Parameter(torch.tensor(4.6))

    torch.manual_seed(0)
    m = Tiny()
    x = torch.randn(5, 3)
    (m.used(x).pow(2).sum() * m.logit_scale.exp()).backward()
    imp = importance_from_parameters(m.named_parameters())
    assert set(imp) == {"used.weight", "used.bias", "unused.weight", "unused.bias", "logit_scale"}
    assert imp["used.weight"].mean().item() == pytest.approx(1.0, rel=1e-5)
    assert imp["used.bias"].mean().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.all(imp["unused.weight"] == TINY_IMPORTANCE)
    assert torch.all(imp["logit_scale"] == TINY_IMPORTANCE)
    assert not any(f.requires_grad for f in imp.values())
    expected = m.used.weight.grad.pow(2) / m.used.weight.grad.pow(2).mean()
    assert torch.allclose(imp["used.weight"], expected, rtol=1e-5)


def test_penalty_hand_example_and_gradient():
    theta = nn.Parameter(torch.tensor([1.0, 2.0, 4.0]))
    anchor = {"t": torch.tensor([0.0, 2.0, 1.0])}
    importance = {"t": torch.tensor([2.0, 5.0, 0.5])}
    # 2 * 1^2 + 5 * 0^2 + 0.5 * 3^2 = 6.5; lambda = 0.1 -> 0.65
    pen = awc_penalty([("t", theta)], anchor, importance, weight=0.1)
    assert pen.item() == pytest.approx(0.65)
    pen.backward()
    # d/dtheta = lambda * 2 * F * (theta - anchor) = 0.1 * 2 * [2, 0, 1.5]
    assert torch.allclose(theta.grad, torch.tensor([0.4, 0.0, 0.3]))
    with pytest.raises(KeyError):
        awc_penalty([("other", theta)], anchor, importance)


def test_unit_importance_gives_plain_l2_budget():
    g = torch.Generator().manual_seed(1)
    named = [("a", torch.randn(3, 4, generator=g)), ("b", torch.randn(5, generator=g))]
    anchor = {n: torch.randn(p.shape, generator=g) for n, p in named}
    ones = {n: torch.ones_like(p) for n, p in named}
    plain = sum(((p - anchor[n]) ** 2).sum() for n, p in named)
    assert awc_penalty(named, anchor, ones, weight=0.5).item() == pytest.approx(0.5 * plain.item(), rel=1e-6)


def test_snapshot_is_a_detached_copy():
    p = nn.Parameter(torch.ones(2))
    snap = snapshot([("p", p)])
    with torch.no_grad():
        p.add_(1.0)
    assert snap["p"].tolist() == [1.0, 1.0] and not snap["p"].requires_grad


def test_adaptive_mode_replaces_the_importance_every_iteration():
    tracker = ImportanceTracker("adaptive")
    f1, f2 = {"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([2.0, 0.0])}
    assert torch.equal(tracker.update(f1)["w"], f1["w"])
    assert torch.equal(tracker.update(f2)["w"], f2["w"])
    assert tracker.needs_gradients


def test_static_mode_averages_the_first_k_then_freezes_and_equals_ewc():
    tracker = ImportanceTracker("static", static_iterations=3)
    seq = [torch.tensor([1.0, 4.0]), torch.tensor([3.0, 2.0]), torch.tensor([5.0, 0.0]), torch.tensor([100.0, 100.0])]
    outs = [tracker.update({"w": f})["w"].clone() for f in seq]
    assert torch.allclose(outs[0], torch.tensor([1.0, 4.0]))
    assert torch.allclose(outs[1], torch.tensor([2.0, 3.0]))
    assert torch.allclose(outs[2], torch.tensor([3.0, 2.0]))  # mean of the first three
    assert torch.allclose(outs[3], torch.tensor([3.0, 2.0]))  # frozen: the fourth is ignored
    assert tracker.frozen and not tracker.needs_gradients

    # With a fixed importance, static AWC is the EWC penalty lambda * sum F (theta - theta*)^2.
    fixed = ImportanceTracker("static", static_iterations=4)
    fisher = {"a": torch.tensor([[0.5, 2.0], [1.0, 0.0]]), "b": torch.tensor([3.0])}
    for _ in range(6):
        imp = fixed.update(fisher)
    theta = {"a": torch.tensor([[1.0, -1.0], [2.0, 7.0]]), "b": torch.tensor([0.5])}
    star = {"a": torch.tensor([[0.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([1.5])}
    # EWC by hand: 0.5*1 + 2*1 + 1*4 + 0*49 + 3*1 = 9.5; lambda = 2 -> 19
    assert awc_penalty(theta.items(), star, imp, weight=2.0).item() == pytest.approx(19.0)

    # Checkpoint round trip keeps the frozen importance; reset starts over.
    other = ImportanceTracker("static", static_iterations=3)
    other.load_state_dict(tracker.state_dict())
    assert other.frozen and torch.allclose(other.update({"w": torch.zeros(2)})["w"], torch.tensor([3.0, 2.0]))
    other.reset()
    assert other.needs_gradients and other.importance is None
    with pytest.raises(ValueError):
        ImportanceTracker("ewc")
