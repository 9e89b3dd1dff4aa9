"""The shared chores of evaluation passes: the preprocessed-input cache
(keep_if_fits / replay_batches, used by TaskEvaluator) and the model's transforms."""
from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import Dataset

from cl_proxyfda.evaluation import TaskEvaluator, keep_if_fits, replay_batches
from cl_proxyfda.models import build_task_model, model_transforms

torch.set_num_threads(1)


def _batches(n_batches: int, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, generator=g), torch.arange(i * batch, (i + 1) * batch)) for i in range(n_batches)]


def test_batches_pass_through_and_are_kept_when_they_fit():
    batches = _batches(3)  # 3 x 4 x 3 float32 = 144 bytes of inputs
    kept = []
    out = list(keep_if_fits(iter(batches), 144, lambda x, y: kept.append((x, y))))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(out, batches))
    assert len(kept) == 1
    x, y = kept[0]
    assert torch.equal(x, torch.cat([b[0] for b in batches])) and y.tolist() == list(range(12))
    again = list(replay_batches(x, y, 5))
    assert [len(b[1]) for b in again] == [5, 5, 2]
    assert torch.equal(torch.cat([b[0] for b in again]), x)


def test_nothing_is_kept_past_the_budget():
    kept = []
    out = list(keep_if_fits(iter(_batches(3)), 143, lambda x, y: kept.append(x)))
    assert len(out) == 3 and kept == []


class _Colours(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return Image.new("RGB", (20, 20), (10 * i, 200 - 10 * i, 90)), i % 2


def test_task_evaluator_caches_within_its_budget_and_scores_the_same():
    model, _, pre_eval = build_task_model("cl-test-tiny", None)
    sets = [_Colours(6), _Colours(5)]
    one_image = pre_eval(sets[0][0][0])
    image_bytes = one_image.numel() * one_image.element_size()
    evaluator = TaskEvaluator(sets, pre_eval, batch_size=4, cache_mb=6.5 * image_bytes / 2**20)
    first = [list(evaluator._batches(t)) for t in range(2)]
    assert set(evaluator._cache) == {0}  # task 1's 5 images do not fit what task 0 left
    assert evaluator._cache_bytes == 6 * image_bytes
    again = list(evaluator._batches(0))
    assert [len(y) for _, y in again] == [4, 2]
    assert torch.equal(torch.cat([x for x, _ in again]), torch.cat([x for x, _ in first[0]]))
    assert torch.equal(torch.cat([x for x, _ in first[1]]), torch.cat([x for x, _ in evaluator._batches(1)]))


def test_model_transforms_match_open_clips_own():
    model, pre_train, pre_eval = build_task_model("cl-test-tiny", None)
    train, evaluation = model_transforms(model)
    image = Image.new("RGB", (48, 40), (200, 30, 90))
    assert torch.equal(evaluation(image), pre_eval(image))
    assert repr(train) == repr(pre_train)
