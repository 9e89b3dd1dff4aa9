"""LwF: Avalanche's own LwFPlugin, with checkpointable state."""
from __future__ import annotations

import copy
from typing import Any

from avalanche.training.plugins import LwFPlugin
from pydantic import BaseModel, ConfigDict, Field

from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.base import Configurable
from cl_proxyfda.teacher import unwrap


class LwFParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    alpha: float = Field(1.0, ge=0, description="distillation weight")
    temperature: float = Field(2.0, gt=0)


@STRATEGIES.register("lwf", help="LwF (Avalanche's plugin): distillation from the previous model")
class LwF(Configurable, LwFPlugin):
    """Avalanche's LwF (distils the previous model's heads of earlier tasks)."""

    Params = LwFParams
    name = "lwf"
    needs_layers: tuple[str, ...] = ()

    def __init__(self, params: LwFParams | None = None, /, *, run: Any = None, **kwargs: Any) -> None:
        self._configure(params, run, kwargs)
        super().__init__(alpha=self.params.alpha, temperature=self.params.temperature)
        self.loss_terms: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        lwf = self.lwf
        return {
            "prev_model": None if lwf.prev_model is None else lwf.prev_model.state_dict(),
            "prev_classes_by_task": {int(t): sorted(int(c) for c in cs) for t, cs in lwf.prev_classes_by_task.items()},
            "expcount": int(lwf.expcount),
        }

    def load_state_dict(self, state: dict[str, Any], model: Any = None) -> None:
        lwf = self.lwf
        lwf.expcount = int(state.get("expcount", 0))
        lwf.prev_classes_by_task.clear()
        for t, cs in state.get("prev_classes_by_task", {}).items():
            lwf.prev_classes_by_task[int(t)] = set(cs)
        if state.get("prev_model") is not None:
            if model is None:
                raise ValueError("LwF needs the model to restore its previous-model copy")
            lwf.prev_model = copy.deepcopy(unwrap(model))
            lwf.prev_model.load_state_dict(state["prev_model"])
            lwf.prev_model.known_train_tasks_labels = set(lwf.prev_classes_by_task)
