"""Losses of the Infusing recipe (docs/methods.md section 6), pure functions of tensors.

- ``cosine_classifier_ce``: normalised-softmax cross-entropy of a cosine classifier
  (no bias): ``CE(scale * cos(e_i, w_c), y_i)``.
- ``embedding_distillation``: ``mean_i mean_d (e_i - t_i)^2``; the plugin multiplies it by
  ``lambda_d`` (``distill_weight_for_dim``: 1000 for 768-d, scaled with the dimension).
- ``per_tensor_mean_l2``: ``sum over tensors of mean((theta - theta_0)^2)``, one mean
  per tensor so that every tensor counts alike whatever its size.
- ``knn_accuracy``: leave-one-out k-NN classification accuracy of embeddings (faiss),
  the generic-set validation score of the model selection.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import faiss
import numpy as np
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


def knn_accuracy(embeds: Tensor, labels: Tensor, k: int = 10) -> float:
    """Leave-one-out k-NN accuracy (%) of cosine retrieval within a labelled set.

    Each item's ``k`` most similar other items (exact search, faiss ``IndexFlatIP`` on
    L2-normalised embeddings) vote for their labels; ties go to the label whose voters
    are the most similar in total.
    """
    n = embeds.shape[0]
    if n < 2:
        raise ValueError("knn_accuracy needs at least two items")
    k = min(k, n - 1)
    x = np.ascontiguousarray(F.normalize(embeds.detach().float().cpu(), dim=-1).numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, idx = index.search(x, k + 1)
    own = idx == np.arange(n)[:, None]
    # Drop each item's own hit (or its last hit when the item is not among them: duplicates).
    own[~own.any(axis=1), -1] = True
    keep = ~own
    idx = idx[keep].reshape(n, k)
    sims = sims[keep].reshape(n, k)
    y = labels.detach().cpu().numpy().astype(np.int64)
    classes, y_index = np.unique(y, return_inverse=True)
    votes = np.zeros((n, len(classes)))
    neighbour_class = y_index[idx]
    rows = np.repeat(np.arange(n), k)
    # One vote per neighbour; the similarity sum (< k) breaks ties only.
    np.add.at(votes, (rows, neighbour_class.ravel()), 1.0 + 1e-3 * (sims.ravel() + 1.0) / 2.0)
    predicted = votes.argmax(axis=1)
    return 100.0 * float((predicted == y_index).mean())


__all__ = [
    "DISTILL_WEIGHT_768",
    "cosine_classifier_ce",
    "cosine_logits",
    "distill_weight_for_dim",
    "embedding_distillation",
    "knn_accuracy",
    "per_tensor_mean_l2",
]
