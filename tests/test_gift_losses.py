"""GIFT's contrastive KD and ITA, ZSCL's distillation and weight ensembling (pure losses)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cl_proxyfda.losses.gift import (
    contrastive_distillation,
    distillation,
    duplicate_aware_targets,
    image_text_alignment,
    similarity_logits,
    soft_cross_entropy,
)
from cl_proxyfda.losses.zscl import WeightEnsemble, running_average_, zscl_distillation


def _row_soft_ce(teacher_row, student_row, T):
    """softCE of one row by hand: -sum softmax(t/T) * log_softmax(s/T)."""
    t = [x / T for x in teacher_row]
    s = [x / T for x in student_row]
    zt = sum(math.exp(x) for x in t)
    log_zs = math.log(sum(math.exp(x) for x in s))
    return -sum(math.exp(a) / zt * (b - log_zs) for a, b in zip(t, s))


def test_contrastive_kd_matches_a_2x2_case_computed_by_hand():
    teacher = torch.tensor([[4.0, 0.0], [2.0, 2.0]])
    student = torch.tensor([[2.0, 2.0], [0.0, 4.0]])
    # T = 2. Rows: teacher/T = [2,0] -> p = [e^2, 1]/(e^2+1); student/T = [1,1] -> log q = log 1/2:
    #   row 1 = ln 2 = 0.693147; teacher [1,1] -> p = 1/2, student [0,2] -> log q = [-2.126928, -0.126928]:
    #   row 2 = 1.126928; mean 0.910038.
    # Columns (transpose): teacher [2,1] vs student [1,0] and teacher [0,1] vs student [1,2]:
    #   both rows 0.731059*0.313262 + 0.268941*1.313262 = 0.582203; mean 0.582203.
    # L = T^2 * (0.910038 + 0.582203) = 5.968963.
    loss = contrastive_distillation(student, teacher, temperature=2.0)
    assert loss.item() == pytest.approx(5.968963, abs=1e-5)
    rows = (_row_soft_ce([4, 0], [2, 2], 2) + _row_soft_ce([2, 2], [0, 4], 2)) / 2
    cols = (_row_soft_ce([4, 2], [2, 0], 2) + _row_soft_ce([0, 2], [2, 4], 2)) / 2
    assert loss.item() == pytest.approx(4 * (rows + cols), rel=1e-6)


def test_kd_scales_with_t_squared_and_uses_both_directions():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 5, generator=g) * 3
    t = torch.randn(5, 5, generator=g) * 3
    for T in (1.0, 2.0, 4.0):
        one_way = T**2 * soft_cross_entropy(s / T, F.softmax(t / T, dim=1))
        other_way = T**2 * soft_cross_entropy(s.t() / T, F.softmax(t.t() / T, dim=1))
        assert distillation(s, t, T).item() == pytest.approx(one_way.item(), rel=1e-6)
        assert contrastive_distillation(s, t, T).item() == pytest.approx((one_way + other_way).item(), rel=1e-6)
    # A non-symmetric matrix: the two directions really differ.
    assert distillation(s, t, 2.0).item() != pytest.approx(distillation(s.t(), t.t(), 2.0).item(), rel=1e-3)


def test_kd_gradient_vanishes_when_student_equals_teacher_and_teacher_gets_none():
    t = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) * 5
    s = t.clone().requires_grad_(True)
    teacher = t.clone().requires_grad_(True)
    contrastive_distillation(s, teacher, 2.0).backward()
    assert s.grad.abs().max().item() < 1e-6
    assert teacher.grad is None
    s2 = (t + torch.randn(4, 4, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
    contrastive_distillation(s2, t, 2.0).backward()
    assert s2.grad.abs().max().item() > 1e-3


def test_duplicate_aware_targets_share_mass_between_equal_prompts():
    a = duplicate_aware_targets(["a photo of a cat.", "a photo of a dog.", "a photo of a cat.", "a photo of a cat."])
    expected = torch.tensor(
        [
            [1 / 3, 0, 1 / 3, 1 / 3],
            [0, 1, 0, 0],
            [1 / 3, 0, 1 / 3, 1 / 3],
            [1 / 3, 0, 1 / 3, 1 / 3],
        ]
    )
    assert torch.allclose(a, expected)
    assert torch.allclose(a.sum(1), torch.ones(4))
    assert torch.equal(a, a.t())
    assert torch.allclose(duplicate_aware_targets(torch.tensor([7, 3, 7, 7])), expected)
    assert torch.equal(duplicate_aware_targets(["x", "y", "z"]), torch.eye(3))


def test_ita_with_duplicate_prompts_and_label_smoothing_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    targets = duplicate_aware_targets(["cat", "dog", "cat"])
    # Smoothed targets (1 - 0.2) A + 0.2 / 3; rows: [.4667, .0667, .4667], [.0667, .8667, .0667], row 1 again.
    smoothed = [[0.8 * v + 0.2 / 3 for v in row] for row in targets.tolist()]

    def ce(mat):
        total = 0.0
        for row, trow in zip(mat, smoothed):
            lse = math.log(sum(math.exp(x) for x in row))
            total += -sum(p * (x - lse) for p, x in zip(trow, row))
        return total / len(mat)

    by_hand = ce(logits.tolist()) + ce(logits.t().tolist())
    assert by_hand == pytest.approx(2.0575140, abs=1e-6)
    assert image_text_alignment(logits, targets, label_smoothing=0.2).item() == pytest.approx(by_hand, rel=1e-6)


def test_ita_without_duplicates_is_the_clip_loss():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 6, generator=g) * 4
    labels = torch.arange(6)
    clip_loss = F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)
    ita = image_text_alignment(logits, duplicate_aware_targets([f"p{i}" for i in range(6)]), label_smoothing=0.0)
    assert ita.item() == pytest.approx(clip_loss.item(), rel=1e-6)
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.2) + F.cross_entropy(logits.t(), labels, label_smoothing=0.2)
    ita_ls = image_text_alignment(logits, duplicate_aware_targets([f"p{i}" for i in range(6)]))
    assert ita_ls.item() == pytest.approx(smoothed.item(), rel=1e-6)


def test_similarity_logits_normalises_and_scales():
    u = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    w = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    m = similarity_logits(u, w, 100.0)
    r = 1 / math.sqrt(2)
    assert torch.allclose(m, torch.tensor([[100 * r, 0.0], [100 * r, 100.0]]), atol=1e-4)


def test_zscl_distillation_matches_explicit_logits_and_teacher_text_default():
    g = torch.Generator().manual_seed(4)
    ui, ti = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    tt, st = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scale = 10.0
    s_logits = scale * F.normalize(ui, dim=1) @ F.normalize(tt, dim=1).t()
    t_logits = scale * F.normalize(ti, dim=1) @ F.normalize(tt, dim=1).t()
    expected_i2t = 4 * soft_cross_entropy(s_logits / 2, F.softmax(t_logits / 2, dim=1))
    expected_t2i = 4 * soft_cross_entropy(s_logits.t() / 2, F.softmax(t_logits.t() / 2, dim=1))
    both = zscl_distillation(ui, ti, tt, scale)
    assert both.item() == pytest.approx((expected_i2t + expected_t2i).item(), rel=1e-5)
    assert zscl_distillation(ui, ti, tt, scale, text_to_image=False).item() == pytest.approx(expected_i2t.item(), rel=1e-5)
    assert zscl_distillation(ui, ti, tt, scale, image_to_text=False).item() == pytest.approx(expected_t2i.item(), rel=1e-5)
    # With the student's own text embeddings the value changes and the gradient reaches them.
    st = st.requires_grad_(True)
    with_text = zscl_distillation(ui, ti, tt, scale, student_text=st)
    with_text.backward()
    assert with_text.item() != pytest.approx(both.item(), rel=1e-3)
    assert st.grad is not None and st.grad.abs().sum().item() > 0
    # Student identical to teacher: no gradient on the student's image embeddings.
    same = ti.clone().requires_grad_(True)
    zscl_distillation(same, ti, tt, scale).backward()
    assert same.grad.abs().max().item() < 1e-6
    with pytest.raises(ValueError):
        zscl_distillation(ui, ti, tt, scale, image_to_text=False, text_to_image=False)


def test_weight_ensemble_is_the_mean_of_all_snapshots():
    start = {"w": torch.tensor([0.0, 3.0]), "steps": torch.tensor(1)}
    ens = WeightEnsemble(start, every=100)
    snaps = [{"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor(2)}, {"w": torch.tensor([6.0, 0.0]), "steps": torch.tensor(3)}]
    for s in snaps:
        ens.update(s)
    assert ens.count == 3
    assert torch.allclose(ens.average["w"], torch.tensor([3.0, 3.0]))
    assert ens.average["steps"].item() == 3  # integer buffers follow the current value
    assert start["w"].tolist() == [0.0, 3.0]  # the start snapshot was copied, not aliased
    assert [i for i in range(1, 401) if ens.due(i)] == [100, 200, 300, 400]
    restored = WeightEnsemble({"w": torch.zeros(2), "steps": torch.tensor(0)})
    restored.load_state_dict(ens.state_dict())
    restored.update({"w": torch.tensor([7.0, 7.0]), "steps": torch.tensor(4)})
    assert torch.allclose(restored.average["w"], torch.tensor([4.0, 4.0]))
    with pytest.raises(KeyError):
        ens.update({"other": torch.zeros(2)})


def test_running_average_in_place_on_a_module():
    avg = {"a": torch.tensor([2.0])}
    running_average_(avg, {"a": torch.tensor([5.0])}, count=2)  # (2*2 + 5) / 3
    assert avg["a"].item() == pytest.approx(3.0)
