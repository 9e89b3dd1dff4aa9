"""Probe accuracy on frozen image features: the Proxy-FDA paper's forgetting measure.

Zero-shot control accuracy scores absolute feature positions against a frozen text
tower, so any rotation of the image features ruins it. A probe trained on the current
model's own features asks instead whether the control classes are still separable:
structure-preserving regularisers (FDA) protect that, not absolute positions.

Two fixed recipes, both deterministic and invariant to rotations of the feature space:

- ``linear``: L2-normalised features, multinomial logistic regression (scikit-learn,
  lbfgs, unpenalised intercept); C is chosen from :data:`C_GRID` on a seeded stratified
  20% of the probe-train split, then refit on the whole probe-train split.
- ``knn``: cosine k-NN (:class:`cl_proxyfda.knn.FeatureBank`), similarity-weighted
  vote of the ``k`` nearest probe-train features.

Probe-train / probe-test: the set's train split when it has one, else a seeded
stratified 50/50 split of its test set (:func:`stratified_split`).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ProbeKind = Literal["linear", "knn"]
C_GRID = (0.1, 1.0, 10.0, 100.0)
MAX_ITER = 500
TOL = 1e-6
KNN_K = 20
SPLIT_SEED = 0


def stratified_split(labels: Tensor | np.ndarray, fraction: float = 0.5, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices (first, second): about ``fraction`` of every class in ``first``, seeded.

    Classes with a single example go to ``first``. Both index arrays are sorted.
    """
    y = np.asarray(torch.as_tensor(labels).cpu().numpy()).astype(np.int64)
    rng = np.random.default_rng(seed)
    first: list[np.ndarray] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        first.append(idx[: max(1, int(round(fraction * len(idx))))])
    chosen = np.zeros(len(y), dtype=bool)
    if first:
        chosen[np.concatenate(first)] = True
    return np.flatnonzero(chosen), np.flatnonzero(~chosen)


def _normalised(x: Tensor | np.ndarray) -> np.ndarray:
    t = torch.as_tensor(x).detach().float().cpu()
    return F.normalize(t, dim=1).numpy().astype(np.float64)


def _labels(y: Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(torch.as_tensor(y).cpu().numpy()).astype(np.int64)


def _fit_logistic(x: np.ndarray, y: np.ndarray, c: float):  # type: ignore[no-untyped-def]
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=MAX_ITER, tol=TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter bounds the cost
        clf.fit(x, y)
    return clf


def choose_c(x: np.ndarray, y: np.ndarray, grid: tuple[float, ...] = C_GRID, seed: int = SPLIT_SEED) -> float:
    """The C of ``grid`` with the best held-out accuracy (seeded stratified 80/20 of
    ``x``); ties go to the smaller C. With fewer than two classes in either part, 1.0."""
    fit_idx, held_idx = stratified_split(y, 0.8, seed)
    if len(np.unique(y[fit_idx])) < 2 or len(held_idx) == 0:
        return 1.0
    scores = [float(_fit_logistic(x[fit_idx], y[fit_idx], c).score(x[held_idx], y[held_idx])) for c in grid]
    return grid[int(np.argmax(scores))]


def linear_probe(train_x: Tensor | np.ndarray, train_y: Tensor | np.ndarray, test_x: Tensor | np.ndarray, test_y: Tensor | np.ndarray, c: float | None = None) -> tuple[float, float]:
    """(accuracy %, C used) of the linear probe; ``c=None`` picks C by :func:`choose_c`."""
    xtr, ytr, xte, yte = _normalised(train_x), _labels(train_y), _normalised(test_x), _labels(test_y)
    if len(yte) == 0:
        return float("nan"), float("nan")
    if len(np.unique(ytr)) < 2:  # one class: the probe predicts it
        return 100.0 * float(np.mean(yte == ytr[0])) if len(ytr) else float("nan"), float("nan")
    c = choose_c(xtr, ytr) if c is None else float(c)
    clf = _fit_logistic(xtr, ytr, c)
    return 100.0 * float(np.mean(clf.predict(xte) == yte)), c


def knn_probe(train_x: Tensor | np.ndarray, train_y: Tensor | np.ndarray, test_x: Tensor | np.ndarray, test_y: Tensor | np.ndarray, k: int = KNN_K) -> float:
    """Accuracy (%) of cosine k-NN: each test feature takes the class with the largest
    summed cosine among its ``min(k, len(train))`` nearest probe-train features."""
    from cl_proxyfda.knn import FeatureBank

    ytr, yte = _labels(train_y), _labels(test_y)
    if len(yte) == 0 or len(ytr) == 0:
        return float("nan")
    bank = FeatureBank(torch.as_tensor(train_x))
    sims, idx = bank.search(torch.as_tensor(test_x), min(k, len(bank)))
    classes = int(max(ytr.max(), yte.max())) + 1
    votes = torch.zeros(len(yte), classes, dtype=torch.float64)
    votes.scatter_add_(1, torch.from_numpy(ytr)[idx], sims.double())
    return 100.0 * float((votes.argmax(dim=1).numpy() == yte).mean())


def probe_accuracy(kind: ProbeKind, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], k: int = KNN_K) -> float:
    """Probe accuracy (%) of ``kind`` trained on ``train`` = (features, labels), scored on ``test``."""
    if kind == "linear":
        return linear_probe(train[0], train[1], test[0], test[1])[0]
    if kind == "knn":
        return knn_probe(train[0], train[1], test[0], test[1], k=k)
    raise ValueError(f"unknown probe {kind!r} (linear, knn)")


def split_features(features: Tensor, labels: Tensor, seed: int = SPLIT_SEED) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Probe-train and probe-test parts of one labelled feature set (stratified 50/50)."""
    a, b = stratified_split(labels, 0.5, seed)
    ia, ib = torch.from_numpy(a), torch.from_numpy(b)
    return (features[ia], labels[ia]), (features[ib], labels[ib])


# -- the runner's side: one probe row per evaluation row ---------------------------------


@dataclass
class ProbeRow:
    """What one evaluation row gets from ``eval.control_probe``."""

    control: float | None = None
    extra: dict[str, list[float]] = field(default_factory=dict)
    diagnostics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def with_extra(self, extra: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
        """``extra`` (the runner's extra-matrix rows) with the probe's rows added."""
        if not self.extra:
            return extra
        return {**(extra or {}), **self.extra}


def _train_evaluator(run: Any) -> Any:
    """A :class:`TaskEvaluator` over the tasks' (and control's) train splits, made once."""
    from cl_proxyfda.evaluation import TaskEvaluator

    if "probe_train_evaluator" not in run.extra:
        sets = [t.train for t in run.stream.tasks] + ([run.stream.control.train] if run.stream.control is not None else [])
        ev = run.evaluator
        run.extra["probe_train_evaluator"] = TaskEvaluator(sets, ev.transform, batch_size=ev.batch_size, cache_mb=ev.cache_mb, workers=ev.workers)
    return run.extra["probe_train_evaluator"]


def _probe_one(run: Any, index: int, kind: ProbeKind) -> tuple[float, str]:
    """(accuracy %, split used) of set ``index`` (a task, or ``len(tasks)``: the control)."""
    test = run.evaluator.features(run.model, index, device=run.device)
    train_ev = _train_evaluator(run)
    if len(train_ev.datasets[index]) > 0:  # type: ignore[arg-type]
        train = train_ev.features(run.model, index, device=run.device)
        split = "train/test"
    else:
        train, test = split_features(*test)
        split = f"stratified 50/50 of test (seed {SPLIT_SEED})"
    return probe_accuracy(kind, train, test, k=run.config.eval.probe_k), split


def probe_row(run: Any) -> ProbeRow:
    """Probe accuracies of the current model's frozen image features (``eval.control_probe``).

    The control set's probe accuracy, and with ``eval.probe_tasks`` one row of the
    extra matrix ``<kind>_probe`` (every task). ``diagnostics`` holds the seconds spent.
    """
    kind = run.config.eval.control_probe
    if kind == "none":
        return ProbeRow()
    t0 = time.time()
    out = ProbeRow(meta={"control_probe": {"kind": kind}})
    n = len(run.stream.tasks)
    if run.stream.control is not None:
        out.control, split = _probe_one(run, n, kind)
        out.meta["control_probe"]["split"] = split
    if kind == "linear":
        out.meta["control_probe"].update({"C_grid": list(C_GRID), "max_iter": MAX_ITER})
    else:
        out.meta["control_probe"]["k"] = run.config.eval.probe_k
    if run.config.eval.probe_tasks:
        out.extra[f"{kind}_probe"] = [_probe_one(run, t, kind)[0] for t in range(n)]
    out.diagnostics["probe_seconds"] = time.time() - t0
    return out
