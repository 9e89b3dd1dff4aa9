"""The ``knn`` section: neighbour search, torch top-k versus faiss
(:class:`~cl_proxyfda.knn.FeatureBank`, its default and its BLAS search path)."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from cl_proxyfda.tools.bench.context import BenchContext
from cl_proxyfda.tools.bench.report import Section
from cl_proxyfda.tools.bench.timing import interleaved


def knn_section(ctx: BenchContext) -> Section:
    from cl_proxyfda.knn import FeatureBank

    s = ctx.sizes
    section = Section("knn", "neighbour search: torch top-k vs faiss FeatureBank")
    gen = torch.Generator().manual_seed(0)
    section.columns = ["bank size", "torch top-k ms", "faiss search ms", "faiss / torch", "faiss, BLAS path ms", "BLAS path / torch",
                       "faiss build ms", "neighbours agree"]
    agreements: dict[str, float] = {}
    agreements_blas: dict[str, float] = {}
    default_threshold = blas_threshold()
    for n in s.knn_sizes:
        bank = torch.randn(n, s.knn_dim, generator=gen)
        queries = torch.randn(s.knn_queries, s.knn_dim, generator=gen)
        t0 = time.perf_counter()
        fbank = FeatureBank(bank)
        build = time.perf_counter() - t0
        bank_n = F.normalize(bank, dim=1)

        def torch_search() -> tuple[torch.Tensor, torch.Tensor]:
            sims = F.normalize(queries, dim=1) @ bank_n.t()
            return sims.topk(s.knn_k, dim=1)

        def faiss_search() -> tuple[torch.Tensor, torch.Tensor]:
            return fbank.search(queries, s.knn_k)

        def faiss_blas_search() -> tuple[torch.Tensor, torch.Tensor]:
            with faiss_blas_threshold(1):
                return fbank.search(queries, s.knn_k)

        jobs = [("torch", torch_search), ("faiss", faiss_search), ("blas", faiss_blas_search)]
        med = {k: m.median for k, m in interleaved(jobs, s.micro_repeats, s.min_run_time / s.micro_repeats).items()}
        _, idx_t = torch_search()
        agree = {key: float(np.mean([set(a.tolist()) == set(b.tolist()) for a, b in zip(idx_t, fn()[1])])) for key, fn in jobs[1:]}
        agreements[str(n)], agreements_blas[str(n)] = agree["faiss"], agree["blas"]
        ratio = section.add_ratio(f"faiss_over_torch/{n}", med["faiss"] / med["torch"])
        ratio_blas = section.add_ratio(f"faiss_blas_over_torch/{n}", med["blas"] / med["torch"])
        shown = "100%" if min(agree.values()) == 1.0 else f"{100 * agree['faiss']:.0f}% / {100 * agree['blas']:.0f}%"
        section.rows.append([n, 1000 * med["torch"], 1000 * med["faiss"], ratio, 1000 * med["blas"], ratio_blas, 1000 * build, shown])
    section.extra["agreement"] = agreements
    section.extra["agreement_blas_path"] = agreements_blas
    section.setting = (
        f"{s.knn_queries} queries, dim {s.knn_dim}, k = {s.knn_k}, exact cosine search (random Gaussian features, L2-normalised); "
        f"Timer.blocked_autorange medians pooled over {s.micro_repeats} rounds, order rotated; CPU, {torch.get_num_threads()} torch threads, faiss {faiss_threads()} threads."
    )
    section.notes += [
        "neighbours agree = share of queries whose k neighbour sets are identical in torch and faiss (both faiss paths).",
        f"faiss searches with its BLAS (matrix-product) path only when queries x dim reaches faiss.cvar.distance_compute_blas_threshold "
        f"({default_threshold} in this faiss build; {s.knn_queries} x {s.knn_dim} = {s.knn_queries * s.knn_dim}), else query by query; "
        "'BLAS path' sets the threshold to 1 for the call (restored afterwards).",
    ]
    return section


def blas_threshold() -> int | None:
    import faiss

    cvar = getattr(faiss, "cvar", None)
    return int(cvar.distance_compute_blas_threshold) if cvar is not None and hasattr(cvar, "distance_compute_blas_threshold") else None


@contextlib.contextmanager
def faiss_blas_threshold(value: int) -> Iterator[None]:
    """Temporarily set faiss's query-count threshold for its BLAS search path."""
    import faiss

    old = blas_threshold()
    if old is None:
        yield
        return
    faiss.cvar.distance_compute_blas_threshold = value
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


def faiss_threads() -> int:
    import faiss

    return int(faiss.omp_get_max_threads())
