"""AWC: adaptive weight consolidation (docs/methods.md section 3).

``L_AWC = lambda * sum_n sum(F_n * (theta_n - theta_prev_n)^2)`` with ``theta_prev`` the
trainable parameters at the start of the experience and ``F_n = g_n^2 / (mean(g_n^2) +
eps)``, where ``g`` is the gradient of the synthetic-data losses at the current
parameters, re-estimated at every iteration (``adaptive``) or averaged over the first
``static_iterations`` iterations and then frozen (``static``, EWC-like).

**The synthetic losses** come through the strategy's channel, :mod:`cl_proxyfda.synthetic_terms` (GIFT
publishes, AWC consumes; neither owns it). AWC *claims* the terms it uses
(``claim_synthetic_gradients``, in ``before_training_iteration``); a claimed term is
added to ``strategy.loss`` detached (its value still counts), AWC computes
``g = autograd.grad(term, params)`` once for the importance and adds ``g`` into
``p.grad`` after the backward. So the update contains exactly ``grad(total loss)``
while the synthetic graph is traversed once, not twice. The penalty itself enters
``strategy.loss`` as a value only; its analytic gradient ``2 * lambda * F * (theta -
theta_prev)`` is added to ``p.grad`` in ``after_backward`` too (multi-tensor ops, no
per-tensor autograd graph).

**[choice]** ``g`` is the gradient of the synthetic term *as it enters the loss*
(``kd_weight * L_KD + ita_weight * L_ITA`` for GIFT, as in GIFT's official code); this
is what makes the gradient reusable. The importance of a tensor is scale-free, so only
the ratio of the two weights matters.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from cl_proxyfda.errors import UserError
from cl_proxyfda.losses.awc import AWC_EPS, TINY_IMPORTANCE, ImportanceTracker, awc_penalty_and_grad, importance_from_grads, snapshot
from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.anchors import trainable_named_parameters
from cl_proxyfda.strategies.base import CLPlugin
from cl_proxyfda.synthetic_terms import (
    ALL_SOURCES,
    SyntheticTerm,
    claim_synthetic_gradients,
    current_synthetic_terms,
    release_synthetic_terms,
    synthetic_channel,
)

# ---------------------------------------------------------------------- plugin
class AWCParams(BaseModel):
    """Options of the ``awc`` strategy (docs/methods.md section 3)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    weight: float = Field(1.0, ge=0, description="lambda in lambda * sum F (theta - theta_prev)^2")
    eps: float = Field(AWC_EPS, gt=0, description="added to mean(g^2) in F = g^2 / (mean(g^2) + eps)")
    tiny: float = Field(TINY_IMPORTANCE, ge=0, description="importance of tensors without gradient and of logit_scale")
    mode: Literal["adaptive", "static"] = Field("adaptive", description="adaptive: F from every iteration; static: mean of the first k, then frozen")
    static_iterations: int = Field(100, ge=1, le=10_000_000, description="k of the static mode")
    loss_source: Literal["gift", "strategy"] = Field(
        "gift",
        description="gift: the synthetic loss the gift strategy publishes; strategy: every term published on "
        "the strategy's synthetic-loss channel in the iteration",
    )
    reuse_gradient: bool = Field(True, description="reuse grad(synthetic loss) in the update (no second backward over it)")
    follow_gift_doubling: bool = Field(True, description="multiply weight by 2 when gift has paper_doubled_weights: true")


@STRATEGIES.register("awc", help="AWC: importance-weighted L2 to start-of-experience weights, importance from synthetic losses")
class AWCPlugin(CLPlugin):
    """Adds ``weight * sum F (theta - theta_prev)^2`` with F from the synthetic losses' gradient."""

    Params = AWCParams
    name = "awc"
    params: AWCParams
    _penalty_grads: list[tuple[Tensor, Tensor]] = []  # (parameter, penalty gradient) of this iteration, replaced, never mutated

    def __init__(self, params: AWCParams | None = None, /, *, run: Any = None, **kwargs: Any) -> None:
        super().__init__(params, run=run, **kwargs)
        self.tracker = ImportanceTracker(self.params.mode, self.params.static_iterations)
        self.anchor: dict[str, Tensor] | None = None
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._claimed_terms: list[SyntheticTerm] = []
        self._named: list[tuple[str, Tensor]] | None = None  # the trainable parameters of this experience
        self.gradient_calls = 0  # autograd.grad calls over the synthetic loss (tests, bench)

    @property
    def sources(self) -> set[str]:
        return {"gift"} if self.params.loss_source == "gift" else {ALL_SOURCES}

    def effective_weight(self, strategy: Any) -> float:
        mult = synthetic_channel(strategy).producers.get("gift", 1.0) if self.params.follow_gift_doubling else 1.0
        return self.params.weight * mult

    # -------------------------------------------------------------- callbacks
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        # every plugin's before_training has run: producers have registered on the channel
        if self.params.loss_source == "gift" and "gift" not in synthetic_channel(strategy).producers:
            raise UserError("strategies: awc with loss_source: gift needs the gift strategy in the same run")
        self._named = trainable_named_parameters(strategy)  # fixed within an experience (0.2 ms a lookup)
        self.anchor = snapshot(self._named)
        self.tracker.reset()

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        reuse = self.params.reuse_gradient and self.tracker.needs_gradients
        claim_synthetic_gradients(strategy, self.sources if reuse else set())
        self._pending = []
        self._penalty_grads = []

    def _synthetic_loss(self, strategy: Any) -> tuple[Tensor, list[SyntheticTerm]]:
        terms = current_synthetic_terms(strategy)
        if self.params.loss_source == "gift":
            terms = {k: v for k, v in terms.items() if k == "gift"}
        if not terms:
            where = "the gift strategy" if self.params.loss_source == "gift" else "any strategy"
            raise UserError(f"awc: no synthetic loss was published by {where} in this iteration (loss_source: {self.params.loss_source})")
        chosen = list(terms.values())
        total = chosen[0].loss
        for t in chosen[1:]:
            total = total + t.loss
        assert total is not None
        return total, chosen

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        named = self._named if self._named is not None else trainable_named_parameters(strategy)
        if self.anchor is None:
            self.anchor = snapshot(named)
        if self.tracker.needs_gradients:
            loss, terms = self._synthetic_loss(strategy)
            params = [p for _, p in named]
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            self.gradient_calls += 1
            grads = _all_reduce_mean(grads)
            by_name = {n: g for (n, _), g in zip(named, grads)}
            self.tracker.update(importance_from_grads(by_name, dict(named), self.params.eps, self.params.tiny))
            claimed = [t.claimed for t in terms]
            if all(claimed):
                # Claimed terms enter strategy.loss detached (their publisher adds them in
                # this callback round, before or after us): their gradient comes from here.
                self._pending = [(p, g) for p, g in zip(params, grads) if g is not None]
                self._claimed_terms = terms
            elif any(claimed):
                raise RuntimeError("awc: some synthetic terms were claimed and others not in one iteration")
        assert self.tracker.importance is not None
        weight = self.effective_weight(strategy)
        if weight == 0:
            return
        # The penalty enters the loss as a value only; its analytic gradient is added to
        # p.grad in after_backward (no per-tensor graph). Like the reused synthetic
        # gradient it is identical on every data-parallel rank (theta, anchor, F are).
        penalty, grads = awc_penalty_and_grad(named, self.anchor, self.tracker.importance, weight=weight)
        self.loss_terms["awc"] = float(penalty)
        self._penalty_grads = [(p, g) for (_, p), g in zip(named, grads)]
        strategy.loss = strategy.loss + penalty

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self._pending:
            if not all(t.added and t.detached for t in self._claimed_terms):
                raise RuntimeError("awc: a claimed synthetic term was not added detached; its gradient would be counted twice")
            _accumulate_grads(self._pending)
        if self._penalty_grads:
            _accumulate_grads(self._penalty_grads)
        self._pending = []
        self._penalty_grads = []
        self._claimed_terms = []
        release_synthetic_terms(strategy)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor, "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        anchor = state.get("anchor")
        self.anchor = None if anchor is None else {n: t.detach().clone() for n, t in anchor.items()}
        if state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"])


def _accumulate_grads(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """``p.grad += g`` for every pair (one multi-tensor add; ``p.grad = g`` where it is None)."""
    grads, adds = [], []
    for p, g in pairs:
        if p.grad is None:
            p.grad = g.detach().to(p.dtype).clone()
        else:
            grads.append(p.grad)
            adds.append(g.detach() if g.dtype == p.grad.dtype else g.detach().to(p.grad.dtype))
    if grads:
        torch._foreach_add_(grads, adds)


def _all_reduce_mean(grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """Average the gradients over data-parallel ranks (autograd.grad bypasses DDP's hooks)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return grads
    world = torch.distributed.get_world_size()
    out = []
    for g in grads:
        if g is not None:
            g = g.clone()
            torch.distributed.all_reduce(g)
            g /= world
        out.append(g)
    return tuple(out)

