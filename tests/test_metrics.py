"""Metrics of the accuracy matrix, checked against values computed by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cl_proxyfda import metrics

# Hand-made run with T = 3 tasks (rows: 0 = zero-shot, i = after experience i).
#            task1 task2 task3
HAND = [
    [10.0, 20.0, 30.0],  # row 0
    [60.0, 25.0, 31.0],  # row 1
    [50.0, 70.0, 32.0],  # row 2
    [40.0, 60.0, 80.0],  # row 3
]
HAND_CONTROL = [50.0, 48.0, 47.0, 45.0]

# Published zero-shot CLIP ViT-B/16 accuracies, MTIL order I.
MTIL_ZERO_SHOT = [24.3, 88.4, 68.2, 44.6, 54.9, 71.0, 88.5, 59.4, 89.0, 64.7, 65.2]


def test_hand_matrix_complete_run():
    s = metrics.summarize(HAND, HAND_CONTROL)
    # Transfer: task 2 -> A[1,2] = 25; task 3 -> (A[1,3] + A[2,3]) / 2 = (31 + 32) / 2 = 31.5;
    # mean (25 + 31.5) / 2 = 28.25.
    assert s["transfer"] == pytest.approx(28.25)
    # Avg: rows 1..3 sum to 116 + 152 + 180 = 448 over 9 entries.
    assert s["avg"] == pytest.approx(448 / 9)
    # Last: (40 + 60 + 80) / 3 = 60.
    assert s["last"] == pytest.approx(60.0)
    # Forgetting (Avalanche): task 1: 60 - 40 = 20, task 2: 70 - 60 = 10 -> mean 15.
    assert s["forgetting_avalanche_per_task"] == pytest.approx([20.0, 10.0])
    assert s["forgetting_avalanche"] == pytest.approx(15.0)
    # Forgetting (max): task 1: max(60, 50) - 40 = 20; task 2: 70 - 60 = 10 -> same here.
    assert s["forgetting_max_per_task"] == pytest.approx([20.0, 10.0])
    assert s["forgetting_max"] == pytest.approx(15.0)
    # BWT: ((40 - 60) + (60 - 70)) / 2 = -15.
    assert s["bwt"] == pytest.approx(-15.0)
    # Plasticity: (60 + 70 + 80) / 3 = 70.
    assert s["plasticity"] == pytest.approx(70.0)
    assert s["new_task_accuracy"] == pytest.approx([60.0, 70.0, 80.0])
    # Seen accuracy per row: row 1: 60; row 2: (50 + 70) / 2 = 60; row 3: (40+60+80)/3 = 60.
    assert s["seen_accuracy"][0] is None
    assert s["seen_accuracy"][1:] == pytest.approx([60.0, 60.0, 60.0])
    # Control: retention at row 3 = 45, drop from row 0 = 50 - 45 = 5; stability = 45.
    assert s["control"] == pytest.approx(HAND_CONTROL)
    assert s["control_retention"] == pytest.approx(45.0)
    assert s["control_drop"] == pytest.approx(5.0)
    assert s["stability"] == pytest.approx(45.0)
    assert s["stability_from_control"] is True
    # Zero-shot mean: (10 + 20 + 30) / 3 = 20.
    assert s["zero_shot"] == pytest.approx(20.0)
    assert s["complete"] is True
    assert s["num_tasks"] == 3 and s["experiences_done"] == 3


def test_stability_without_control_is_100_minus_forgetting():
    s = metrics.summarize(np.array(HAND))
    # 100 - mean Avalanche forgetting (15) = 85.
    assert s["stability"] == pytest.approx(85.0)
    assert s["stability_from_control"] is False
    assert s["control"] == [] and s["control_retention"] is None and s["control_drop"] is None


def test_avalanche_and_max_forgetting_differ_when_accuracy_rises_then_falls():
    rise_fall = [
        [0.0, 0.0, 0.0],
        [50.0, 0.0, 0.0],  # task 1 learned: 50
        [70.0, 60.0, 0.0],  # task 1 rises to 70 (backward transfer), task 2 learned: 60
        [40.0, 45.0, 90.0],  # then falls to 40
    ]
    # Avalanche: task 1: 50 - 40 = 10; task 2: 60 - 45 = 15 -> mean 12.5.
    assert metrics.forgetting_avalanche(rise_fall) == pytest.approx([10.0, 15.0])
    # Max: task 1: max(50, 70) - 40 = 30; task 2: 60 - 45 = 15 -> mean 22.5.
    assert metrics.forgetting_max(rise_fall) == pytest.approx([30.0, 15.0])
    s = metrics.summarize(rise_fall)
    assert s["forgetting_avalanche"] == pytest.approx(12.5)
    assert s["forgetting_max"] == pytest.approx(22.5)
    assert s["bwt"] == pytest.approx(-12.5)


def test_mtil_order_i_zero_shot_reference_values():
    # A model that never changes: every row equals the zero-shot row.
    matrix = [MTIL_ZERO_SHOT] * 12
    s = metrics.summarize(matrix)
    # Transfer = mean of columns 2..11 = (718.2 - 24.3) / 10 = 69.39; Avg = Last = 718.2 / 11.
    assert round(s["transfer"], 1) == 69.4
    assert round(s["avg"], 1) == 65.3
    assert round(s["last"], 1) == 65.3
    assert s["forgetting_avalanche"] == pytest.approx(0.0)
    assert s["forgetting_max"] == pytest.approx(0.0)
    assert s["bwt"] == pytest.approx(0.0)
    assert s["complete"] is True


def test_partial_run_uses_last_available_row():
    one = metrics.summarize(HAND[:2], HAND_CONTROL[:2])
    assert one["complete"] is False and one["experiences_done"] == 1
    # Transfer: task 2 -> A[1,2] = 25; task 3 -> A[1,3] = 31 (row 2 not there) -> 28.
    assert one["transfer"] == pytest.approx(28.0)
    # Avg = Last = (60 + 25 + 31) / 3.
    assert one["avg"] == pytest.approx(116 / 3)
    assert one["last"] == pytest.approx(116 / 3)
    # No task has been followed by another experience yet.
    assert one["forgetting_avalanche_per_task"] == [None, None]
    assert one["forgetting_avalanche"] is None and one["bwt"] is None
    assert one["plasticity"] == pytest.approx(60.0)
    assert one["control_retention"] == pytest.approx(48.0)
    assert one["control_drop"] == pytest.approx(2.0)

    two = metrics.summarize(HAND[:3])
    # Row 2 is "last": task 1 forgetting 60 - 50 = 10 (both definitions), task 2 not yet.
    assert two["forgetting_avalanche_per_task"] == [pytest.approx(10.0), None]
    assert two["forgetting_max_per_task"] == [pytest.approx(10.0), None]
    assert two["bwt"] == pytest.approx(-10.0)
    assert two["last"] == pytest.approx(152 / 3)
    # Transfer is the same as the complete run's: row 3 never enters it.
    assert two["transfer"] == pytest.approx(28.25)
    assert two["stability"] == pytest.approx(90.0)  # 100 - 10


def test_zero_shot_row_only():
    s = metrics.summarize(HAND[:1], HAND_CONTROL[:1])
    assert s["experiences_done"] == 0 and s["complete"] is False
    assert s["transfer"] is None and s["avg"] is None and s["plasticity"] is None
    assert s["last"] == pytest.approx(20.0)  # mean of row 0
    assert s["control_drop"] == pytest.approx(0.0)
    json.dumps(s, allow_nan=False)


def test_single_task_has_no_transfer_and_serialises_to_strict_json():
    s = metrics.summarize([[30.0], [80.0]])
    assert s["transfer"] is None
    assert s["avg"] == pytest.approx(80.0) and s["last"] == pytest.approx(80.0)
    assert s["forgetting_avalanche_per_task"] == [] and s["forgetting_avalanche"] is None
    assert s["bwt"] is None and s["stability"] is None
    assert s["plasticity"] == pytest.approx(80.0)
    assert s["complete"] is True
    text = json.dumps(s, allow_nan=False)
    assert json.loads(text)["transfer"] is None


def test_nan_entries_become_none():
    m = [row[:] for row in HAND]
    m[1][1] = float("nan")  # task 2 not evaluated after experience 1
    s = metrics.summarize(m)
    assert s["transfer"] is None  # depends on A[1,2]
    assert s["last"] == pytest.approx(60.0)  # row 3 is intact
    json.dumps(s, allow_nan=False)


@pytest.mark.parametrize(
    "bad",
    [
        [1.0, 2.0, 3.0],  # 1-D
        [[1.0, 2.0]] * 4,  # 4 rows for 2 tasks (at most 3)
        np.zeros((0, 3)),  # no rows
    ],
)
def test_invalid_shapes_raise(bad):
    with pytest.raises(ValueError):
        metrics.summarize(bad)


def test_control_length_must_match_rows():
    with pytest.raises(ValueError, match="control"):
        metrics.summarize(HAND, [50.0, 48.0])
