"""X-TAIL: cross-domain task-agnostic incremental learning (RAIL, NeurIPS 2024; LADA, ICML 2025).

The ``xtail`` stream is MTIL without CIFAR100 (10 datasets), in MTIL's two orders with
CIFAR100 removed, trained few-shot (16 images per class by default), evaluated on the
full test sets. Everything else (loading, splits, vocabularies, formats, control set)
is the ``mtil`` stream's: :func:`cl_proxyfda.benchmarks.mtil.build_mtil_datasets`.
A run on it evaluates task-agnostically by default (``eval.task_agnostic``: every
test image over the union of all 10 datasets' class names, no task label; RAIL's
single template ``"a photo of a {}."`` for the union head). Definitions and sources:
docs/xtail.md.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from cl_proxyfda.benchmarks.mtil import MTIL_ORDERS, MTILStreamParams, build_mtil_datasets, mtil_task_names
from cl_proxyfda.benchmarks.stream import StreamData
from cl_proxyfda.errors import ConfigError
from cl_proxyfda.registry import STREAMS

EXCLUDED = "CIFAR100"
# RAIL's configs/analytic_clip.yaml: the order-I sequence without CIFAR100.
XTAIL_ORDERS = {order: [n for n in names if n != EXCLUDED] for order, names in MTIL_ORDERS.items()}
XTAIL_SHOTS = 16  # RAIL's num_shots (and LADA's 16-shot setting)


class XTAILStreamParams(MTILStreamParams):
    """Arguments of the ``xtail`` stream (the ``mtil`` stream's, 16 shots by default)."""

    tasks: Optional[list[str]] = Field(None, description="subset of the 10 datasets (the order's sequence is kept)")
    shots: Optional[int] = Field(XTAIL_SHOTS, ge=1, description="training images per class (16 in RAIL / LADA; null: every image)")


def xtail_task_names(order: str = "I", tasks: list[str] | None = None) -> list[str]:
    """The X-TAIL datasets of an order, optionally restricted to ``tasks`` (order kept)."""
    if tasks is not None and any(t.casefold() == EXCLUDED.casefold() for t in tasks):
        raise ConfigError("stream.tasks", f"{EXCLUDED} is not part of X-TAIL (known: {', '.join(XTAIL_ORDERS[order])})")
    return [n for n in mtil_task_names(order, tasks) if n != EXCLUDED]


@STREAMS.register("xtail", XTAILStreamParams, help="X-TAIL: MTIL without CIFAR100, orders I/II, 16-shot; task-agnostic evaluation")
def build_xtail_stream(params: XTAILStreamParams, **context: Any) -> StreamData:
    """Build the X-TAIL tasks (and the optional ImageNet control set)."""
    return build_mtil_datasets(params, xtail_task_names(params.order, params.tasks))
