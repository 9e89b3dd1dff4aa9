"""The synthetic-loss channel: plugins with a loss on synthetic data publish it here and
a consumer of its gradient (AWC) claims it; neither owns the other.

The channel is a service of the strategy (:class:`SyntheticChannel`, the typed field
``CLStrategy.synthetic``; :func:`synthetic_channel` gives it on any Avalanche strategy).
A producer (GIFT) registers itself with :func:`register_synthetic_producer` in
``before_training`` and publishes its term with :func:`publish_synthetic_loss` in
``after_forward`` (so that every plugin's ``before_backward`` sees it whatever the plugin
order) and adds it to the total loss with :func:`add_synthetic_loss` in
``before_backward``. ``channel.total`` holds the sum of the terms published in the
current iteration. A consumer *claims* the sources whose gradient it will add itself
(:func:`claim_synthetic_gradients`, in ``before_training_iteration``): a claimed term
enters ``strategy.loss`` detached (its value still counts), so the consumer can take
``autograd.grad(term, params)`` once and add it to ``p.grad`` after the backward, and
the update still holds exactly the gradient of the total loss.
:func:`release_synthetic_terms` drops the iteration's graphs after the backward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from cl_proxyfda.services import service_of

ALL_SOURCES = "*"


# ------------------------------------------------------------------------ hook
@dataclass
class SyntheticTerm:
    """One published synthetic loss of the current iteration."""

    loss: Tensor | None
    stamp: Any
    claimed: bool = False
    added: bool = False
    detached: bool = False


def _stamp(strategy: Any) -> Any:
    """Identifies the current training iteration."""
    return (strategy.clock.train_iterations, id(strategy.mbatch))


@dataclass
class SyntheticChannel:
    """The strategy's synthetic-loss channel: this iteration's terms by source, the
    sources a consumer claimed, and the sum of the published terms (``total``)."""

    terms: dict[str, SyntheticTerm] = field(default_factory=dict)
    claims: set[str] = field(default_factory=set)
    total: Tensor | None = None
    producers: dict[str, float] = field(default_factory=dict)  # source -> weight multiplier it asks of consumers


def register_synthetic_producer(strategy: Any, source: str, consumer_weight_multiplier: float = 1.0) -> None:
    """Declare (in ``before_training``) that ``source`` publishes a synthetic loss in this
    run, and the factor by which its consumers scale their own weight (GIFT's
    ``paper_doubled_weights`` asks AWC to double too). Consumers check for producers from
    ``before_training_exp`` on, when every plugin's ``before_training`` has run."""
    synthetic_channel(strategy).producers[source] = float(consumer_weight_multiplier)


def synthetic_channel(strategy: Any) -> SyntheticChannel:
    """The strategy's channel (``CLStrategy.synthetic``; attached on first use to any other
    Avalanche strategy)."""
    return service_of(strategy, "synthetic", SyntheticChannel)


def claim_synthetic_gradients(strategy: Any, sources: set[str]) -> None:
    """Declare (for this iteration) that the gradient of these sources' terms is added by
    the caller after backward; ``{"*"}`` claims every source, an empty set none."""
    synthetic_channel(strategy).claims = set(sources)


def current_synthetic_terms(strategy: Any) -> dict[str, SyntheticTerm]:
    """The terms published in the current iteration, by source name."""
    stamp = _stamp(strategy)
    return {name: t for name, t in synthetic_channel(strategy).terms.items() if t.stamp == stamp and t.loss is not None}


def publish_synthetic_loss(strategy: Any, source: str, loss: Tensor) -> None:
    """Publish ``loss`` (a scalar with its graph) as ``source``'s synthetic term of this
    iteration; the channel's ``total`` becomes the sum of this iteration's terms."""
    channel = synthetic_channel(strategy)
    claimed = source in channel.claims or ALL_SOURCES in channel.claims
    channel.terms[source] = SyntheticTerm(loss, _stamp(strategy), claimed=claimed)
    current = list(current_synthetic_terms(strategy).values())
    total = current[0].loss
    for t in current[1:]:
        total = total + t.loss
    channel.total = total


def add_synthetic_loss(strategy: Any, source: str) -> Tensor | None:
    """Add ``source``'s published term to ``strategy.loss``: detached when a consumer
    claimed its gradient, with its graph otherwise. Returns the term (or None)."""
    term = current_synthetic_terms(strategy).get(source)
    if term is None or term.added:
        return None
    assert term.loss is not None
    term.added = True
    term.detached = term.claimed
    strategy.loss = strategy.loss + (term.loss.detach() if term.claimed else term.loss)
    return term.loss


def release_synthetic_terms(strategy: Any) -> None:
    """Drop the references to this iteration's graphs (after the backward)."""
    channel = synthetic_channel(strategy)
    for term in channel.terms.values():
        term.loss = None
    channel.total = None
