"""L2-SP: an L2 pull of the trained weights towards an anchor."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cl_proxyfda.losses.regularizers import l2_to_anchor
from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.anchors import snapshot_anchor, trainable_named_parameters
from cl_proxyfda.strategies.base import CLPlugin


class L2SPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(0.5, ge=0, description="alpha in alpha * sum ||theta - theta_0||^2")
    anchor: Literal["pretrained", "previous"] = "pretrained"


class L2SPPlugin(CLPlugin):
    """Adds ``weight * sum ||theta - anchor||^2`` over the trainable parameters."""

    name = "l2sp"

    def __init__(self, weight: float = 0.5, anchor: str = "pretrained") -> None:
        super().__init__()
        self.weight = weight
        self.anchor = anchor
        self.anchors: dict | None = None

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.anchors is None or self.anchor == "previous":
            self.anchors = snapshot_anchor(strategy, self.anchor)  # type: ignore[arg-type]

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.weight == 0 or not self.anchors:
            return
        loss = l2_to_anchor(trainable_named_parameters(strategy), self.anchors)
        self.loss_terms["l2sp"] = float(loss.detach())
        strategy.loss = strategy.loss + self.weight * loss

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": self.anchors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchors = state.get("anchors")


@STRATEGIES.register("l2sp", L2SPParams, help="L2-SP: L2 to pre-trained or start-of-experience weights")
def build_l2sp(params: L2SPParams, **context: Any) -> L2SPPlugin:
    return L2SPPlugin(params.weight, params.anchor)
