"""L2-SP: an L2 pull of the trained weights towards an anchor."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cl_proxyfda.losses.regularizers import l2_to_anchor
from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.anchors import AnchoredPenaltyPlugin


class L2SPParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    weight: float = Field(0.5, ge=0, description="alpha in alpha * sum ||theta - theta_0||^2")
    anchor: Literal["pretrained", "previous"] = "pretrained"


@STRATEGIES.register("l2sp", help="L2-SP: L2 to pre-trained or start-of-experience weights")
class L2SPPlugin(AnchoredPenaltyPlugin):
    """Adds ``weight * sum ||theta - anchor||^2`` over the trainable parameters."""

    Params = L2SPParams
    name = "l2sp"
    term = "l2sp"
    penalty = staticmethod(l2_to_anchor)
