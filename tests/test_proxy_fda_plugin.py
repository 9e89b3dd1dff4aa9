"""Proxy-FDA / FDA plugin on a real Avalanche SupervisedTemplate with the tiny CLIP."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from pydantic import ValidationError

from cl_proxyfda.benchmarks.stream import ArrayImageDataset, Task, to_avalanche
from cl_proxyfda.errors import UserError
from cl_proxyfda.models import build_task_model
from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.proxy_fda import FDAParams, ProxyFDAParams, ProxyFDAPlugin
from cl_proxyfda.teacher import teacher_bank

torch.set_num_threads(1)

BATCH = 12
K = 4


def make_task(name: str, seed: int, n_classes: int = 3, per_class: int = 8) -> Task:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    base = rng.integers(0, 255, size=(n_classes, 1, 1, 3))
    images = np.clip(base[labels] + rng.normal(0, 40, size=(len(labels), 32, 32, 3)), 0, 255).astype(np.uint8)
    ds = ArrayImageDataset(images, labels.tolist())
    return Task(name, [f"{name}{c}" for c in range(n_classes)], ["a photo of {}."], ds, ds)


def setup(n_tasks: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    tasks = [make_task(f"t{i}", seed=10 + i) for i in range(n_tasks)]
    model, pre_train, pre_eval = build_task_model("cl-test-tiny", None, [t.vocabulary for t in tasks])
    return model, to_avalanche(tasks, pre_eval, pre_eval)  # eval transform for both: deterministic inputs


class LossRecorder(SupervisedPlugin):
    """Records ``strategy.loss`` in ``before_backward`` (its place in the plugin list matters)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[float] = []

    def before_backward(self, strategy, **kwargs):
        self.values.append(float(strategy.loss.detach()))


def train(model, benchmark, plugins, experiences=(0,), seed: int = 0) -> SupervisedTemplate:
    strategy = SupervisedTemplate(
        model=model,
        optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=BATCH,
        train_epochs=1,
        device="cpu",
        plugins=list(plugins),
        evaluator=None,
    )
    for i in experiences:
        torch.manual_seed(seed + i)
        strategy.train(benchmark.train_stream[i], eval_streams=[])
    return strategy


def plugin(**kw) -> ProxyFDAPlugin:
    return STRATEGIES.build("proxy_fda", {"k": K, **kw})


# --------------------------------------------------------------------------- tests
def test_params_defaults_and_validation():
    p = ProxyFDAParams()
    assert (p.weight, p.k, p.tau_init, p.bias_init, p.n_proxies, p.generator_lr, p.generator_alpha) == (1.0, 8, 0.1, -10.0, 4, 1e-3, 1.0)
    assert (p.feature, p.reference, p.neg_weight, p.graph, p.proxies, p.learn_tau_bias) == ("embed", "pretrained", "clamp0", "batch", True, False)
    with pytest.raises(ValidationError):
        ProxyFDAParams(tau=0.1)  # unknown key
    with pytest.raises(ValidationError):
        ProxyFDAParams(feature="layer7")
    with pytest.raises(ValidationError):
        FDAParams(proxies=True)  # fda has no proxy options
    fda = STRATEGIES.build("fda", {"k": K})
    assert fda.name == "fda" and not fda.params.proxies and fda.generator is None
    assert plugin().name == "proxy_fda"


def test_adds_a_positive_fda_term_on_top_of_the_task_loss():
    model, bench = setup()
    naive_rec = LossRecorder()
    train(model, bench, [naive_rec])

    model, bench = setup()
    before, after = LossRecorder(), LossRecorder()
    fda = plugin(weight=2.0)
    train(model, bench, [before, fda, after])
    assert len(after.values) == 2  # 24 images, batches of 12
    # same initial model and batch: the first task loss equals the naive one
    assert before.values[0] == pytest.approx(naive_rec.values[0], rel=1e-5)
    added = after.values[-1] - before.values[-1]
    assert added > 0
    expected = 2.0 * fda.loss_terms["proxy_fda"] + fda.loss_terms["proxy_fda_generator"]
    assert added == pytest.approx(expected, rel=1e-4)


def test_tau_bias_and_generator_learn_and_model_trains():
    model, bench = setup()
    fda = plugin(learn_tau_bias=True, bias_init=0.0)  # the option; fixed by default
    train(model, bench, [fda])
    assert fda.generator is not None
    start_gen = {k: v.clone() for k, v in fda.generator.state_dict().items()}
    tau, bias = fda.tau, fda.bias
    assert tau != pytest.approx(0.1, abs=1e-6) and bias != pytest.approx(0.0, abs=1e-6)  # one experience already stepped
    train(model, bench, [fda])
    assert fda.tau != pytest.approx(tau, abs=1e-6) and fda.bias != pytest.approx(bias, abs=1e-6)
    moved = max(float((v - start_gen[k]).abs().max()) for k, v in fda.generator.state_dict().items() if v.is_floating_point())
    assert moved > 1e-5
    assert all(p.grad is None for p in fda.head.parameters())  # zeroed after each own step
    d = fda.diagnostics  # the experience's proxy diagnostics, sampled batches
    assert d["proxy_fda_members_pos"] >= 1.0 and d["proxy_fda_members_neg"] >= 1.0
    assert 0.0 <= d["proxy_fda_hull_distance"] < 1.0 and math.isfinite(d["proxy_fda_hardness_pos"])


def test_frozen_tau_bias_stay_fixed():
    model, bench = setup()
    fda = STRATEGIES.build("fda", {"k": K, "learn_tau_bias": False, "tau_init": 0.05, "bias_init": -1.0})
    train(model, bench, [fda])
    assert fda.tau == pytest.approx(0.05) and fda.bias == pytest.approx(-1.0)
    assert fda.head.optimizer is None and math.isfinite(fda.loss_terms["fda"])


def test_one_teacher_forward_per_batch_with_two_plugins():
    model, bench = setup()
    a, b = plugin(), STRATEGIES.build("fda", {"k": K, "neg_weight": "one_minus"})
    strategy = train(model, bench, [a, b])
    assert teacher_bank(strategy).forward_count == 2  # 2 batches, one forward each
    assert a.loss_terms["proxy_fda"] != pytest.approx(b.loss_terms["fda"])


def test_state_dict_round_trips_through_weights_only_load(tmp_path):
    model, bench = setup()
    fda = plugin(learn_tau_bias=True)
    train(model, bench, [fda])
    torch.save(fda.state_dict(), tmp_path / "plugin.pt")
    state = torch.load(tmp_path / "plugin.pt", weights_only=True)
    fresh = plugin(learn_tau_bias=True)
    fresh.load_state_dict(state)
    assert fresh.tau == pytest.approx(fda.tau) and fresh.bias == pytest.approx(fda.bias)
    for key, value in fda.generator.state_dict().items():
        assert torch.equal(fresh.generator.state_dict()[key], value)
    ours, theirs = fda.head.optimizer.state_dict(), fresh.head.optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for idx, slot in ours["state"].items():
        assert torch.equal(slot["exp_avg"], theirs["state"][idx]["exp_avg"])
    # the loaded plugin keeps training from there
    train(model, bench, [fresh])
    assert fresh.tau != pytest.approx(fda.tau, abs=1e-7)
    with pytest.raises(ValueError, match="does not know"):
        fresh.load_state_dict({**state, "extra": 1})


def test_batch_graph_has_k_positives_per_anchor():
    model, bench = setup()
    fda = plugin()
    train(model, bench, [fda])
    assert fda.positives_per_anchor == K


def test_graph_bank_is_refused_with_the_reason():
    with pytest.raises(Exception, match="graph: bank was removed"):
        plugin(graph="bank")


def test_previous_reference_over_two_experiences():
    model, bench = setup(n_tasks=2)
    fda = plugin(reference="previous")
    strategy = train(model, bench, [fda], experiences=(0,))
    assert fda.positives_per_anchor == K
    at_start = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    strategy.train(bench.train_stream[1], eval_streams=[])
    assert fda.positives_per_anchor == K
    assert math.isfinite(fda.loss_terms["proxy_fda"]) and math.isfinite(fda.loss_terms["proxy_fda_generator"])
    previous = teacher_bank(strategy).models["previous"].state_dict()
    # "previous" = the model at the start of experience 2, not the pre-trained or final one
    assert all(torch.equal(previous[k], v) for k, v in at_start.items())
    assert any(not torch.equal(previous[k], v) for k, v in model.state_dict().items())


def test_named_layer_feature():
    model, bench = setup()
    fda = plugin(feature="block1")
    assert fda.needs_layers == ("block1",)
    strategy = train(model, bench, [fda])
    assert "block1" in model.last_features()["layers"]
    assert math.isfinite(fda.loss_terms["proxy_fda"])
    assert teacher_bank(strategy).forward_count == 2


def test_k_not_below_batch_size_is_a_user_error():
    model, bench = setup()
    with pytest.raises(UserError, match="K = 12"):
        train(model, bench, [STRATEGIES.build("fda", {"k": BATCH})])
