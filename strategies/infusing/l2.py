"""Infusing's weight regulariser (``infusing_l2``): per-tensor mean L2 to the anchor."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cl_proxyfda.losses.infusing import per_tensor_mean_l2
from cl_proxyfda.strategies.anchors import AnchoredPenaltyPlugin


class L2Params(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    weight: float = Field(1e4, ge=0, description="lambda_w of sum over tensors of mean((theta - theta_0)^2)")
    anchor: Literal["pretrained", "previous"] = "pretrained"


class MeanL2Plugin(AnchoredPenaltyPlugin):
    """``weight * sum over trainable tensors of mean((theta - theta_0)^2)``, every batch."""

    Params = L2Params
    name = "infusing_l2"
    term = "mean_l2"
    penalty = staticmethod(per_tensor_mean_l2)
