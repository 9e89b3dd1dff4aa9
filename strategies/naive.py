"""Naive fine-tuning: the task loss alone (a plugin that adds nothing)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.base import CLPlugin


class NaiveParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class NaivePlugin(CLPlugin):
    """Plain fine-tuning with cross-entropy on the current task."""

    name = "naive"


@STRATEGIES.register("naive", NaiveParams, help="naive fine-tuning: task loss only")
def build_naive(params: NaiveParams, **context: Any) -> NaivePlugin:
    return NaivePlugin()
