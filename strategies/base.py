"""The base of the project's Avalanche plugins.

A plugin is thin: it gathers features at the right callback and adds ``weight * loss``
to ``strategy.loss`` in ``before_backward``. State a plugin must keep across
experiences (anchors, importances, learnable temperatures, its own optimizer) is
returned by ``state_dict`` as tensors and plain Python values, so that the run's
checkpoint can be loaded with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from typing import Any

from avalanche.core import SupervisedPlugin


class CLPlugin(SupervisedPlugin):
    """A plugin whose state survives checkpoints.

    ``name`` is the registry name. ``needs_layers`` lists student layers the plugin reads
    (the runner asks the model to capture them). ``loss_terms`` holds the last value of
    each loss term the plugin added (floats), for logging and NaN reports.
    """

    name: str = "plugin"
    needs_layers: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.loss_terms: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"plugin {self.name} got state it does not know: {sorted(state)}")
