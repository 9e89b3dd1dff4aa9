"""Losses of the Infusing recipe (docs/methods.md section 6), pure functions of tensors.

- ``cosine_classifier_ce``: normalised-softmax cross-entropy of a cosine classifier
  (no bias): ``CE(scale * cos(e_i, w_c), y_i)``.
- ``embedding_distillation``: ``mean_i mean_d (e_i - t_i)^2``; the plugin multiplies it by
  ``lambda_d`` (``distill_weight_for_dim``: 1000 for 768-d, scaled with the dimension).
- ``per_tensor_mean_l2``: ``sum over tensors of mean((theta - theta_0)^2)``, one mean
  per tensor so that every tensor counts alike whatever its size.

The generic-set validation score of the model selection, leave-one-out k-NN accuracy,
is :func:`cl_proxyfda.knn.knn_accuracy`, next to the project's other k-NN code.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch.nn.functional as F
from torch import Tensor

#: lambda_d of the paper for 768-d embeddings (ViT-L/14); other dimensions scale linearly.
DISTILL_WEIGHT_768 = 1000.0


def cosine_logits(embeds: Tensor, weight: Tensor, scale: float = 16.0) -> Tensor:
    """``scale * cos(e_i, w_c)``: (B, D) embeddings against (C, D) class weights, no bias."""
    return scale * F.normalize(embeds.float(), dim=-1) @ F.normalize(weight.float(), dim=-1).t()


def cosine_classifier_ce(embeds: Tensor, weight: Tensor, labels: Tensor, scale: float = 16.0) -> Tensor:
    """Normalised-softmax cross-entropy (batch mean) of a bias-free cosine classifier."""
    return F.cross_entropy(cosine_logits(embeds, weight, scale), labels)


def embedding_distillation(embeds: Tensor, targets: Tensor) -> Tensor:
    """``mean_i mean_d (e_i - t_i)^2`` between student embeddings and fixed targets."""
    if embeds.shape != targets.shape:
        raise ValueError(f"embeddings {tuple(embeds.shape)} and targets {tuple(targets.shape)} differ in shape")
    return (embeds.float() - targets.float()).pow(2).mean()


def distill_weight_for_dim(dim: int) -> float:
    """lambda_d for ``dim``-d embeddings: ``1000 * dim / 768`` (1000 for 768-d, ~667 for 512-d).

    With L2-normalised embeddings ``mean_d (e - t)^2 = ||e - t||^2 / dim``, so this rule
    keeps the weight on the squared distance ``||e - t||^2`` at 1000/768 for every dim.
    """
    return DISTILL_WEIGHT_768 * dim / 768.0


def per_tensor_mean_l2(params: Iterable[tuple[str, Tensor]], anchors: Mapping[str, Tensor]) -> Tensor:
    """``sum_n mean((theta_n - anchor_n)^2)`` over the given named tensors."""
    total: Tensor | None = None
    for name, p in params:
        term = (p - anchors[name].to(device=p.device, dtype=p.dtype)).pow(2).mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("per_tensor_mean_l2 got no parameters")
    return total


__all__ = [
    "DISTILL_WEIGHT_768",
    "cosine_classifier_ce",
    "cosine_logits",
    "distill_weight_for_dim",
    "embedding_distillation",
    "per_tensor_mean_l2",
]
