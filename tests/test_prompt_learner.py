"""CoOp prompt learner and Proxy-FDA on class embeddings (tiny open_clip model)."""
from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from avalanche.training.templates import SupervisedTemplate
from pydantic import ValidationError

from cl_proxyfda.benchmarks.stream import ArrayImageDataset, Task, to_avalanche
from cl_proxyfda.errors import ConfigError, UserError
from cl_proxyfda.models import TaskVocabulary, build_task_model
from cl_proxyfda.prompt_learner import PromptLearner, PromptLearnerConfig, attach_prompt_learner, build_prompt_learner
from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.coop import (
    CoOpPlugin,
    PromptFDA,
    PromptFDAParams,
    PromptFDAPlugin,
    graph_mismatch,
    template_class_embeddings,
)

torch.set_num_threads(1)

VOCAB = [
    TaskVocabulary("colours", ["red", "dark green", "blue"], ["a photo of a {}.", "a {} thing."]),
    TaskVocabulary("pets", ["cat", "dog"], ["a photo of a {}."]),
]
MANY = ["red", "green", "blue", "yellow", "purple", "cyan", "orange", "gray", "circle", "square", "triangle", "star", "cat", "dog", "car", "tree"]


def tiny_model(vocab=VOCAB, seed: int = 0):
    torch.manual_seed(seed)
    model, _, pre_eval = build_task_model("cl-test-tiny", None, vocab)
    return model, pre_eval


def hand_written(model, names: list[str], phrase: str) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.clip.encode_text(model.tokenizer([f"{phrase} {c}." for c in names])), dim=-1)


# ----------------------------------------------------------------- the learner
def test_config_defaults_and_unknown_keys():
    cfg = PromptLearnerConfig()
    assert (cfg.n_ctx, cfg.class_specific, cfg.init) == (16, False, "random")
    with pytest.raises(ValidationError):
        PromptLearnerConfig(n_ctx=4, ctx_init="a photo of a")
    with pytest.raises(ValidationError):
        PromptLearnerConfig(n_ctx=0)


@pytest.mark.parametrize("class_specific", [False, True])
def test_phrase_context_reproduces_encode_text(class_specific):
    model, _ = tiny_model()
    learner = PromptLearner(model.clip, model.tokenizer, [v.classnames for v in VOCAB], class_specific=class_specific, init="a photo of a")
    assert learner.n_ctx == 4  # the phrase's token count replaces n_ctx
    for t, vocab in enumerate(VOCAB):
        got = learner.class_embeddings(t)
        want = hand_written(model, vocab.classnames, "a photo of a")
        assert got.shape == (len(vocab.classnames), 32)
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(got.norm(dim=-1), torch.ones(len(got)), atol=1e-5)


def test_random_context_shapes_and_scale():
    model, _ = tiny_model()
    shared = PromptLearner(model.clip, model.tokenizer, [v.classnames for v in VOCAB], n_ctx=4)
    assert tuple(shared.ctx.shape) == (4, 64)
    torch.manual_seed(1)
    csc = PromptLearner(model.clip, model.tokenizer, [v.classnames for v in VOCAB], n_ctx=4, class_specific=True)
    assert [tuple(p.shape) for p in csc.ctx_per_task] == [(3, 4, 64), (2, 4, 64)]
    values = torch.cat([p.detach().flatten() for p in csc.ctx_per_task])
    assert abs(float(values.std()) - 0.02) < 0.002 and abs(float(values.mean())) < 0.002
    # a random context is not the hand-written prompt
    assert not torch.allclose(shared.class_embeddings(0), hand_written(model, VOCAB[0].classnames, "a photo of a"), atol=1e-2)


def test_shared_context_prompts_any_class_name():
    model, _ = tiny_model()
    learner = PromptLearner(model.clip, model.tokenizer, [v.classnames for v in VOCAB], n_ctx=4)
    with torch.no_grad():
        assert torch.allclose(learner.encode_names(VOCAB[1].classnames), learner.class_embeddings(1), atol=1e-6)
    csc = PromptLearner(model.clip, model.tokenizer, [v.classnames for v in VOCAB], n_ctx=4, class_specific=True)
    with pytest.raises(UserError, match="class-specific"):
        csc.encode_names(["owl"])


def test_prompt_that_does_not_fit_the_context_length():
    model, _ = tiny_model()
    with pytest.raises(UserError, match="'a rather long class name with many words'.*holds 16"):
        PromptLearner(model.clip, model.tokenizer, [["cat", "a rather long class name with many words"]], n_ctx=8)


def test_only_the_context_gets_gradients():
    model, pre_eval = tiny_model()
    learner = attach_prompt_learner(model, PromptLearnerConfig(n_ctx=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_learner.ctx"]
    x = torch.stack([pre_eval(ArrayImageDataset(np.full((1, 32, 32, 3), v, np.uint8), [0])[0][0]) for v in (10, 200)])
    emb = learner.class_embeddings(0)
    logits = model.logit_scale * model.encode_image(x) @ emb.t()
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert learner.ctx.grad is not None and float(learner.ctx.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.clip.parameters())


def test_cache_follows_context_updates():
    model, _ = tiny_model()
    learner = attach_prompt_learner(model, PromptLearnerConfig(n_ctx=4))
    with torch.no_grad():
        first = learner.class_embeddings(0)
        assert learner.class_embeddings(0) is first  # cached while the context is unchanged
    optimizer = torch.optim.SGD([learner.ctx], lr=1.0)
    learner.class_embeddings(0).sum().backward()  # with gradients: recomputed, never cached
    optimizer.step()
    with torch.no_grad():
        after = learner.class_embeddings(0)
    assert after is not first and not torch.allclose(after, first)
    with torch.no_grad():
        learner.ctx.zero_()
        assert not torch.allclose(learner.class_embeddings(0), after)


def test_attach_checks_and_state_round_trip():
    model, _ = tiny_model()
    other, _ = tiny_model(vocab=VOCAB[:1])
    with pytest.raises(ValueError, match="another CLIP"):
        attach_prompt_learner(model, build_prompt_learner(other, PromptLearnerConfig(n_ctx=4)))
    with pytest.raises(ValueError, match="differ"):
        attach_prompt_learner(model, PromptLearner(model.clip, model.tokenizer, [["cat"]], n_ctx=4))
    learner = attach_prompt_learner(model, PromptLearnerConfig(n_ctx=4))
    with torch.no_grad():
        learner.ctx.add_(0.3)
    state = model.state_dict()
    assert [k for k in state if k.startswith("prompt_learner")] == ["prompt_learner.ctx"]  # token ids are not saved
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh, _ = tiny_model(seed=5)
    attach_prompt_learner(fresh, PromptLearnerConfig(n_ctx=4))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert torch.allclose(fresh.prompt_learner.class_embeddings(1), learner.class_embeddings(1), atol=1e-6)
    twin = copy.deepcopy(model)  # what the frozen teachers are made of
    assert twin.prompt_learner.clip is twin.clip and twin.clip is not model.clip
    with torch.no_grad():
        assert torch.allclose(twin.prompt_learner.class_embeddings(0), learner.class_embeddings(0))


def test_task_model_classifies_with_learned_prompts():
    """Needs the CLIPTaskModel wiring (class_embeddings consults prompt_learner)."""
    model, pre_eval = tiny_model()
    learner = attach_prompt_learner(model, PromptLearnerConfig(init="a photo of a"))
    with torch.no_grad():
        learner.ctx.add_(0.5)  # move away from the hand-written prompt
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.class_embeddings(1), learner.class_embeddings(1))
        x = pre_eval(ArrayImageDataset(np.full((1, 32, 32, 3), 90, np.uint8), [0])[0][0]).unsqueeze(0)
        logits = model(x, 0)
        assert torch.allclose(logits, model.logit_scale * model.encode_image(x) @ learner.class_embeddings(0).t())


# ------------------------------------------------------------ Proxy-FDA on prompts
def test_prompt_fda_restores_reference_neighbourhoods():
    """Class-specific random contexts scramble the class graph; a few steps of the loss repair it."""
    vocab = [TaskVocabulary("many", MANY, ["a photo of a {}."])]
    model, _ = tiny_model(vocab)
    learner = attach_prompt_learner(model, PromptLearnerConfig(n_ctx=4, class_specific=True))
    zh = template_class_embeddings(model.encode_text, MANY, vocab[0].templates)
    fda = PromptFDA(PromptFDAParams(k=4))
    fda.set_reference(0, MANY, zh)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)

    def mismatch() -> float:
        with torch.no_grad():
            return graph_mismatch(learner.class_embeddings(0), zh, 4)

    start = mismatch()
    losses = []
    for _ in range(20):
        loss = fda.loss(learner, 0)
        assert loss is not None and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        fda.step()
        losses.append(float(loss.detach()))
    assert start > 0.5
    assert mismatch() < 0.6 * start
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert fda.generator is not None and "prompt_fda_generator" in fda.terms


def test_prompt_fda_anchor_sets():
    model, _ = tiny_model()
    learner = attach_prompt_learner(model, PromptLearnerConfig(n_ctx=4))
    pool = ["owl", "fox", "bee", "ant", "elk", "emu", "yak"]
    zh = template_class_embeddings(model.encode_text, VOCAB[0].classnames, VOCAB[0].templates)
    zh_pool = template_class_embeddings(model.encode_text, pool, VOCAB[0].templates)
    fda = PromptFDA(PromptFDAParams(k=8, min_anchors=6, seed=1))
    fda.set_reference(0, VOCAB[0].classnames, zh, pool, zh_pool)
    z, ref, names = fda.anchors(learner, 0)
    assert names[:3] == VOCAB[0].classnames and len(names) == 6 and len(set(names)) == 6 and set(names[3:]) <= set(pool)
    j = pool.index(names[3])
    assert torch.allclose(ref[3], zh_pool[j]) and z.shape == ref.shape == (6, 32)
    with torch.no_grad():
        assert torch.allclose(z[3], learner.encode_names([names[3]])[0], atol=1e-6)
    draws = {tuple(fda.anchors(learner, 0)[2][3:]) for _ in range(5)}
    assert len(draws) > 1  # a fresh draw every iteration
    loss = fda.loss(learner, 0)  # K = min(8, 6 - 1)
    assert torch.isfinite(loss) and fda.anchor_count == 6
    # more anchors asked than the pool holds: all of it
    big = PromptFDA(PromptFDAParams(min_anchors=50))
    big.set_reference(0, VOCAB[0].classnames, zh, pool, zh_pool)
    assert len(big.anchors(learner, 0)[2]) == 3 + len(pool)
    # a class-specific context uses the task's classes only
    csc_model, _ = tiny_model()
    csc = attach_prompt_learner(csc_model, PromptLearnerConfig(n_ctx=4, class_specific=True))
    assert fda.anchors(csc, 0)[2] == VOCAB[0].classnames
    # one anchor: no loss
    single = PromptFDA(PromptFDAParams())
    single.set_reference(0, ["red"], zh[:1])
    lone_model, _ = tiny_model([TaskVocabulary("one", ["red"], ["a {}."])])
    assert single.loss(attach_prompt_learner(lone_model, PromptLearnerConfig(n_ctx=4)), 0) is None


# ---------------------------------------------------------------- the plugins
def make_task(name: str, classes: list[str], seed: int, per_class: int = 6) -> Task:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(classes)), per_class)
    base = rng.integers(0, 255, size=(len(classes), 1, 1, 3))
    images = np.clip(base[labels] + rng.normal(0, 30, size=(len(labels), 32, 32, 3)), 0, 255).astype(np.uint8)
    ds = ArrayImageDataset(images, labels.tolist())
    return Task(name, classes, ["a photo of a {}."], ds, ds)


def test_coop_and_prompt_fda_plugins_on_avalanche():
    torch.manual_seed(0)
    tasks = [make_task("colours", ["red", "green", "blue"], 1), make_task("pets", ["cat", "dog", "owl"], 2)]
    model, _, pre_eval = build_task_model("cl-test-tiny", None, [t.vocabulary for t in tasks])
    learner = attach_prompt_learner(model, PromptLearnerConfig(n_ctx=4))
    start = learner.ctx.detach().clone()
    fda = STRATEGIES.build("prompt_fda", {"k": 3, "min_anchors": 8, "learn_tau_bias": True})
    assert isinstance(fda, PromptFDAPlugin) and fda.base_concepts == []  # no stream given
    fda.base_concepts = ["tree", "car", "cup", "hat", "red", "lamp", "fish"]
    strategy = SupervisedTemplate(
        model=model,
        optimizer=torch.optim.AdamW(learner.parameters(), lr=1e-2),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=6,
        train_epochs=1,
        device="cpu",
        plugins=[STRATEGIES.build("coop", {}), fda],
        evaluator=None,
    )
    benchmark = to_avalanche(tasks, pre_eval, pre_eval)
    for i in range(2):
        strategy.train(benchmark.train_stream[i], eval_streams=[])
    assert math.isfinite(fda.loss_terms["prompt_fda"]) and math.isfinite(fda.loss_terms["prompt_fda_generator"])
    assert fda.core.anchor_count == 8
    # "red" is a class of task 0, so it is never one of its extra anchors
    assert "red" not in fda.core.references[0][2] and "red" in fda.core.references[1][2]
    assert not torch.allclose(learner.ctx.detach(), start)
    assert fda.core.tau != pytest.approx(0.1) and fda.core.bias.item() != -10.0  # learned here (fixed by default)
    # checkpoint state loads with weights_only and restores tau, b, generator and the draw
    buffer = io.BytesIO()
    torch.save(fda.state_dict(), buffer)
    buffer.seek(0)
    restored = STRATEGIES.build("prompt_fda", {"k": 3, "min_anchors": 8, "learn_tau_bias": True})
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.core.tau == pytest.approx(fda.core.tau) and restored.core.bias.item() == pytest.approx(fda.core.bias.item())
    for a, b in zip(restored.core.generator.parameters(), fda.core.generator.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(restored.core.rng.get_state(), fda.core.rng.get_state())


def test_coop_rejects_models_without_prompts_or_with_trainable_towers(tmp_path, tiny_stream_root):
    from cl_proxyfda.config import parse_config
    from conftest import tiny_config

    tasks = [make_task("colours", ["red", "green", "blue"], 1)]
    model, _, pre_eval = build_task_model("cl-test-tiny", None, [t.vocabulary for t in tasks])

    def train(plugin):
        strategy = SupervisedTemplate(
            model=model, optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
            criterion=torch.nn.CrossEntropyLoss(), train_mb_size=6, device="cpu", plugins=[plugin], evaluator=None,
        )
        strategy.train(to_avalanche(tasks, pre_eval, pre_eval).train_stream[0], eval_streams=[])

    with pytest.raises(UserError, match="model.prompt_learner"):
        train(CoOpPlugin())
    attach_prompt_learner(model, PromptLearnerConfig(n_ctx=4))
    model.clip.visual.proj.requires_grad_(True)
    with pytest.raises(UserError, match="only the prompt context"):
        train(CoOpPlugin())
    with pytest.raises(ConfigError, match=r"^strategies\[1\]: prompt_fda needs a prompt learner: set model.prompt_learner"):
        parse_config(tiny_config(tiny_stream_root, tmp_path, strategies=[{"name": "naive"}, {"name": "prompt_fda"}]))
    with pytest.raises(ValidationError):
        PromptFDAParams(feature="embed")


def test_prompt_fda_run_end_to_end(tmp_path, tiny_stream_root):
    """Needs the runner/config wiring: model.prompt_learner, coop in strategies/__init__, eval.retrieval."""
    from cl_proxyfda.config import parse_config
    from cl_proxyfda.retrieval import retrieval_row
    from cl_proxyfda.runner import build_run, execute
    from conftest import tiny_config

    cfg = parse_config(
        tiny_config(
            tiny_stream_root,
            tmp_path / "runs",
            model={"prompt_learner": {"n_ctx": 4}},
            strategies=[{"name": "coop"}, {"name": "prompt_fda", "k": 2}],
            train={"lr": 1e-2, "iterations": 3},
            eval={"retrieval": True},
        )
    )
    run = build_run(cfg)
    clip_before = {k: v.clone() for k, v in run.model.clip.state_dict().items()}
    results = execute(run)
    assert results.matrix().shape == (4, 3) and np.isfinite(results.matrix()).all()
    assert set(results.extra_matrices) == {"retrieval_map20", "retrieval_r1"}
    assert results.meta["trainable_params"] == 4 * 64
    assert all(torch.equal(v, run.model.clip.state_dict()[k]) for k, v in clip_before.items())
    assert math.isfinite(run.plugins[1].loss_terms["prompt_fda"])
    # the stored retrieval row is the one of the final model
    again = retrieval_row(run.model, run.evaluator, 3, run.device)
    assert np.allclose(results.matrix("retrieval_map20")[-1], again["retrieval_map20"])
    assert np.allclose(results.matrix("retrieval_r1")[-1], again["retrieval_r1"])
    with pytest.raises(ConfigError, match="model.prompt_learner"):
        parse_config(tiny_config(tiny_stream_root, tmp_path / "x", model={"prompt_learner": {}, "adapter": {"type": "vefa"}}))
