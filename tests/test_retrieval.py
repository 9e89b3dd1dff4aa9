"""Retrieval metrics: hand-computed toy cases, faiss against brute force, run rows."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_proxyfda.benchmarks.stream import ArrayImageDataset
from cl_proxyfda.evaluation import TaskEvaluator
from cl_proxyfda.models import TaskVocabulary, build_task_model
from cl_proxyfda.results import RunResults
from cl_proxyfda.retrieval import (
    average_precision_at_k,
    cross_modal_retrieval,
    image_retrieval,
    recall_at_k,
    retrieval_row,
)

torch.set_num_threads(1)


def on_circle(degrees: list[float]) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1).float()


# ----------------------------------------------------------------- from ranks
def test_average_precision_by_hand():
    rel = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    r = torch.tensor([2, 5, 3, 0])
    ap = average_precision_at_k(rel, r, 4)
    # (1/1 + 2/3) / min(4, 2);  (1/2 + 2/3) / min(4, 5);  0;  R = 0 -> undefined
    assert ap[0].item() == pytest.approx((1 + 2 / 3) / 2)
    assert ap[1].item() == pytest.approx((1 / 2 + 2 / 3) / 4)
    assert ap[2].item() == 0.0
    assert math.isnan(ap[3].item())
    # cut at k = 2: only the first hit of row 0 counts, normalised by min(2, 2)
    assert average_precision_at_k(rel, r, 2)[0].item() == pytest.approx(0.5)
    # a perfect ranking with fewer relevant items than k scores 1
    assert average_precision_at_k(torch.tensor([[1, 1, 0, 0]], dtype=torch.bool), torch.tensor([2]), 4).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        average_precision_at_k(rel, r, 5)


def test_recall_at_k_by_hand():
    rel = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert recall_at_k(rel, 1).tolist() == [0.0, 1.0, 0.0]
    assert recall_at_k(rel, 2).tolist() == [1.0, 1.0, 0.0]


# --------------------------------------------------------------- image-to-image
# Six images on the unit circle (angles chosen without ties); rankings worked out by hand:
# q0 [1,0,0,1,0] AP .75 | q1 [1,0,0,1,0] .75 | q2 [0,0,1,0,1] (1/3+2/5)/2
# q3 [0,1,0,0,1] (1/2+2/5)/2 | q4 [0,0,0,1,1] (1/4+2/5)/2 | q5 [0,1,0,0,1] (1/2+2/5)/2
ANGLES = [0, 10, 30, 100, 115, 210]
LABELS = [0, 0, 1, 1, 0, 1]


def test_image_retrieval_toy_by_hand():
    out = image_retrieval(on_circle(ANGLES), LABELS, k=5)
    expected = (0.75 + 0.75 + (1 / 3 + 2 / 5) / 2 + 0.45 + (1 / 4 + 2 / 5) / 2 + 0.45) / 6
    assert out["map"] == pytest.approx(expected)
    assert out["r1"] == pytest.approx(2 / 6)
    assert out["queries"] == 6 and out["k"] == 5
    # k = 2: APs .5, .5, 0, .25, 0, .25
    assert image_retrieval(on_circle(ANGLES), LABELS, k=2)["map"] == pytest.approx(1.5 / 6)
    # k larger than the gallery is capped at N - 1
    assert image_retrieval(on_circle(ANGLES), LABELS, k=20)["k"] == 5


def test_singleton_classes_are_left_out():
    feats = on_circle(ANGLES + [300])
    out = image_retrieval(feats, LABELS + [7], k=5)
    assert out["queries"] == 6  # the lone class-7 image has nothing to retrieve
    assert math.isnan(image_retrieval(on_circle([0, 90]), [0, 1])["map"])


def _brute_force(feats: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[float, float, torch.Tensor]:
    f = F.normalize(feats, dim=1)
    sims = (f @ f.t()).masked_fill(torch.eye(len(f), dtype=torch.bool), float("-inf"))
    idx = sims.topk(k, dim=1).indices
    rel = (labels[idx] == labels.unsqueeze(1)).float()
    precision = rel.cumsum(1) / torch.arange(1, k + 1)
    r = torch.tensor([int((labels == labels[i]).sum()) - 1 for i in range(len(labels))]).float()
    ap = (precision * rel).sum(1) / r.clamp(max=k)
    valid = r > 0
    return float(ap[valid].mean()), float(rel[valid, 0].mean()), idx


def test_faiss_matches_brute_force_on_random_data():
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 7, (300,), generator=gen)
    centres = torch.randn(7, 24, generator=gen)
    feats = centres[labels] + 1.5 * torch.randn(300, 24, generator=gen)
    out = image_retrieval(feats, labels, k=20)
    m, r1, _ = _brute_force(feats, labels, 20)
    assert 0.2 < m < 0.95  # a non-trivial case
    assert out["map"] == pytest.approx(m, abs=1e-6)
    assert out["r1"] == pytest.approx(r1, abs=1e-6)


# ------------------------------------------------------------------ image-text
def test_cross_modal_toy_by_hand():
    images = on_circle([0, 90, 180])
    captions = on_circle([10, 175, 60, 100, 200])
    owner = [0, 0, 1, 2, 2]
    out = cross_modal_retrieval(images, captions, owner, ks=(1, 2, 5))
    # image 0 -> c0 first (hit); image 1 -> c3, c2 (own at rank 2); image 2 -> c1, c4 (own at 2)
    assert out["i2t_r1"] == pytest.approx(1 / 3)
    assert out["i2t_r2"] == pytest.approx(1.0)
    # c0 -> img0 hit; c1 (175) -> img2, img1, img0 (own at 3); c2 -> img1 hit;
    # c3 (100) -> img1, img2 (own at 2); c4 -> img2 hit
    assert out["t2i_r1"] == pytest.approx(3 / 5)
    assert out["t2i_r2"] == pytest.approx(4 / 5)
    assert out["t2i_r5"] == pytest.approx(1.0)  # K capped at the 3 images
    with pytest.raises(ValueError):
        cross_modal_retrieval(images, captions, [0, 0, 1, 2, 3])


def test_cross_modal_matches_brute_force():
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(40, 16, generator=gen)
    owner = torch.arange(40).repeat_interleave(2)
    captions = images[owner] + 1.2 * torch.randn(80, 16, generator=gen)
    out = cross_modal_retrieval(images, captions, owner, ks=(1, 5, 10))
    im, tx = F.normalize(images, dim=1), F.normalize(captions, dim=1)
    sims = im @ tx.t()
    for k in (1, 5, 10):
        i2t = (owner[sims.topk(k, dim=1).indices] == torch.arange(40).unsqueeze(1)).any(1).float().mean()
        t2i = (sims.t().topk(k, dim=1).indices == owner.unsqueeze(1)).any(1).float().mean()
        assert out[f"i2t_r{k}"] == pytest.approx(float(i2t), abs=1e-6)
        assert out[f"t2i_r{k}"] == pytest.approx(float(t2i), abs=1e-6)
    assert out["i2t_r1"] < out["i2t_r5"] < 1.0


# -------------------------------------------------------------------- run rows
def test_retrieval_row_feeds_run_results():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    sets, vocab = [], []
    for t in range(2):
        labels = np.repeat(np.arange(3), 5)
        base = rng.integers(0, 255, size=(3, 1, 1, 3))
        images = np.clip(base[labels] + rng.normal(0, 30, size=(15, 32, 32, 3)), 0, 255).astype(np.uint8)
        sets.append(ArrayImageDataset(images, labels.tolist()))
        vocab.append(TaskVocabulary(f"t{t}", ["a", "b", "c"], ["a photo of a {}."]))
    model, _, pre_eval = build_task_model("cl-test-tiny", None, vocab)
    evaluator = TaskEvaluator(sets, pre_eval, batch_size=8)
    row = retrieval_row(model, evaluator, 2, k=10)
    assert set(row) == {"retrieval_map10", "retrieval_r1"}
    for t in range(2):
        feats, labels = evaluator.features(model, t)
        expected = image_retrieval(feats, labels, 10)
        assert row["retrieval_map10"][t] == pytest.approx(100 * expected["map"])
        assert row["retrieval_r1"][t] == pytest.approx(100 * expected["r1"])
        assert 0 <= row["retrieval_map10"][t] <= 100
    results = RunResults(task_names=["t0", "t1"])
    results.add_row([50.0, 50.0], extra=row)
    results.add_row([60.0, 55.0], extra=retrieval_row(model, evaluator, 2, k=10))
    assert results.matrix("retrieval_map10").shape == (2, 2)
    assert "retrieval_r1" in results.summary()["extra"]
