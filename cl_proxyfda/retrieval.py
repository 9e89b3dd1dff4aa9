"""Retrieval metrics with faiss: image-to-image (mAP@k, Recall@1) and image-text Recall@K.

All searches are exact inner-product searches (``faiss.IndexFlatIP``, through
``cl_proxyfda.knn.FeatureBank``) over L2-normalised float32 embeddings, i.e. cosine
similarity.

**Image-to-image** (leave-one-out): every test image of a task queries all the *other*
test images of that task; an item is relevant when it has the query's class.

- ``AP@k`` of one query, with ``rel_i`` = 1 when the i-th result is relevant,
  ``P@i`` = (relevant among the first i results) / i and ``R`` = the number of relevant
  items in the gallery (same-class images other than the query):
  ``AP@k = (1 / min(k, R)) * sum_{i=1..k} rel_i * P@i``.
  The normalisation ``min(k, R)`` makes a perfect ranking score 1 even when fewer than
  k relevant items exist, and counts relevant items ranked below k as missed (the
  convention of the "Infusing" paper's kNN mAP@20 and of most metric-learning code).
  Queries with ``R = 0`` (a class with a single test image) have no defined AP and are
  left out of the mean. ``mAP@k`` is the mean over the remaining queries.
- ``Recall@1`` (image-to-image): the fraction of those queries whose nearest other image
  has their class (the 1-NN accuracy).
- ``k`` is capped at the gallery size (N - 1).

**Image-text** (paired captions, e.g. COCO/Flickr style, several captions per image):
``caption_image[j]`` = index of the image caption j describes.
Image-to-text ``R@K``: fraction of images with at least one of their captions among the
K texts most similar to them (images without a caption are left out). Text-to-image
``R@K``: fraction of captions whose image is among the K images most similar to them.

``retrieval_row`` gives, for every task of a run, mAP@k and Recall@1 in percent, shaped
like one row of the accuracy matrix (``RunResults.add_row(..., extra=...)``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cl_proxyfda.knn import FeatureBank


# ------------------------------------------------------------------- from ranks
def average_precision_at_k(relevance: Tensor, num_relevant: Tensor, k: int | None = None) -> Tensor:
    """AP@k of each query from its ranked relevance.

    Args:
        relevance: (Q, >= k) boolean, ``relevance[q, i]`` = the (i+1)-th result is relevant.
        num_relevant: (Q,) number of relevant items in the gallery (``R``).
        k: cut-off (default: the number of columns).

    Returns (Q,) float: ``sum_{i<=k} rel_i P@i / min(k, R)``; NaN where ``R = 0``.
    """
    rel = torch.as_tensor(relevance).bool()
    k = rel.shape[1] if k is None else k
    if k < 1 or k > rel.shape[1]:
        raise ValueError(f"k = {k} needs 1..{rel.shape[1]} ranked results per query")
    rel = rel[:, :k].float()
    ranks = torch.arange(1, k + 1, dtype=torch.float32)
    precision = rel.cumsum(dim=1) / ranks
    r = torch.as_tensor(num_relevant).float()
    denom = torch.clamp(r, max=float(k))
    ap = (precision * rel).sum(dim=1) / denom.clamp(min=1)
    return torch.where(r > 0, ap, torch.full_like(ap, float("nan")))


def recall_at_k(relevance: Tensor, k: int) -> Tensor:
    """(Q,) float: 1 when any of the first k results is relevant."""
    rel = torch.as_tensor(relevance).bool()
    if k < 1 or k > rel.shape[1]:
        raise ValueError(f"k = {k} needs 1..{rel.shape[1]} ranked results per query")
    return rel[:, :k].any(dim=1).float()


# ---------------------------------------------------------------- image-to-image
def image_retrieval(features: Tensor, labels: Tensor | Sequence[int], k: int = 20) -> dict[str, float]:
    """Leave-one-out image-to-image retrieval: ``{"map": mAP@k, "r1": Recall@1, ...}``.

    Values are fractions in [0, 1]; ``queries`` counts the queries with ``R > 0`` that
    enter both means; ``k`` is the cut-off actually used (capped at N - 1).
    """
    feats = torch.as_tensor(features).float()
    y = torch.as_tensor(labels).long().cpu()
    n = feats.shape[0]
    if n != len(y):
        raise ValueError(f"{n} features for {len(y)} labels")
    if n < 2:
        return {"map": float("nan"), "r1": float("nan"), "queries": 0, "k": 0}
    k = min(k, n - 1)
    bank = FeatureBank(feats)
    _, idx = bank.search(feats, k, exclude=torch.arange(n))
    relevance = y[idx] == y.unsqueeze(1)
    counts = torch.bincount(y, minlength=int(y.max()) + 1)
    num_relevant = counts[y] - 1
    ap = average_precision_at_k(relevance, num_relevant, k)
    valid = num_relevant > 0
    if not bool(valid.any()):
        return {"map": float("nan"), "r1": float("nan"), "queries": 0, "k": k}
    return {
        "map": float(ap[valid].mean()),
        "r1": float(recall_at_k(relevance, 1)[valid].mean()),
        "queries": int(valid.sum()),
        "k": k,
    }


# ------------------------------------------------------------------ image-text
def _ranked(queries: Tensor, gallery: Tensor, k: int) -> Tensor:
    """Indices (Q, k) of the k most similar gallery items of each query (faiss, exact)."""
    _, idx = FeatureBank(gallery).search(queries, k)
    return idx


def cross_modal_retrieval(image_features: Tensor, text_features: Tensor, caption_image: Tensor | Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@K with paired captions (fractions in [0, 1]).

    Args:
        image_features: (N_img, D); text_features: (N_txt, D) (normalised here).
        caption_image: (N_txt,) the image index of each caption.
        ks: the K values (each capped at the gallery size).

    Returns ``{"i2t_r1": .., "i2t_r5": .., ..., "t2i_r1": .., ...}``.
    """
    img = F.normalize(torch.as_tensor(image_features).float(), dim=1)
    txt = F.normalize(torch.as_tensor(text_features).float(), dim=1)
    owner = torch.as_tensor(caption_image).long().cpu()
    if len(owner) != txt.shape[0]:
        raise ValueError(f"{txt.shape[0]} captions for {len(owner)} caption-image indices")
    if len(owner) and (int(owner.min()) < 0 or int(owner.max()) >= img.shape[0]):
        raise ValueError("caption_image holds indices outside the image set")
    out: dict[str, float] = {}
    k_i2t = min(max(ks), txt.shape[0])
    k_t2i = min(max(ks), img.shape[0])
    i2t = owner[_ranked(img, txt, k_i2t)] == torch.arange(img.shape[0]).unsqueeze(1)
    t2i = _ranked(txt, img, k_t2i) == owner.unsqueeze(1)
    has_caption = torch.bincount(owner, minlength=img.shape[0]) > 0
    for k in ks:
        out[f"i2t_r{k}"] = float(recall_at_k(i2t, min(k, k_i2t))[has_caption].mean())
        out[f"t2i_r{k}"] = float(recall_at_k(t2i, min(k, k_t2i)).mean())
    return out


# --------------------------------------------------------------------- run rows
def retrieval_row(model: Any, evaluator: Any, num_tasks: int, device: torch.device | str = "cpu", k: int = 20) -> dict[str, list[float]]:
    """mAP@k and Recall@1 (%) of image-to-image retrieval on every task's test set.

    Returns ``{"retrieval_map{k}": [one value per task], "retrieval_r1": [...]}``, ready
    for ``RunResults.add_row(..., extra=...)``. A task whose queries all lack a relevant
    item gives NaN (stored as null).
    """
    maps, r1s = [], []
    for t in range(num_tasks):
        feats, labels = evaluator.features(model, t, device=device)
        scores = image_retrieval(feats, labels, k)
        maps.append(100.0 * scores["map"])
        r1s.append(100.0 * scores["r1"])
    return {f"retrieval_map{k}": maps, "retrieval_r1": r1s}


__all__ = [
    "average_precision_at_k",
    "recall_at_k",
    "image_retrieval",
    "cross_modal_retrieval",
    "retrieval_row",
]
