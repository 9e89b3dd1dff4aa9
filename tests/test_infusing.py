"""Infusing (docs/methods.md section 6): pure losses by hand, and the plugins on a tiny stream."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin
from PIL import Image

from cl_proxyfda.config import parse_config
from cl_proxyfda.yaml_files import read_yaml
from cl_proxyfda.errors import UserError
from cl_proxyfda.knn import knn_accuracy
from cl_proxyfda.losses.infusing import (
    cosine_classifier_ce,
    distill_weight_for_dim,
    embedding_distillation,
    per_tensor_mean_l2,
)
from cl_proxyfda.models import model_transforms
from cl_proxyfda.runner import build_run, execute
from cl_proxyfda.strategies.infusing import (
    BestCheckpointPlugin,
    CosineHeadPlugin,
    GenericDistillPlugin,
    MeanL2Plugin,
    VisionOnlyPlugin,
    batch_source,
    infusing_plugins,
    stratified_split,
)
from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
TASKS = ["warm", "cool"]  # 3 classes each, 6 train / 4 test images per class


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on shared cores: one intra-op thread is faster than oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ pure losses
def test_cosine_classifier_ce_by_hand():
    e = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # normalised: (1, 0), (0, 1); no bias
    y = torch.tensor([0, 0])
    # cosines: row 1 (1, 0), row 2 (0, 1); logits x16: CE1 = log(1 + e^-16), CE2 = log(1 + e^16)
    expected = (math.log1p(math.exp(-16)) + math.log1p(math.exp(16))) / 2
    assert cosine_classifier_ce(e, w, y).item() == pytest.approx(expected, rel=1e-6)
    assert cosine_classifier_ce(e, w, y, scale=1.0).item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2, rel=1e-6)
    # Scale-invariant in the embedding's norm: gradient orthogonal to the embedding.
    cosine_classifier_ce(e, w, y).backward()
    assert torch.allclose((e.grad * e.detach()).sum(dim=1), torch.zeros(2), atol=1e-6)


def test_embedding_distillation_by_hand():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    loss = embedding_distillation(e, t)  # squares 1, 0, 0, 4 -> mean over i and d = 5/4
    assert loss.item() == pytest.approx(1.25)
    loss.backward()
    assert torch.allclose(e.grad, torch.tensor([[0.5, 0.0], [0.0, -1.0]]))  # 2 (e - t) / 4
    with pytest.raises(ValueError):
        embedding_distillation(e, t[:1])


def test_distill_weight_scales_with_dimension():
    assert distill_weight_for_dim(768) == pytest.approx(1000.0)
    assert distill_weight_for_dim(512) == pytest.approx(666.6667, rel=1e-5)
    # constant weight on ||e - t||^2 for normalised embeddings: lambda_d / D
    assert distill_weight_for_dim(512) / 512 == pytest.approx(distill_weight_for_dim(768) / 768)


def test_per_tensor_mean_l2_by_hand():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([[0.5]], requires_grad=True)
    anchors = {"a": torch.zeros(2), "b": torch.tensor([[1.5]])}
    loss = per_tensor_mean_l2([("a", a), ("b", b)], anchors)  # mean(1, 4) + mean(1) = 3.5
    assert loss.item() == pytest.approx(3.5)
    loss.backward()
    assert torch.allclose(a.grad, torch.tensor([1.0, 2.0])) and torch.allclose(b.grad, torch.tensor([[-2.0]]))
    with pytest.raises(ValueError):
        per_tensor_mean_l2([], anchors)


def test_knn_accuracy_by_hand():
    deg = torch.tensor([0.0, 2.0, 4.0, 30.0, 88.0, 90.0, 92.0]) * math.pi / 180
    e = torch.stack([deg.cos(), deg.sin()], dim=1)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1])  # the item at 30 degrees sits among class 0
    assert knn_accuracy(e, y, k=1) == pytest.approx(100 * 6 / 7)
    assert knn_accuracy(e, y, k=3) == pytest.approx(100 * 6 / 7)
    # duplicates: self-exclusion still leaves exactly k others
    dup = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert knn_accuracy(dup, torch.tensor([0, 0, 1, 1]), k=1) == pytest.approx(100.0)
    assert knn_accuracy(dup, torch.tensor([0, 1, 1, 0]), k=1) == pytest.approx(0.0)


def test_knn_accuracy_matches_a_brute_force_vote():
    """A set large enough for faiss's BLAS path: the torch top-k of the cosine matrix
    (self excluded), majority of the labels, gives the same accuracy. Two classes and an
    odd k: no tied votes, so float noise in the similarity tie-break cannot matter."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(300, 64, generator=g)
    y = torch.randint(0, 2, (300,), generator=g)
    e[y == 1] += 0.15  # some structure, so that the score is neither chance nor 100
    x = torch.nn.functional.normalize(e, dim=1)
    sims = x @ x.t()
    sims.fill_diagonal_(-float("inf"))
    scores = []
    for k in (1, 7, 15):
        top = sims.topk(k, dim=1).indices
        majority = (y[top].sum(dim=1) * 2 > k).long()
        expected = 100.0 * float((majority == y).double().mean())
        scores.append(expected)
        assert knn_accuracy(e, y, k=k) == pytest.approx(expected, abs=1e-9)
    assert 55 < max(scores) < 100
    assert knn_accuracy(e, y, k=1000) == knn_accuracy(e, y, k=299)  # k capped at n - 1


def test_stratified_split_is_seeded_and_keeps_every_class():
    targets = [0] * 6 + [1] * 6 + [2] * 1
    train, val = stratified_split(targets, 0.1, seed=3)
    assert sorted(train + val) == list(range(13)) and not set(train) & set(val)
    assert sorted(targets[i] for i in val) == [0, 1]  # one per class, none from the singleton
    assert stratified_split(targets, 0.1, seed=3) == (train, val)


# --------------------------------------------------------------- tiny set-ups
def write_generic_folder(root: Path, per_class: int = 8, size: int = 32) -> Path:
    """root/{dark,light}/*.png: generic images unlike the coloured task images."""
    rng = np.random.default_rng(5)
    for name, level in (("dark", 30), ("light", 225)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(level + rng.normal(0, 15, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def generic_root(tmp_path: Path) -> Path:
    return write_generic_folder(tmp_path / "generic")


def make_run(tmp_path, root, strategies, eval_batch=64, **train):
    cfg = tiny_config(root, tmp_path / "runs", strategies=strategies, stream={"tasks": TASKS}, train={"iterations": 4, **train}, eval={"batch_size": eval_batch})
    return build_run(parse_config(cfg))


class Probe(SupervisedPlugin):
    """Records, before any other plugin adds to it, what the criterion gave each iteration."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.lrs: list[dict] = []
        self.train_sizes: list[int] = []
        self.weights: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def before_training_exp(self, strategy, **kwargs):
        self.train_sizes.append(len(strategy.adapted_dataset))

    def before_backward(self, strategy, **kwargs):
        self.rows.append({
            "exp": strategy.experience_index,
            "source": batch_source(strategy),
            "batch": int(strategy.mb_x.shape[0]),
            "criterion": float(strategy.loss.detach().sum()),
            "labels": strategy.mb_y.tolist(),
        })

    def before_update(self, strategy, **kwargs):
        self.lrs.append({g.get("name", "backbone"): g["lr"] for g in strategy.optimizer.param_groups})

    def after_update(self, strategy, **kwargs):
        step = strategy.clock.train_exp_iterations + 1  # the clock counts in after_training_iteration
        self.weights[(strategy.experience_index, step)] = {n: p.detach().clone() for n, p in strategy.model.named_parameters() if p.requires_grad}


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ alternation
def test_alternation_gives_one_source_per_batch(tmp_path, tiny_stream_root, generic_root):
    run = make_run(tmp_path, tiny_stream_root, [{"name": "infusing_generic", "source": "folder", "root": str(generic_root), "batch_size": 5}], iterations=6, batch_size=8)
    probe = Probe()
    run.strategy.plugins.insert(0, probe)
    execute(run, quiet=True)
    generic = run.plugins[0]
    assert generic.counts == {"downstream": 3, "generic": 3}  # last experience
    for exp in range(2):
        rows = [r for r in probe.rows if r["exp"] == exp]
        assert [r["source"] for r in rows] == ["downstream", "generic"] * 3
        for r in rows:
            if r["source"] == "generic":  # a generic batch, and no downstream cross-entropy
                assert r["batch"] == 5 and r["criterion"] == 0.0 and r["labels"] == [0] * 5
            else:  # the zero-shot text-head cross-entropy of a downstream batch
                assert r["batch"] == 8 and r["criterion"] > 0.0
    assert generic.loss_terms["generic_distill"] >= 0.0
    # 16 generic images, 10% held out per class: 1 + 1 for validation
    assert len(generic.train_pos) == 14 and len(generic.val_pos) == 2
    assert generic.weight == pytest.approx(1000 * 32 / 768)  # auto lambda_d, 32-d tiny model


def test_generic_targets_are_computed_once(tmp_path, tiny_stream_root, generic_root):
    run = make_run(tmp_path, tiny_stream_root, [{"name": "infusing_generic", "source": "folder", "root": str(generic_root), "batch_size": 4}], eval_batch=4, iterations=6)
    teacher = run.strategy.teachers.get(run.model, "pretrained")
    calls = []
    hook = teacher.clip.visual.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    execute(run, quiet=True)
    hook.remove()
    generic = run.plugins[0]
    # 16 generic images at eval batch 4: four teacher forwards for the whole run (2 experiences)
    assert len(calls) == 4 == generic.target_batches and sum(calls) == 16
    assert run.strategy.teachers.forward_count == 0
    # the targets are the pre-trained embeddings of the eval-transformed images
    _, eval_transform = model_transforms(run.model)
    x = torch.stack([eval_transform(generic.generic[i][0]) for i in generic.items])
    with torch.no_grad():
        expected = teacher.encode_image(x)
    assert torch.allclose(generic.targets, expected, atol=1e-5)


def test_joint_mode_adds_a_generic_batch_every_iteration(tmp_path, tiny_stream_root, generic_root):
    run = make_run(tmp_path, tiny_stream_root, [{"name": "infusing_generic", "source": "folder", "root": str(generic_root), "mode": "joint"}], iterations=3)
    probe = Probe()
    run.strategy.plugins.insert(0, probe)
    execute(run, quiet=True)
    assert {r["source"] for r in probe.rows} == {"downstream"} and all(r["criterion"] > 0 for r in probe.rows)
    assert run.plugins[0].counts == {"downstream": 3, "generic": 0} and "generic_distill" in run.plugins[0].loss_terms


# --------------------------------------------------------------------- the head
def test_cosine_head_has_its_own_lr_group_and_replaces_the_text_loss(tmp_path, tiny_stream_root):
    run = make_run(tmp_path, tiny_stream_root, [{"name": "infusing_head", "lr": 3e-3, "weight_decay": 1e-6}], iterations=4, lr=1e-4, schedule="cosine", warmup=1)
    probe = Probe()
    run.strategy.plugins.insert(0, probe)
    text_heads = [run.model.class_embeddings(t).clone() for t in range(2)]
    execute(run, quiet=True)
    head = run.plugins[0]
    assert len(probe.lrs) == 8
    for lrs in probe.lrs:
        assert set(lrs) == {"backbone", "infusing_head"}
        assert lrs["infusing_head"] == pytest.approx(30 * lrs["backbone"])  # same schedule, own base lr
    assert probe.lrs[0]["infusing_head"] == pytest.approx(3e-3)  # warm-up 1 step: full lr at step 0
    assert probe.lrs[2]["infusing_head"] < 3e-3  # cosine decay applies to the head too
    group = next(g for g in run.strategy.optimizer.param_groups if g.get("name") == "infusing_head")
    assert group["weight_decay"] == 1e-6 and group["params"][0] is head.heads[1]
    # the text-head cross-entropy is replaced: the criterion gives 0, the head's CE is added
    assert all(r["criterion"] == 0.0 for r in probe.rows) and head.loss_terms["cosine_ce"] > 0
    for t in range(2):  # text-initialised, then trained
        assert head.heads[t].shape == text_heads[t].shape
        assert not torch.allclose(head.heads[t].detach().cpu(), text_heads[t])
        assert torch.nn.functional.cosine_similarity(head.heads[t].detach().cpu(), text_heads[t]).min() > 0.5
    assert set(head.diagnostics) == {"head_accuracy/warm", "head_accuracy/cool"}
    assert all(0 <= v <= 100 for v in head.diagnostics.values())


def test_random_head_init_is_seeded(tmp_path, tiny_stream_root):
    heads = []
    for k in range(2):
        run = make_run(tmp_path / str(k), tiny_stream_root, [{"name": "infusing_head", "init": "random", "lr": 1e-12}], iterations=1, lr=1e-12)
        execute(run, quiet=True)
        heads.append(run.plugins[0].heads[0].detach().cpu())
    text = run.model.class_embeddings(0)
    assert torch.allclose(heads[0], heads[1])
    assert torch.nn.functional.cosine_similarity(heads[0], text).abs().max() < 0.9


# --------------------------------------------------------------- model selection
def test_selection_restores_the_best_iterate(tmp_path, tiny_stream_root):
    run = make_run(tmp_path, tiny_stream_root, [{"name": "naive"}, {"name": "infusing_select", "every": 2}], iterations=6, lr=1e-2, schedule="constant")
    probe = Probe()
    run.strategy.plugins.append(probe)
    start = trainable(run.model)
    select = run.plugins[1]

    def drift(strategy) -> float:  # later iterates drift further: the earliest scored one is best
        return -sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in strategy.model.named_parameters() if p.requires_grad)

    select.scorer = drift
    execute(run, quiet=True)
    assert [h["best_step"] for h in select.history] == [2, 2] and [h["final_step"] for h in select.history] == [6, 6]
    assert [len(h["evaluations"]) for h in select.history] == [3, 3]  # steps 2, 4, 6
    final = trainable(run.model)
    assert same_weights(final, probe.weights[(1, 2)])
    assert not same_weights(final, probe.weights[(1, 6)])
    assert probe.train_sizes == [15, 15]  # 18 training images, one per class held out


PART_NAMES = ["infusing_vision_only", "infusing_generic", "infusing_head", "infusing_l2", "infusing_select"]


def parts_of(run) -> dict[type, object]:
    """The run's plugins by type (the ``infusing`` entry stands for its parts)."""
    return {type(p): p for p in run.plugins}


def test_full_recipe_end_to_end_with_checkpoint(tmp_path, tiny_stream_root, generic_root):
    from cl_proxyfda.runner import _load_plugin_states

    strategies = [{
        "name": "infusing",
        "generic": {"source": "folder", "root": str(generic_root), "batch_size": 6},
        "select": {"every": 2},
        "l2": {"weight": 1e4},
    }]
    run = make_run(tmp_path, tiny_stream_root, strategies, iterations=6, lr=1e-3, schedule="constant", weight_decay=1e-6)
    # one run-file entry, five plugins on the strategy (no bundle forwarding callbacks)
    assert [p.name for p in run.plugins] == PART_NAMES and run.strategy.plugins[:5] == run.plugins
    probe = Probe()
    run.strategy.plugins.append(probe)
    results = execute(run, quiet=True)
    m = results.matrix()
    assert m.shape == (3, 2) and np.isfinite(m).all()  # zero-shot text-head accuracy, every task
    parts = parts_of(run)
    generic, head, l2, select = parts[GenericDistillPlugin], parts[CosineHeadPlugin], parts[MeanL2Plugin], parts[BestCheckpointPlugin]
    terms = {k: v for p in run.plugins for k, v in p.loss_terms.items()}
    assert set(terms) == {"cosine_ce", "generic_distill", "mean_l2"} and terms["mean_l2"] > 0
    hist = select.history
    assert len(hist) == 2
    for exp, h in enumerate(hist):
        scores = [e[3] for e in h["evaluations"]]
        assert [e[0] for e in h["evaluations"]] == [2.0, 4.0, 6.0]
        for step, down, gen, score in h["evaluations"]:
            assert 0 <= down <= 100 and 0 <= gen <= 100 and score == pytest.approx((down + gen) / 2)
        assert h["best_score"] == max(scores) and h["best_step"] == h["evaluations"][scores.index(max(scores))][0]
    assert same_weights(trainable(run.model), probe.weights[(1, hist[1]["best_step"])])
    assert select.generic_kind(generic) == "knn"
    assert set(head.diagnostics) == {"head_accuracy/warm", "head_accuracy/cool"}
    # the head's diagnostics reach the run's rows like any plugin's
    assert {k: v for k, v in results.diagnostics[-1].items() if k.startswith("head_accuracy/")} == head.diagnostics

    # the run's checkpoint loads with weights_only=True and holds each part's state
    ckpts = sorted((tmp_path / "runs" / "tiny" / "checkpoints").rglob("*.pt"))
    assert ckpts
    state = torch.load(ckpts[-1], weights_only=True)
    assert list(state["plugins"]) == [f"{i}:{name}" for i, name in enumerate(PART_NAMES)]
    assert torch.equal(state["plugins"]["1:infusing_generic"]["targets"], generic.targets)

    # the runner's restore path gives every part of a fresh run its state back
    buf = io.BytesIO()
    torch.save(state["plugins"], buf)
    buf.seek(0)
    other_run = make_run(tmp_path / "again", tiny_stream_root, strategies)
    _load_plugin_states(other_run, torch.load(buf, weights_only=True), tmp_path)
    other = parts_of(other_run)
    for t in (0, 1):
        assert torch.equal(other[CosineHeadPlugin].heads[t].detach(), head.heads[t].detach().cpu())
    assert torch.equal(other[GenericDistillPlugin].targets, generic.targets)
    assert other[GenericDistillPlugin].target_batches == generic.target_batches
    assert other[BestCheckpointPlugin].history == hist and other[CosineHeadPlugin].diagnostics == head.diagnostics
    assert all(torch.equal(other[MeanL2Plugin].anchors[k], l2.anchors[k]) for k in l2.anchors)
    with pytest.raises(UserError, match="written with strategies"):  # a run with other parts refuses it
        _load_plugin_states(make_run(tmp_path / "parts", tiny_stream_root, [{"name": "infusing_l2"}]), state["plugins"], tmp_path)


def test_python_parts_yaml_parts_and_recipe_train_alike(tmp_path, tiny_stream_root, generic_root):
    """The recipe from Python objects, from four YAML entries and from one: same weights."""
    from cl_proxyfda.strategies.base import RunContext
    from cl_proxyfda.strategies.infusing import folder_images

    generic = {"source": "folder", "root": str(generic_root), "batch_size": 4}
    train = {"iterations": 4, "lr": 1e-3, "schedule": "constant"}
    recipe = make_run(tmp_path / "a", tiny_stream_root, [{"name": "infusing", "generic": generic, "select": {"every": 2}}], **train)
    parts = make_run(tmp_path / "b", tiny_stream_root, [
        {"name": "infusing_generic", **generic}, {"name": "infusing_head"}, {"name": "infusing_l2"}, {"name": "infusing_select", "every": 2},
    ], **train)
    python = make_run(tmp_path / "c", tiny_stream_root, [{"name": "naive"}], **train)
    evals = RunContext(eval_batch_size=64)  # the run file's eval.batch_size (else the strategy's)
    python.strategy.plugins[0:0] = infusing_plugins(
        head=CosineHeadPlugin(scale=16.0, init="text", lr=1e-3, weight_decay=1e-6),
        generic=GenericDistillPlugin(generic=folder_images(generic_root), batch_size=4, run=evals),
        l2=MeanL2Plugin(weight=1e4),
        select=BestCheckpointPlugin(every=2, run=evals),
    )
    for run in (recipe, parts, python):
        execute(run, quiet=True)
    w = [trainable(r.model) for r in (recipe, parts, python)]
    assert same_weights(w[0], w[1]) and same_weights(w[0], w[2])
    start = trainable(make_run(tmp_path / "d", tiny_stream_root, [{"name": "naive"}]).model)
    assert not same_weights(w[0], start)


def test_recipe_from_python_keywords_matches_the_run_file(tmp_path, tiny_stream_root, generic_root):
    from cl_proxyfda.registry import STRATEGIES
    from cl_proxyfda.strategies.base import RunContext
    from cl_proxyfda.strategies.infusing import Infusing

    args = {"generic": {"source": "folder", "root": str(generic_root), "mode": "joint"}, "select": None, "vision_only": False}
    cfg = parse_config(tiny_config(tiny_stream_root, tmp_path, strategies=[{"name": "infusing", **args}]))
    from_file = STRATEGIES.build_plugins("infusing", cfg.strategies[0].params, RunContext(seed=2))
    from_python = Infusing(**args).plugins()
    assert [p.name for p in from_file] == [p.name for p in from_python] == ["infusing_generic", "infusing_head", "infusing_l2"]
    assert [p.params for p in from_file] == [p.params for p in from_python]
    assert all(p.run == RunContext(seed=2) for p in from_file)
    assert [type(p) for p in infusing_plugins(l2=MeanL2Plugin())] == [VisionOnlyPlugin, MeanL2Plugin]
    assert STRATEGIES.build_plugins("infusing_l2", {"weight": 2.0})[0].params.weight == 2.0


def test_the_head_needs_a_criterion_gate_on_a_hand_built_template(tiny_stream_root):
    """A bare SupervisedTemplate cannot mute its criterion: one clear error; with the
    GatedCriterion mixin the head's loss replaces the criterion."""
    from avalanche.training.templates import SupervisedTemplate

    from cl_proxyfda.benchmarks.stream import to_avalanche
    from cl_proxyfda.criterion_gate import GatedCriterion
    from cl_proxyfda.models import build_task_model
    from cl_proxyfda.registry import STREAMS

    class Gated(GatedCriterion, SupervisedTemplate):
        pass

    torch.manual_seed(0)
    stream = STREAMS.build("image_folder", {"root": str(tiny_stream_root), "tasks": TASKS})
    model, train_tf, eval_tf = build_task_model("cl-test-tiny", None, [t.vocabulary for t in stream.tasks])
    experience = to_avalanche(stream.tasks, train_tf, eval_tf).train_stream[0]

    def strategy(cls, plugins):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        return cls(model=model, optimizer=opt, train_mb_size=6, train_epochs=1, plugins=plugins, evaluator=None)

    with pytest.raises(UserError, match="^infusing_head: the strategy's criterion cannot be muted"):
        strategy(SupervisedTemplate, [CosineHeadPlugin()]).train(experience, eval_streams=[])
    probe, head = Probe(), CosineHeadPlugin()
    gated = strategy(Gated, [probe, head])
    gated.experience_index = 0  # read by the probe
    gated.train(experience, eval_streams=[])
    assert len(probe.rows) == 3 and all(r["criterion"] == 0.0 for r in probe.rows)
    assert head.loss_terms["cosine_ce"] > 0 and not gated.criterion_gate.muted  # unmuted after training


def test_alignment_score_without_labels(tmp_path, tiny_stream_root, generic_root):
    """Unlabelled generic images (one folder): the auto score is the cosine to the targets."""
    flat = write_generic_folder(tmp_path / "flat_src")
    unlabelled = tmp_path / "flat" / "all"
    unlabelled.mkdir(parents=True)
    for p in sorted(flat.rglob("*.png")):
        p.rename(unlabelled / f"{p.parent.name}_{p.name}")
    strategies = [{"name": "infusing", "generic": {"source": "folder", "root": str(tmp_path / "flat")}, "select": {"every": 3, "include_start": True}}]
    run = make_run(tmp_path, tiny_stream_root, strategies, iterations=3, lr=1e-12, schedule="constant")
    execute(run, quiet=True)
    parts = parts_of(run)
    assert parts[BestCheckpointPlugin].generic_kind(parts[GenericDistillPlugin]) == "alignment"
    start = parts[BestCheckpointPlugin].history[0]["evaluations"][0]
    assert start[0] == 0.0 and start[2] == pytest.approx(100.0, abs=1e-3)  # pre-trained = targets


# ------------------------------------------------------------- config and errors
def test_generic_sources(tmp_path, tiny_stream_root):
    from cl_proxyfda.registry import STREAMS
    from cl_proxyfda.strategies.infusing import generic_dataset

    with pytest.raises(UserError, match="no reference images"):
        make_run(tmp_path, tiny_stream_root, [{"name": "infusing"}])
    stream = STREAMS.build("image_folder", {"root": str(tiny_stream_root), "tasks": TASKS, "control": "mixed"})
    assert generic_dataset("control", None, stream) is stream.control.test  # 2 classes x 4 test images
    with pytest.raises(UserError, match="needs a root"):
        generic_dataset("folder", None, stream)
    with pytest.raises(UserError, match="does not exist"):
        generic_dataset("folder", str(tmp_path / "missing"), stream)


def test_vision_only_refuses_a_trainable_text_tower(tmp_path, tiny_stream_root, generic_root):
    cfg = tiny_config(tiny_stream_root, tmp_path / "runs", strategies=[{"name": "infusing", "generic": {"source": "folder", "root": str(generic_root)}}], stream={"tasks": TASKS}, model={"train_towers": ["image", "text"]})
    run = build_run(parse_config(cfg))
    with pytest.raises(UserError, match="image tower only"):
        execute(run, quiet=True)


def test_demo_config_parses():
    cfg = parse_config(read_yaml(REPO / "configs" / "demo_infusing.yaml"))
    assert [s.name for s in cfg.strategies] == ["infusing"] and cfg.stream.name == "demo"
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 1e-6 and cfg.train.schedule == "constant"
