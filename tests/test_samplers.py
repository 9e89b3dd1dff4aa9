"""Class-balanced (hard-mined) and random batch samplers."""
from __future__ import annotations

from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch

from cl_proxyfda.benchmarks.samplers import ClassBalancedBatchSampler, RandomBatchSampler, class_mean_similarity, seeded_batches


def grouped_targets(n_classes: int = 32, per_class: int = 10) -> np.ndarray:
    return np.repeat(np.arange(n_classes), per_class)


def group_similarity(n_classes: int = 32, group: int = 4) -> np.ndarray:
    """Classes in blocks of ``group``: similarity 0.9 within a block, 0.1 across."""
    g = np.arange(n_classes) // group
    return np.where(g[:, None] == g[None, :], 0.9, 0.1)


def test_batch_composition_m_classes_by_n_images():
    targets = grouped_targets()
    sampler = ClassBalancedBatchSampler(targets, m_classes=8, n_per_class=4, iterations=30, seed=0, hard_mining=False)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 30
    for batch in batches:
        assert len(batch) == 32
        counts = Counter(int(targets[i]) for i in batch)
        assert len(counts) == 8 and set(counts.values()) == {4}
        assert len(set(batch)) == 32  # 10 images per class: no repeats needed


def test_each_image_seen_before_repeats():
    targets = grouped_targets(n_classes=4, per_class=8)
    sampler = ClassBalancedBatchSampler(targets, m_classes=4, n_per_class=4, iterations=2, seed=3, hard_mining=False)
    seen = [i for batch in sampler for i in batch]
    assert sorted(seen) == list(range(32))  # two batches x 4 classes x 4 images = each image once


def test_small_classes_are_sampled_with_replacement():
    targets = np.array([0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3])  # class 0 has 2 images
    sampler = ClassBalancedBatchSampler(targets, m_classes=4, n_per_class=4, iterations=5, seed=0)
    for batch in sampler:
        zeros = [i for i in batch if targets[i] == 0]
        assert len(zeros) == 4 and set(zeros) == {0, 1}


def test_fewer_classes_than_m_fill_the_batch():
    targets = grouped_targets(n_classes=3, per_class=20)
    sampler = ClassBalancedBatchSampler(targets, m_classes=4, n_per_class=4, iterations=10, seed=0)
    for batch in sampler:
        assert len(batch) == 16
        counts = Counter(int(targets[i]) for i in batch)
        assert set(counts) == {0, 1, 2}
        assert sorted(counts.values()) == [5, 5, 6]


def test_deterministic_for_a_seed_and_new_passes_differ():
    targets = grouped_targets()
    sim = group_similarity()
    make = lambda seed: ClassBalancedBatchSampler(targets, 8, 4, iterations=5, seed=seed, class_similarity=sim)  # noqa: E731
    a, b = make(1), make(1)
    first_a, first_b = list(a), list(b)
    assert first_a == first_b
    assert list(a) == list(b)  # second passes agree too
    assert list(make(1)) != list(make(2))
    c = make(1)
    list(c)
    assert list(c) != first_a  # a new pass is a different draw
    c.set_epoch(0)
    assert list(c) == first_a


def co_occurrence_within_groups(sampler: ClassBalancedBatchSampler, targets: np.ndarray, group: int = 4) -> float:
    same = total = 0
    for batch in sampler:
        classes = sorted({int(targets[i]) for i in batch})
        for a, b in combinations(classes, 2):
            total += 1
            same += a // group == b // group
    return same / total


def test_hard_mining_groups_similar_classes():
    targets = grouped_targets()
    sim = group_similarity()
    hard = ClassBalancedBatchSampler(targets, 4, 4, iterations=200, seed=0, class_similarity=sim)
    plain = ClassBalancedBatchSampler(targets, 4, 4, iterations=200, seed=0, class_similarity=sim, hard_mining=False)
    assert hard.hard_mining_active and not plain.hard_mining_active
    hard_rate = co_occurrence_within_groups(hard, targets)
    plain_rate = co_occurrence_within_groups(plain, targets)
    assert plain_rate < 0.2  # chance: 3 of 31 other classes share a group
    assert 0.8 < hard_rate < 1.0  # mostly the nearest classes, with some randomness left


def test_class_similarity_must_cover_the_labels():
    with pytest.raises(ValueError, match="cover labels"):
        ClassBalancedBatchSampler(grouped_targets(), 8, 4, iterations=1, class_similarity=np.eye(5))


def test_class_mean_similarity():
    feats = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 5.0], [1.0, 1.0]])
    targets = [0, 0, 1, 1, 3]
    sim = class_mean_similarity(feats, targets)
    assert sim.shape == (4, 4)
    assert sim[0, 0] == pytest.approx(1.0) and sim[0, 1] == pytest.approx(0.0)
    assert sim[0, 3] == pytest.approx(np.sqrt(0.5))
    assert (sim[2] == 0).all()  # label 2 does not occur


def test_random_batch_sampler_covers_each_pass_without_replacement():
    sampler = RandomBatchSampler(n_items=20, batch_size=5, iterations=8, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 8 and all(len(b) == 5 for b in batches)
    first_pass = [i for b in batches[:4] for i in b]
    second_pass = [i for b in batches[4:] for i in b]
    assert sorted(first_pass) == sorted(second_pass) == list(range(20))
    assert first_pass != second_pass  # reshuffled per pass
    assert list(RandomBatchSampler(20, 5, 8, seed=0)) == batches
    assert list(RandomBatchSampler(20, 5, 8, seed=1)) != batches


def test_seeded_batches_fill_a_short_pass_from_the_next_and_back_the_random_sampler():
    batches = seeded_batches(n_items=3, batch_size=2, seed=5)
    first = [next(batches) for _ in range(3)]  # 6 items = two full passes over 3
    flat = [i for b in first for i in b]
    assert sorted(flat[:3]) == sorted(flat[3:]) == [0, 1, 2]
    with pytest.raises(ValueError, match="n_items >= 1"):
        next(seeded_batches(0, 2, 0))
    # The random sampler's pass e is the start of the endless stream seeded (seed, e).
    sampler = RandomBatchSampler(20, 5, 8, seed=3)
    stream = [seeded_batches(20, 5, [3, e]) for e in range(2)]
    for e in range(2):
        assert list(sampler) == [next(stream[e]) for _ in range(8)]


def test_hard_mining_is_hard_on_clip_like_class_similarities():
    """CLIP class means sit at cosines ~0.78 with a spread of ~0.01: the similarities are
    standardised per seed class, so the default temperature still groups near classes."""
    from cl_proxyfda.testing import clip_like_features

    feats, labels = clip_like_features(2000, 512, classes=100, seed=0)
    sim = class_mean_similarity(feats, labels)
    off = sim[~np.eye(100, dtype=bool)]
    assert 0.7 < off.mean() < 0.85 and off.std() < 0.03  # the CLIP-like regime this is about
    sampler = ClassBalancedBatchSampler(labels.numpy(), 16, 4, iterations=1, seed=0, class_similarity=sim)
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(300):
        classes = sampler._pick_classes(rng)
        nearest = np.argsort(-np.where(np.arange(100) == classes[0], -9, sim[classes[0]]))[:15]
        hits.append(len(set(classes[1:].tolist()) & set(nearest.tolist())) / 15)
    assert np.mean(hits) > 0.45  # measured 0.61; uniform draws give 15 / 99 = 0.15


# ------------------------------------------------------------ the strategy's service
def _hand_built_strategy(tiny_stream_root, sampler_calls: list, **kwargs):
    from cl_proxyfda.benchmarks.stream import to_avalanche
    from cl_proxyfda.models import build_task_model
    from cl_proxyfda.registry import STREAMS, load_builtin_components
    from cl_proxyfda.training import CLStrategy

    load_builtin_components()
    stream = STREAMS.build("image_folder", {"root": str(tiny_stream_root)})
    model, _, eval_tf = build_task_model("cl-test-tiny", None, [t.vocabulary for t in stream.tasks])

    def factory(index, targets, iterations, similarity):
        sampler_calls.append((index, similarity))
        return RandomBatchSampler(len(targets), 4, iterations, seed=index)

    strategy = CLStrategy(
        model=model, criterion=torch.nn.CrossEntropyLoss(), train_mb_size=4, plugins=[], device=torch.device("cpu"),
        lr_for_experience=lambda i: 1e-3, iterations_for=lambda n: 1, batch_sampler=factory, **kwargs,
    )
    return strategy, to_avalanche(stream.tasks, eval_tf, eval_tf)


def test_class_similarity_service_of_a_hand_built_strategy(tiny_stream_root):
    from cl_proxyfda.training import ClassSimilarity

    calls: list = []
    strategy, bench = _hand_built_strategy(tiny_stream_root, calls)
    assert isinstance(strategy.class_similarity, ClassSimilarity) and len(strategy.class_similarity) == 0
    strategy.train(bench.train_stream[0], eval_streams=[])
    assert calls == [(0, None)]  # nothing set: the sampler draws classes without mining
    sim = group_similarity(3, group=1)
    strategy.class_similarity.set(1, sim)
    strategy.train(bench.train_stream[1], eval_streams=[])
    index, given = calls[-1]
    assert index == 1 and given.dtype == np.float64 and np.array_equal(given, sim)
    assert 1 in strategy.class_similarity and 0 not in strategy.class_similarity
    shared = ClassSimilarity()
    strategy2, _ = _hand_built_strategy(tiny_stream_root, [], class_similarity=shared)
    assert strategy2.class_similarity is shared


def test_class_similarity_service_checks_its_matrices_and_joins_a_bare_strategy():
    from avalanche.training.templates import SupervisedTemplate

    from cl_proxyfda.training import ClassSimilarity, class_similarity_of

    service = ClassSimilarity()
    with pytest.raises(ValueError, match="experience 2 must be a square matrix, got shape \\(3, 2\\)"):
        service.set(2, np.zeros((3, 2)))
    assert service.get(2) is None and len(service) == 0
    model = torch.nn.Linear(4, 2)
    bare = SupervisedTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_mb_size=2, evaluator=None)
    first = class_similarity_of(bare)
    assert isinstance(first, ClassSimilarity) and class_similarity_of(bare) is first and bare.class_similarity is first


def test_runner_fills_the_service_and_the_sampler_mines_with_it(tmp_path, tiny_stream_root):
    from avalanche.core import SupervisedPlugin

    from cl_proxyfda.config import parse_config
    from cl_proxyfda.runner import _pretrained_train_features, build_run, execute
    from conftest import tiny_config

    class SamplerProbe(SupervisedPlugin):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list = []

        def before_training_epoch(self, strategy, **kwargs):
            sampler = strategy.dataloader.batch_sampler
            self.seen.append((sampler.hard_mining_active, sampler.class_similarity))

    def run_with(mining: bool, name: str):
        train = {"iterations": 2, "batch_size": 4, "images_per_class": 2, "hard_class_mining": mining}
        cfg = tiny_config(tiny_stream_root, tmp_path / name, strategies=[{"name": "proxy_fda", "k": 3}], train=train)
        cfg["stream"]["tasks"] = ["warm", "cool"]
        run = build_run(parse_config(cfg))
        probe = SamplerProbe()
        run.strategy.plugins.append(probe)
        execute(run, quiet=True)
        return run, probe.seen

    run, seen = run_with(True, "mined")
    assert len(run.strategy.class_similarity) == 2 and [active for active, _ in seen] == [True, True]
    for index, (_, given) in enumerate(seen):
        stored = run.strategy.class_similarity.get(index)
        assert np.array_equal(given, stored) and stored.shape == (3, 3)
        feats, labels = _pretrained_train_features(run, index)  # pre-trained features of the task's images
        np.testing.assert_allclose(stored, class_mean_similarity(feats, labels), rtol=0, atol=1e-6)
    run, seen = run_with(False, "plain")
    assert len(run.strategy.class_similarity) == 0 and seen == [(False, None), (False, None)]
