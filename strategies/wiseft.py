"""WiSE-FT: interpolate the fine-tuned weights with an anchor (pre-trained or start of the experience)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from cl_proxyfda.losses.regularizers import interpolate_weights
from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.anchors import Anchor
from cl_proxyfda.strategies.base import CLPlugin
from cl_proxyfda.teacher import teacher_bank, unwrap


class WiSEFTParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    alpha: float = Field(0.5, ge=0, le=1, description="theta = (1 - alpha) theta_anchor + alpha theta")
    when: Literal["every_experience", "end"] = "every_experience"
    anchor: Anchor = Field(
        "pretrained",
        description="theta_anchor: pretrained = the weights before any training; previous = the weights at the start "
        "of the experience (ZSCL's WiSE-FT baseline, --wise_ft_model n)",
    )


@STRATEGIES.register("wiseft", help="WiSE-FT: weight interpolation with the pre-trained (or start-of-experience) model")
class WiSEFTPlugin(CLPlugin):
    """After training an experience (or the last one), move the weights to the interpolation."""

    Params = WiSEFTParams
    name = "wiseft"

    def __init__(self, params: WiSEFTParams | None = None, /, *, run: Any = None, **kwargs: Any) -> None:
        super().__init__(params, run=run, **kwargs)
        self.applied = 0
        self._start: dict[str, Tensor] | None = None  # anchor "previous": the weights at the experience's start

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.params.anchor == "previous":
            self._start = {k: v.detach().clone() for k, v in unwrap(strategy.model).state_dict().items()}

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        num_exps = getattr(strategy, "num_experiences", None)
        is_last = num_exps is not None and int(strategy.experience.current_experience) == num_exps - 1
        if self.params.when == "end" and not is_last:
            return
        anchor = self._start if self.params.anchor == "previous" else teacher_bank(strategy).initial_state
        if anchor is None:
            raise RuntimeError(f"WiSE-FT needs the {self.params.anchor} weights (anchor: {self.params.anchor})")
        model = unwrap(strategy.model)
        model.load_state_dict(interpolate_weights(anchor, model.state_dict(), self.params.alpha))
        model.text_changed()
        self._start = None
        self.applied += 1

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.applied = int(state.get("applied", 0))
