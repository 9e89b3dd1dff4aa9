"""A feature bank with exact cosine nearest-neighbour search (faiss ``IndexFlatIP``).

Features are L2-normalised and stored as float32, so inner products are cosines.
Used by Proxy-FDA's ``graph: bank`` option: the reference-space neighbours of each
anchor are looked up among the whole training set of the experience, not only the batch;
by the k-NN probe (:mod:`cl_proxyfda.probe`); and by :func:`knn_accuracy`, the
leave-one-out score of Infusing's model selection on its generic validation images.
"""
from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _as_float32(x: Tensor | np.ndarray) -> np.ndarray:
    t = torch.as_tensor(x).detach().float().cpu()
    if t.ndim != 2:
        raise ValueError(f"features must be a (N, D) matrix, got shape {tuple(t.shape)}")
    return np.ascontiguousarray(F.normalize(t, dim=1).numpy(), dtype=np.float32)


class FeatureBank:
    """Exact inner-product search over L2-normalised features.

    Args:
        features: (N, D) features (normalised here).
    """

    def __init__(self, features: Tensor | np.ndarray) -> None:
        data = _as_float32(features)
        self.dim = data.shape[1]
        self.index = faiss.IndexFlatIP(self.dim)
        self.index.add(data)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: Tensor | np.ndarray, k: int, exclude: Tensor | np.ndarray | None = None, force_blas: bool = True) -> tuple[Tensor, Tensor]:
        """The ``k`` most similar bank entries of each query: ``(sims, idx)``, both (Q, k).

        ``exclude`` (Q,) gives, for queries that are themselves in the bank, their own
        bank index: that entry is removed from the result (self-exclusion). Rows are
        sorted by decreasing cosine similarity; ``idx`` is a LongTensor of bank indices.
        ``force_blas=False`` leaves the search path to faiss (exactly tied entries may
        then come in another order).
        """
        q = _as_float32(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the bank {self.dim}")
        extra = 0 if exclude is None else 1
        if k < 1 or k + extra > len(self):
            raise ValueError(f"k = {k} neighbours asked from a bank of {len(self)} entries" + (" (self excluded)" if extra else ""))
        # faiss searches query by query below cvar.distance_compute_blas_threshold
        # (128000 = queries x dim); one BLAS product is 4-6x faster for batch-sized queries.
        saved = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = 1 if force_blas else saved
        try:
            sims, idx = self.index.search(q, k + extra)
        finally:
            faiss.cvar.distance_compute_blas_threshold = saved
        sims_t, idx_t = torch.from_numpy(sims), torch.from_numpy(idx).long()
        if exclude is None:
            return sims_t, idx_t
        own = torch.as_tensor(exclude).long().view(-1, 1)
        if own.shape[0] != q.shape[0]:
            raise ValueError("exclude needs one bank index per query")
        keep = idx_t != own
        # Rows where the query's own entry was not among the hits drop their last hit.
        no_self = keep.all(dim=1)
        keep[no_self, -1] = False
        return sims_t[keep].view(-1, k), idx_t[keep].view(-1, k)


def knn_accuracy(embeds: Tensor, labels: Tensor, k: int = 10) -> float:
    """Leave-one-out k-NN accuracy (%) of cosine retrieval within a labelled set.

    Each item's ``k`` most similar other items (a :class:`FeatureBank` of the set itself,
    each item's own hit excluded; ``k`` is capped at ``n - 1``) vote for their labels;
    ties go to the label whose voters are the most similar in total.
    """
    n = embeds.shape[0]
    if n < 2:
        raise ValueError("knn_accuracy needs at least two items")
    k = min(k, n - 1)
    # faiss's own search path, as the model selection has always scored: the forced BLAS
    # path can order exactly tied neighbours (duplicate images) differently
    sims_t, idx_t = FeatureBank(embeds).search(embeds, k, exclude=torch.arange(n), force_blas=False)
    sims, idx = sims_t.numpy(), idx_t.numpy()
    y = labels.detach().cpu().numpy().astype(np.int64)
    classes, y_index = np.unique(y, return_inverse=True)
    votes = np.zeros((n, len(classes)))
    rows = np.repeat(np.arange(n), k)
    # One vote per neighbour; the similarity sum (< k) breaks ties only.
    np.add.at(votes, (rows, y_index[idx].ravel()), 1.0 + 1e-3 * (sims.ravel() + 1.0) / 2.0)
    return 100.0 * float((votes.argmax(axis=1) == y_index).mean())
