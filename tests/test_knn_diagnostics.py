"""Feature bank (faiss) and drift diagnostics (L2, OT, label-aware OTDD)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_proxyfda.diagnostics import class_distances, control_distances, feature_l2_distance, feature_ot_distance, label_otdd
from cl_proxyfda.knn import FeatureBank

torch.set_num_threads(1)


# ------------------------------------------------------------------- FeatureBank
def test_bank_search_equals_brute_force_topk():
    g = torch.Generator().manual_seed(0)
    bank_feats = torch.randn(300, 24, generator=g)
    queries = torch.randn(40, 24, generator=g)
    sims, idx = FeatureBank(bank_feats).search(queries, 7)
    ref = F.normalize(queries, dim=1) @ F.normalize(bank_feats, dim=1).t()
    ref_sims, ref_idx = ref.topk(7, dim=1)
    assert idx.dtype == torch.long and idx.shape == (40, 7)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(sims, ref_sims, atol=1e-5)


def test_bank_self_exclusion():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(100, 16, generator=g)
    bank = FeatureBank(feats)
    own = torch.arange(100)
    sims, idx = bank.search(feats, 5, exclude=own)
    assert idx.shape == (100, 5)
    assert not (idx == own.unsqueeze(1)).any()
    ref = F.normalize(feats, dim=1) @ F.normalize(feats, dim=1).t()
    ref.fill_diagonal_(-2)
    assert torch.equal(idx, ref.topk(5, dim=1).indices)
    # a query whose "own" index is not among the hits keeps its first k hits
    q = torch.randn(1, 16, generator=g)
    _, plain = bank.search(q, 5)
    far = int((F.normalize(q, dim=1) @ F.normalize(feats, dim=1).t()).argmin())
    _, kept = bank.search(q, 5, exclude=torch.tensor([far]))
    assert torch.equal(kept, plain)


def test_bank_rejects_too_many_neighbours():
    bank = FeatureBank(torch.randn(5, 4))
    with pytest.raises(ValueError, match="bank of 5"):
        bank.search(torch.randn(2, 4), 5, exclude=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="dimension"):
        bank.search(torch.randn(2, 3), 2)


# ------------------------------------------------------------------ diagnostics
def labelled(n_classes: int = 4, per_class: int = 15, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(n_classes, d, generator=g)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    return F.normalize(centres[y] + 0.4 * torch.randn(len(y), d, generator=g), dim=1), y


def test_identical_inputs_give_zero():
    f, y = labelled()
    assert feature_l2_distance(f, f) == pytest.approx(0.0, abs=1e-7)
    assert label_otdd(f, y, f, y) == pytest.approx(0.0, abs=1e-7)
    assert feature_ot_distance(f, f) == pytest.approx(0.0, abs=1e-7)


def test_feature_l2_is_the_mean_distance_of_normalised_rows():
    a = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    b = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    assert feature_l2_distance(a, b) == pytest.approx(np.sqrt(2) / 2)


def test_otdd_is_symmetric_and_grows_with_perturbation():
    f, y = labelled()
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(f.shape, generator=g)
    values = [label_otdd(f, y, F.normalize(f + s * noise, dim=1), y) for s in (0.05, 0.2, 0.6)]
    assert values[0] > 1e-4
    assert values[0] < values[1] < values[2]
    other = F.normalize(f + 0.2 * noise, dim=1)
    assert label_otdd(other, y, f, y) == pytest.approx(values[1], rel=1e-6)


def test_class_distances_are_zero_on_the_diagonal_for_identical_sets():
    f, y = labelled()
    ca, cb, dist = class_distances(f, y, f, y)
    assert list(ca) == list(cb) == [0, 1, 2, 3]
    assert np.allclose(np.diag(dist), 0, atol=1e-8)
    assert (dist[~np.eye(4, dtype=bool)] > 0.1).all()


def test_features_moving_between_classes_are_seen_by_otdd_only():
    """Half of class 0 and half of class 1 trade places: the feature *set* is unchanged.

    An unlabelled OT distance between the sets stays 0; the label-aware OTDD does not.
    (A consistent relabelling, all of class 0 <-> all of class 1, is a mere renaming and
    gives 0 for both.)
    """
    f, y = labelled()
    c0, c1 = torch.nonzero(y == 0).flatten(), torch.nonzero(y == 1).flatten()
    half = len(c0) // 2
    perm = torch.arange(len(y))
    perm[c0[:half]], perm[c1[:half]] = c1[:half], c0[:half]
    mixed = f[perm]
    assert feature_ot_distance(f, mixed) == pytest.approx(0.0, abs=1e-7)
    assert label_otdd(f, y, mixed, y) > 0.2
    renamed = y.clone()
    renamed[y == 0], renamed[y == 1] = 1, 0
    assert label_otdd(f, y, f, renamed) == pytest.approx(0.0, abs=1e-7)


def test_sinkhorn_option_is_close_to_exact_for_small_reg():
    f, y = labelled(per_class=8)
    other = F.normalize(f + 0.3 * torch.randn(f.shape, generator=torch.Generator().manual_seed(2)), dim=1)
    exact = label_otdd(f, y, other, y)
    smooth = label_otdd(f, y, other, y, reg=0.01)
    assert exact > 0.05
    assert smooth >= exact - 1e-6  # entropic OT costs at least the exact optimum
    assert smooth == pytest.approx(exact, rel=0.3)


def test_control_distances_report_all_three_and_subsample():
    f, y = labelled(per_class=30)
    other = F.normalize(f + 0.2 * torch.randn(f.shape, generator=torch.Generator().manual_seed(3)), dim=1)
    full = control_distances(f, other, y, max_samples=None)
    assert set(full) == {"feature_l2", "feature_ot", "label_otdd"}
    assert full["feature_l2"] == pytest.approx(feature_l2_distance(f, other))
    assert full["label_otdd"] == pytest.approx(label_otdd(f, y, other, y))
    sub = control_distances(f, other, y, max_samples=60)
    assert sub["feature_l2"] == pytest.approx(full["feature_l2"])  # L2 always uses every image
    assert sub["label_otdd"] == pytest.approx(full["label_otdd"], rel=0.5)
