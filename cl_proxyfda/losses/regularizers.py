"""Weight- and feature-space regularisers of the baselines (pure functions)."""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


def l2_to_anchor(params: Iterable[tuple[str, Tensor]], anchors: Mapping[str, Tensor]) -> Tensor:
    """L2-SP: ``sum_n ||theta_n - anchor_n||^2`` over the given named parameters."""
    total: Tensor | None = None
    for name, p in params:
        term = (p - anchors[name].to(p.dtype)).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("l2_to_anchor got no parameters")
    return total


def feature_distance(student: Mapping[str, Tensor], teacher: Mapping[str, Tensor], normalize: bool = True) -> Tensor:
    """LDIFS / feature L2: mean over layers of the batch-mean squared distance.

    Each layer's features (B, D) are L2-normalised first when ``normalize``;
    the per-sample distance is the sum of squares over D.
    """
    if set(student) != set(teacher):
        raise ValueError(f"layers differ: {sorted(student)} vs {sorted(teacher)}")
    if not student:
        raise ValueError("feature_distance got no layers")
    terms = []
    for name in sorted(student):
        s, t = student[name].float(), teacher[name].float()
        if normalize:
            s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        terms.append((s - t).pow(2).sum(dim=-1).mean())
    return torch.stack(terms).mean()


def interpolate_weights(start: Mapping[str, Tensor], end: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """WiSE-FT: ``(1 - alpha) * start + alpha * end`` for floating tensors (others from ``end``)."""
    out = {}
    for name, v in end.items():
        if torch.is_floating_point(v):
            out[name] = (1 - alpha) * start[name].to(v.dtype) + alpha * v
        else:
            out[name] = v
    return out
