"""A gate on the strategy's criterion: plugins whose loss replaces it on some batches mute it.

Avalanche adds ``strategy.criterion()`` to ``strategy.loss`` after ``after_forward`` and
before ``before_backward``; a template subclass decides what ``criterion()`` returns (the
template's own extension point). :class:`GatedCriterion`, mixed into a
``SupervisedTemplate`` subclass (``CLStrategy`` has it), gives the strategy a
:class:`CriterionGate` service: while any plugin mutes it, ``criterion()`` is a zero that
keeps the autograd graph, so that a backward always works; otherwise it is the
template's criterion unchanged. Mutes are named, so that plugins do not undo each other
(Infusing's cosine head mutes it for the whole training, its generic batches one batch
at a time).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cl_proxyfda.errors import UserError


class CriterionGate:
    """Named mutes of the strategy's criterion."""

    def __init__(self) -> None:
        self._mutes: set[str] = set()

    def mute(self, reason: str, on: bool = True) -> None:
        """Mute (``on``) or unmute the criterion for ``reason``."""
        if on:
            self._mutes.add(reason)
        else:
            self._mutes.discard(reason)

    def muted_by(self, reason: str) -> bool:
        return reason in self._mutes

    @property
    def muted(self) -> bool:
        return bool(self._mutes)

    @staticmethod
    def zero(output: Tensor) -> Tensor:
        """``0 * sum(output)`` (non-finite entries left out): a zero loss with the graph."""
        finite = torch.where(torch.isfinite(output), output, torch.zeros_like(output))
        return finite.sum() * 0.0


class GatedCriterion:
    """Mixin for an Avalanche ``SupervisedTemplate`` subclass: ``criterion()`` obeys the
    strategy's ``criterion_gate`` (``class MyStrategy(GatedCriterion, SupervisedTemplate)``)."""

    @property
    def criterion_gate(self) -> CriterionGate:
        gate = self.__dict__.get("_criterion_gate")
        if gate is None:
            gate = self.__dict__["_criterion_gate"] = CriterionGate()
        return gate

    def criterion(self) -> Tensor:
        if self.criterion_gate.muted:
            return CriterionGate.zero(self.mb_output)  # type: ignore[attr-defined]
        return super().criterion()  # type: ignore[misc]


def criterion_gate(strategy: Any, who: str) -> CriterionGate:
    """The strategy's gate; ``who`` (a plugin name) is named in the error without one."""
    gate = getattr(strategy, "criterion_gate", None)
    if not isinstance(gate, CriterionGate):
        raise UserError(
            f"{who}: the strategy's criterion cannot be muted; use cl_proxyfda.training.CLStrategy "
            "or mix cl_proxyfda.criterion_gate.GatedCriterion into the strategy class"
        )
    return gate
