"""The task model's one way to read features: ``last_features`` of the task forward,
``side_forward`` for extra forwards, ``image_features`` for one pass (teachers), and
``capture_layers`` / ``captured_layers``; private state stays inside models.py."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate

from cl_proxyfda.benchmarks.stream import ArrayImageDataset, Task, to_avalanche
from cl_proxyfda.models import build_task_model
from cl_proxyfda.strategies.ldifs import LDIFSPlugin
from cl_proxyfda.teacher import student_outputs, teacher_bank

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["ln_pre", "block1"]


def make_task(name: str, seed: int, n_classes: int = 3, per_class: int = 4) -> Task:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    images = rng.integers(0, 255, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    ds = ArrayImageDataset(images, labels.tolist())
    return Task(name, [f"{name}{c}" for c in range(n_classes)], ["a photo of {}."], ds, ds)


def tiny_model(n_tasks: int = 1):
    torch.manual_seed(0)
    tasks = [make_task(f"t{i}", seed=20 + i) for i in range(n_tasks)]
    model, _, pre_eval = build_task_model("cl-test-tiny", None, [t.vocabulary for t in tasks])
    return model, tasks, pre_eval


def images(seed: int, n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_last_features_are_those_of_the_task_forward_with_their_layers():
    model, _, _ = tiny_model()
    assert model.last_features() == {}
    model.capture_layers(LAYERS)
    assert model.captured_layers == tuple(LAYERS)
    x = images(0)
    logits = model(x, 0)
    feats = model.last_features()
    assert set(feats) >= {"image_embeds", "layers"} and set(feats["layers"]) == set(LAYERS)
    assert feats["image_embeds"].shape == (6, 32) and feats["layers"]["block1"].shape[0] == 6
    assert feats["image_embeds"].requires_grad  # the graph is kept: regularisers need no second forward
    torch.testing.assert_close(feats["image_embeds"].norm(dim=-1), torch.ones(6))
    # the logits are built from exactly these embeddings
    head = model.class_embeddings(0)
    torch.testing.assert_close(logits, model.logit_scale * feats["image_embeds"] @ head.t())
    # a second task forward replaces them
    model(images(1), 0)
    assert not torch.equal(model.last_features()["layers"]["block1"], feats["layers"]["block1"])


def test_a_side_forward_leaves_the_features_the_task_step_reads():
    model, _, _ = tiny_model()
    model.capture_layers(LAYERS)
    x, other = images(0), images(1)
    model(x, 0)
    before = model.last_features()
    with model.side_forward():
        model(other, 0)  # a whole task forward on other data
        inner = model.last_features()
        model.encode_image(other)
        model.encode_text(["a photo of t00."])
    # inside, the side forward's own features are visible; they differ from the batch's
    assert not torch.equal(inner["layers"]["block1"], before["layers"]["block1"])
    after = model.last_features()
    for name in LAYERS:
        assert after["layers"][name] is before["layers"][name]
    assert after["image_embeds"] is before["image_embeds"]
    # without the context a task forward does replace them (the context is what keeps them)
    model(other, 0)
    torch.testing.assert_close(model.last_features()["layers"]["block1"], inner["layers"]["block1"], rtol=0, atol=0)


def test_an_image_tower_pass_never_replaces_the_task_forwards_layers():
    """encode_image / image_features on other images (as GIFT, ZSCL, Infusing run them)
    leave the task batch's captured layers, and image_features returns that pass's own."""
    model, _, _ = tiny_model()
    model.capture_layers(LAYERS)
    x, other = images(0), images(1)
    model(x, 0)
    batch = model.last_features()
    model.encode_image(other)
    own = model.image_features(other)
    assert set(own["layers"]) == set(LAYERS)
    after = model.last_features()
    assert all(after["layers"][k] is batch["layers"][k] for k in LAYERS)
    # image_features of the batch's images reproduces what the task forward recorded
    with torch.no_grad():
        again = model.image_features(x)
    for name in LAYERS:
        torch.testing.assert_close(again["layers"][name], batch["layers"][name].detach(), rtol=0, atol=0)
    # (ln_pre's class token is the same for every image: class embedding + position 0)
    assert not torch.allclose(own["layers"]["block1"], batch["layers"]["block1"].detach())
    torch.testing.assert_close(again["image_embeds"], batch["image_embeds"].detach(), rtol=0, atol=0)


def test_mixed_task_batch_keeps_every_rows_features():
    model, _, _ = tiny_model(n_tasks=2)
    model.capture_layers(LAYERS)
    x = images(0, n=8)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    model(x, labels)
    mixed = model.last_features()
    with torch.no_grad():
        whole = model.image_features(x)
    assert mixed["image_embeds"].shape == (8, 32)
    for name in LAYERS:  # rows in their places (each task's rows went through the tower apart)
        assert mixed["layers"][name].shape == whole["layers"][name].shape
        torch.testing.assert_close(mixed["layers"][name].detach(), whole["layers"][name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed["image_embeds"].detach(), whole["image_embeds"], rtol=1e-5, atol=1e-5)


def test_capture_layers_is_idempotent_and_a_copy_has_its_own_features():
    model, _, _ = tiny_model()
    model.capture_layers(["block1"])
    model.capture_layers(["ln_pre", "block1"])
    model.capture_layers(["block1"])
    assert model.captured_layers == ("block1", "ln_pre")
    blocks = model.clip.visual.transformer.resblocks
    assert len(blocks[0]._forward_hooks) == 1 and len(model.clip.visual.ln_pre._forward_hooks) == 1
    x = images(0)
    model(x, 0)
    batch = model.last_features()
    teacher = copy.deepcopy(model)  # a frozen reference: no features, its own capture
    assert teacher.last_features() == {} and teacher.captured_layers == ("block1", "ln_pre")
    with torch.no_grad():
        teacher.image_features(images(1))
        teacher(images(1), 0)
    assert all(model.last_features()["layers"][k] is batch["layers"][k] for k in ("block1", "ln_pre"))
    with pytest.raises(Exception, match="unknown feature layer 'block9'"):
        model.capture_layers(["block9"])


class SideForward(SupervisedPlugin):
    """Runs an extra task forward of the student on other images in ``before_backward``
    (before LDIFS reads its features), inside ``side_forward`` or not."""

    def __init__(self, guarded: bool) -> None:
        super().__init__()
        self.guarded = guarded
        self.calls = 0

    def before_backward(self, strategy, **kwargs):
        model = strategy.model
        other = images(100 + self.calls, n=strategy.mb_x.shape[0])
        if self.guarded:
            with model.side_forward():
                model(other, 0)
        else:
            model(other, 0)
        self.calls += 1


class Recorder(SupervisedPlugin):
    def __init__(self, ldifs: LDIFSPlugin) -> None:
        super().__init__()
        self.ldifs, self.values, self.rows = ldifs, [], []

    def before_backward(self, strategy, **kwargs):
        self.values.append(self.ldifs.loss_terms["ldifs"])
        self.rows.append(student_outputs(strategy)["layers"]["block1"].shape[0])


def train_ldifs(side: SideForward | None) -> tuple[list[float], SupervisedTemplate]:
    model, tasks, pre_eval = tiny_model()
    bench = to_avalanche(tasks, pre_eval, pre_eval)
    ldifs = LDIFSPlugin(weight=1.0, layers=LAYERS)
    recorder = Recorder(ldifs)
    plugins = ([side] if side is not None else []) + [ldifs, recorder]
    strategy = SupervisedTemplate(
        model=model,
        optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=4,
        train_epochs=1,
        device="cpu",
        plugins=plugins,
        evaluator=None,
    )
    torch.manual_seed(1)
    strategy.train(bench.train_stream[0], eval_streams=[])
    assert recorder.rows == [4, 4, 4]
    return recorder.values, strategy


def test_ldifs_reads_the_task_batch_through_a_guarded_side_forward():
    """A plugin's side forward inside ``side_forward`` (run before LDIFS in the same
    callback) does not change the layer features LDIFS reads: its loss is bit-identical
    to a run without the side forward; an unguarded task forward changes it."""
    plain, strategy = train_ldifs(None)
    guarded, _ = train_ldifs(SideForward(guarded=True))
    unguarded, _ = train_ldifs(SideForward(guarded=False))
    assert len(plain) == 3 and plain[0] == pytest.approx(0.0, abs=1e-9)  # student == teacher before the first step
    assert plain[1] > 1e-6
    assert guarded == plain
    assert unguarded[1:] != plain[1:]  # the control: reading the side batch's features
    assert teacher_bank(strategy).forward_count == 3


PRIVATE = re.compile(r"\._sink\b|\._last\b|\.last\b(?!_)|\._layer_names\b|\._cl_sink\b|keep_captured_features")


def test_private_feature_state_is_read_only_inside_models_py():
    offenders = []
    for folder in ("cl_proxyfda", "strategies", "benchmarks", "generators", "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "models.py" and path.parent.name == "cl_proxyfda" or path.name == "test_models.py":
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                if PRIVATE.search(code) and not re.search(r"\b(p|entry|published)\.last\b", code):
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []
