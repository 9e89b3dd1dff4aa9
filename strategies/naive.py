"""Naive fine-tuning: the task loss alone (a plugin that adds nothing)."""
from __future__ import annotations

from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.base import CLPlugin, NoParams

NaiveParams = NoParams


@STRATEGIES.register("naive", help="naive fine-tuning: task loss only")
class NaivePlugin(CLPlugin):
    """Plain fine-tuning with cross-entropy on the current task."""

    Params = NaiveParams
    name = "naive"
