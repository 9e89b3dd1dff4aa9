"""Feature distillation / LDIFS: keep features of several layers near the reference's."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cl_proxyfda.losses.regularizers import feature_distance
from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.base import CLPlugin
from cl_proxyfda.teacher import student_outputs, teacher_outputs, unwrap


class LDIFSParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    weight: float = Field(10.0, ge=0, description="alpha (LDIFS uses 10)")
    layers: list[str] | Literal["auto", "embed"] = Field(
        "auto",
        description="'embed' = final embedding only (feature L2); 'auto' = ln_pre + 4 evenly spaced blocks "
        "(ln_pre, blocks 3/6/9/12 on a 12-block ViT); or explicit names such as [ln_pre, block2]",
    )
    reference: Literal["pretrained", "previous"] = "pretrained"


def auto_layers(num_blocks: int) -> list[str]:
    """ln_pre plus four evenly spaced blocks (3, 6, 9, 12 for 12 blocks)."""
    picks = sorted({max(1, round(num_blocks * q / 4)) for q in (1, 2, 3, 4)})
    return ["ln_pre"] + [f"block{i}" for i in picks]


@STRATEGIES.register("ldifs", help="LDIFS / feature distillation against the frozen reference")
class LDIFSPlugin(CLPlugin):
    """Adds ``weight * mean_l ||phi_l(x) - phi0_l(x)||^2`` on normalised features."""

    Params = LDIFSParams
    name = "ldifs"

    def __init__(self, params: LDIFSParams | None = None, /, *, run: Any = None, **kwargs: Any) -> None:
        super().__init__(params, run=run, **kwargs)
        self.layers: list[str] = []
        if isinstance(self.params.layers, list):  # explicit names are checked when the model is built
            self.needs_layers = tuple(self.params.layers)

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        model = unwrap(strategy.model)
        option = self.params.layers
        if option == "embed":
            self.layers = []
        elif option == "auto":
            self.layers = auto_layers(len(model.clip.visual.transformer.resblocks))
        else:
            self.layers = list(option)
        if self.layers:
            model.capture_layers(self.layers)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.params.reference == "previous":
            from cl_proxyfda.teacher import teacher_bank

            teacher_bank(strategy).refresh_previous(strategy.model)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.params.weight == 0:
            return
        student = student_outputs(strategy)
        teacher = teacher_outputs(strategy, self.params.reference, self.layers)
        if self.layers:
            s = {k: student["layers"][k] for k in self.layers}
            t = {k: teacher["layers"][k] for k in self.layers}
        else:
            s, t = {"embed": student["image_embeds"]}, {"embed": teacher["image_embeds"]}
        loss = feature_distance(s, t)
        self.loss_terms["ldifs"] = float(loss.detach())
        strategy.loss = strategy.loss + self.params.weight * loss
