"""Weight anchors shared by the weight-space plugins (L2-SP, AWC, ZSCL)."""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

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
