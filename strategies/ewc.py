"""EWC: Avalanche's own EWCPlugin, with checkpointable state."""
from __future__ import annotations

from typing import Any, Literal, Optional

from avalanche.training.plugins import EWCPlugin
from avalanche.training.utils import ParamData
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.base import Configurable


class EWCParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    ewc_lambda: float = Field(100.0, ge=0)
    mode: Literal["separate", "online"] = "separate"
    decay_factor: Optional[float] = Field(None, ge=0, le=1, description="online mode only")

    @model_validator(mode="after")
    def _online_needs_decay(self) -> "EWCParams":
        if self.mode == "online" and self.decay_factor is None:
            raise ValueError("decay_factor: EWC online mode needs decay_factor")
        return self


@STRATEGIES.register("ewc", help="EWC (Avalanche's plugin): Fisher-weighted L2 to earlier solutions")
class EWC(Configurable, EWCPlugin):
    """Avalanche's EWC (Fisher importance computed at the end of each experience)."""

    Params = EWCParams
    name = "ewc"
    needs_layers: tuple[str, ...] = ()

    def __init__(self, params: EWCParams | None = None, /, *, run: Any = None, **kwargs: Any) -> None:
        self._configure(params, run, kwargs)
        p = self.params
        super().__init__(ewc_lambda=p.ewc_lambda, mode=p.mode, decay_factor=p.decay_factor)
        self.loss_terms: dict[str, float] = {}

    @staticmethod
    def _dump(table: dict) -> dict:
        return {int(exp): {name: pd.data.clone() for name, pd in params.items()} for exp, params in table.items()}

    @staticmethod
    def _restore(dumped: dict) -> dict:
        return {int(exp): {name: ParamData(name, init_tensor=t) for name, t in params.items()} for exp, params in dumped.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"saved_params": self._dump(self.saved_params), "importances": self._dump(self.importances)}

    def load_state_dict(self, state: dict[str, Any], model: Any = None) -> None:
        self.saved_params.clear()
        self.importances.clear()
        self.saved_params.update(self._restore(state.get("saved_params", {})))
        self.importances.update(self._restore(state.get("importances", {})))
