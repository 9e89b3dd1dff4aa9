"""Weight anchors shared by the weight-space plugins (L2-SP, AWC, ZSCL)."""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from cl_proxyfda.strategies.base import CLPlugin
from cl_proxyfda.teacher import teacher_bank, unwrap

Anchor = Literal["pretrained", "previous"]


def trainable_named_parameters(strategy: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters of the task model that receive gradients."""
    return [(n, p) for n, p in unwrap(strategy.model).named_parameters() if p.requires_grad]


def snapshot_anchor(strategy: Any, anchor: Anchor) -> dict[str, Tensor]:
    """Detached copies of the trainable parameters at the anchor point.

    ``pretrained`` takes them from the strategy's initial weights (the model before any
    training), ``previous`` from the model as it is now (start of an experience).
    """
    names = [n for n, _ in trainable_named_parameters(strategy)]
    if anchor == "pretrained":
        initial = teacher_bank(strategy).initial_state
        if initial is not None:
            return {n: initial[n].detach().clone() for n in names}
    params = dict(unwrap(strategy.model).named_parameters())
    return {n: params[n].detach().clone() for n in names}


class AnchoredPenaltyPlugin(CLPlugin):
    """Adds ``weight * penalty(trainable parameters, anchors)`` to every batch's loss.

    Subclasses set ``Params`` (with ``weight`` and ``anchor``), ``term`` (the loss-term
    name) and ``penalty`` (a pure function of the named parameters and the anchor
    tensors). The anchor is taken at the first experience (``pretrained``) or at the
    start of each (``previous``).
    """

    term = "penalty"

    def __init__(self, params: Any = None, /, *, run: Any = None, **kwargs: Any) -> None:
        super().__init__(params, run=run, **kwargs)
        self.anchors: dict[str, Tensor] | None = None

    @staticmethod
    def penalty(named_params: Any, anchors: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.anchors is None or self.params.anchor == "previous":
            self.anchors = snapshot_anchor(strategy, self.params.anchor)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.params.weight == 0 or not self.anchors:
            return
        loss = self.penalty(trainable_named_parameters(strategy), self.anchors)
        self.loss_terms[self.term] = float(loss.detach())
        strategy.loss = strategy.loss + self.params.weight * loss

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": self.anchors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchors = state.get("anchors")
