"""Feature-drift diagnostics between the pre-trained and the current model.

Computed after each experience on the control set (the same images, features of the
pre-trained model and of the current model). Proxy-FDA reports that forgetting
correlates more strongly with an optimal-transport distance between labelled feature
distributions (OTDD) than with the plain L2 feature distance; both are given here.
Features are L2-normalised first in every function.
"""
from __future__ import annotations

import numpy as np
import ot
import torch
import torch.nn.functional as F
from torch import Tensor

_MAX_ITER = 10_000_000  # network-simplex iterations (POT's default, 1e5, stops early on ~1000 points)


def _features(x: Tensor | np.ndarray) -> np.ndarray:
    t = torch.as_tensor(x).detach().double().cpu()
    if t.ndim != 2:
        raise ValueError(f"features must be a (N, D) matrix, got shape {tuple(t.shape)}")
    return F.normalize(t, dim=1).numpy()


def _labels(y: Tensor | np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(torch.as_tensor(y).cpu()).astype(np.int64).reshape(-1)
    if len(arr) != n:
        raise ValueError(f"{len(arr)} labels for {n} feature rows")
    return arr


def _ot_cost(cost: np.ndarray, reg: float) -> float:
    """OT cost between uniform distributions on the rows and columns of ``cost``."""
    a = np.full(cost.shape[0], 1.0 / cost.shape[0])
    b = np.full(cost.shape[1], 1.0 / cost.shape[1])
    if reg > 0:
        return float(ot.sinkhorn2(a, b, cost, reg))
    return float(ot.emd2(a, b, cost, numItermax=_MAX_ITER))


def feature_l2_distance(f_pre: Tensor | np.ndarray, f_cur: Tensor | np.ndarray) -> float:
    """Mean over images of ``||normalize(f_pre[i]) - normalize(f_cur[i])||_2`` (rows pair up)."""
    a, b = _features(f_pre), _features(f_cur)
    if a.shape != b.shape:
        raise ValueError(f"feature matrices differ in shape: {a.shape} vs {b.shape}")
    return float(np.linalg.norm(a - b, axis=1).mean())


def class_distances(
    f_a: Tensor | np.ndarray, y_a: Tensor | np.ndarray, f_b: Tensor | np.ndarray, y_b: Tensor | np.ndarray, reg: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OT distances between the class-conditional feature distributions of two labelled sets.

    Returns ``(classes_a, classes_b, dist)`` with ``dist[p, q]`` = the OT cost (squared
    Euclidean ground cost, i.e. W_2^2) between the features of class ``classes_a[p]`` in
    set a and those of class ``classes_b[q]`` in set b, uniform weights; exact
    (``ot.emd2``) when ``reg == 0``, entropic (``ot.sinkhorn2``) otherwise.
    """
    fa, fb = _features(f_a), _features(f_b)
    ya, yb = _labels(y_a, len(fa)), _labels(y_b, len(fb))
    classes_a, classes_b = np.unique(ya), np.unique(yb)
    dist = np.zeros((len(classes_a), len(classes_b)))
    for p, ca in enumerate(classes_a):
        xa = fa[ya == ca]
        for q, cb in enumerate(classes_b):
            xb = fb[yb == cb]
            dist[p, q] = _ot_cost(ot.dist(xa, xb, metric="sqeuclidean"), reg)
    return classes_a, classes_b, dist


def label_otdd(
    f_pre: Tensor | np.ndarray,
    y_pre: Tensor | np.ndarray,
    f_cur: Tensor | np.ndarray,
    y_cur: Tensor | np.ndarray,
    reg: float = 0.0,
) -> float:
    """An OTDD-like optimal-transport distance between two labelled feature sets.

    Definition (after Alvarez-Melis & Fusi's OTDD, with p = 2, in squared units):
    each set is the uniform empirical distribution over its pairs ``(x, y)`` (x the
    L2-normalised feature, y the label). The ground cost between ``(x, y)`` from the
    pre-trained set and ``(x', y')`` from the current set is

        ``c((x, y), (x', y')) = ||x - x'||^2 + W(y, y')``,

    where the label term ``W(y, y')`` is the OT cost with squared Euclidean ground cost
    (W_2^2) between the pre-trained features of class y and the current features of class
    y' (``class_distances``). The distance is the optimal-transport cost of moving one
    set onto the other under ``c``:

        ``OTDD = min over couplings pi of sum_ab pi_ab c(a, b)``.

    ``reg == 0`` (default) solves every OT problem exactly (``ot.emd2``), so identical
    inputs give 0 and swapping the two sets gives the same value; ``reg > 0`` uses
    Sinkhorn (``ot.sinkhorn2``) everywhere: a smoothed value, biased upwards (not 0 for
    identical sets) and not faster on CPU at these sizes. Cost: one OT problem per pair
    of classes plus one of size N_pre x N_cur (exact, 2000 images in 20 classes: about
    2 s on one CPU core).

    When classes are well separated and the features move little, the optimal coupling
    stays within classes and the value is about twice the within-class OT cost (the
    feature term and the label term ``W(c, c)`` count the same movement).

    Unlike the mean L2 distance, this compares distributions rather than images, and
    unlike an unlabelled OT distance, it sees features moving between classes.
    """
    fa, fb = _features(f_pre), _features(f_cur)
    ya, yb = _labels(y_pre, len(fa)), _labels(y_cur, len(fb))
    classes_a, classes_b, label_dist = class_distances(fa, ya, fb, yb, reg)
    ia = np.searchsorted(classes_a, ya)
    ib = np.searchsorted(classes_b, yb)
    cost = ot.dist(fa, fb, metric="sqeuclidean") + label_dist[ia][:, ib]
    return _ot_cost(cost, reg)


def feature_ot_distance(f_pre: Tensor | np.ndarray, f_cur: Tensor | np.ndarray, reg: float = 0.0) -> float:
    """The unlabelled counterpart: W_2^2 between the two feature sets (labels ignored)."""
    fa, fb = _features(f_pre), _features(f_cur)
    return _ot_cost(ot.dist(fa, fb, metric="sqeuclidean"), reg)


def control_distances(
    f_pre: Tensor | np.ndarray,
    f_cur: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    reg: float = 0.0,
    max_samples: int | None = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """All drift diagnostics of one row: ``feature_l2``, ``feature_ot`` and ``label_otdd``.

    ``f_pre``/``f_cur`` are the pre-trained and current features of the same control
    images (rows pair up), ``labels`` their labels. Sets larger than ``max_samples`` are
    reduced to a seeded random subset of that many images (the same rows in both) for
    the two OT distances, so the exact OT problems stay small (``feature_l2`` always uses
    every image); ``None`` uses every image.
    """
    fa, fb = _features(f_pre), _features(f_cur)
    if fa.shape != fb.shape:
        raise ValueError(f"feature matrices differ in shape: {fa.shape} vs {fb.shape}")
    y = _labels(labels, len(fa))
    l2 = feature_l2_distance(fa, fb)
    if max_samples is not None and len(fa) > max_samples:
        rows = np.sort(np.random.default_rng(seed).choice(len(fa), size=max_samples, replace=False))
        fa, fb, y = fa[rows], fb[rows], y[rows]
    return {
        "feature_l2": l2,
        "feature_ot": feature_ot_distance(fa, fb, reg),
        "label_otdd": label_otdd(fa, y, fb, y, reg),
    }
