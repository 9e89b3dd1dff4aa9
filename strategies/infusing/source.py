"""Where the current mini-batch comes from, read from the strategy's criterion gate.

On a generic batch the generic part mutes the strategy's criterion under the reason
:data:`GENERIC_BATCH` (:mod:`cl_proxyfda.criterion_gate`); the other parts read the
source of the batch from that mute, so no part looks another up.
"""
from __future__ import annotations

from typing import Any

from cl_proxyfda.criterion_gate import CriterionGate

SOURCES = ("downstream", "generic")
GENERIC_BATCH = "infusing_generic_batch"


def batch_source(strategy: Any) -> str:
    """``downstream`` or ``generic``: where the current mini-batch comes from."""
    gate = getattr(strategy, "criterion_gate", None)
    return "generic" if isinstance(gate, CriterionGate) and gate.muted_by(GENERIC_BATCH) else "downstream"
