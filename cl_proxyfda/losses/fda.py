"""Feature distribution alignment (FDA) and Proxy-FDA losses (docs/methods.md section 1):
the reference-space graph, the pair weights, the proxies' geometry and the FDA loss.

All functions are pure functions of tensors. The proxy generator and its own loss are in
:mod:`cl_proxyfda.losses.proxy_generator`. Notation per mini-batch of ``B`` images: ``z`` student features, ``zh`` frozen reference
("pre-trained") features, both L2-normalised, ``S = z z^T``, ``Sh = zh zh^T``.

One step of Proxy-FDA, in code::

    sim_h = zh @ zh.T
    positives = graph_mask(knn_graph(sim_h, k), len(z))          # R_i as a (B, B) mask
    pooling = generator(z, sim_h, positives)                     # G sees detached inputs
    proxies = make_proxies(z, sim_h, pooling, neg_weight)        # pooling weights detached
    model_loss = fda_loss(z, zh, k, log_tau, bias, neg_weight, proxies, positives)
    gen_loss = generator_loss(z, pooling, positives)             # z detached inside

``model_loss`` gives gradients to ``z`` (and ``log_tau``, ``bias``) but none to the
generator; ``gen_loss`` gives gradients to the generator only.

Note on ``tau`` and ``b``: most pairs of a batch are non-neighbours, and at ``tau = 0.1,
b = 0`` their push dominates the loss; with the ``clamp0`` rule the loss then hardly
ranks a space that keeps the reference neighbourhoods below one that scrambles them. At
``b = -10`` (SigLIP's initialisation, the default of ``strategies/fda_head.py``) push and
pull balance on CLIP-like features and it does, by a wide margin (tests/test_fda_losses.py).

Graphs are (B, B) boolean masks ``positives[i, j] = j in R_i`` (never the diagonal): the
in-batch kNN graph has exactly K positives per row, and any other graph (rows with fewer
positives, or none) works with the same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

NEG_WEIGHTS = ("clamp0", "minus_one", "one_minus")
"""Rules for the weight of a non-neighbour pair (docs/methods.md section 1, step 4):

- ``clamp0`` (default): ``W = -max(Sh, 0)``: a non-neighbour is pushed away in
  proportion to how similar it was in the reference space; pairs that were already
  dissimilar (``Sh <= 0``) get weight 0 (a constant loss, no gradient).
- ``minus_one``: ``W = -1``, every non-neighbour is pushed away alike (plain SigLIP label).
- ``one_minus``: ``W = -(1 - Sh)``: the more dissimilar in the reference space, the
  harder it is pushed (``Sh`` is not clamped here, so ``W`` lies in ``[-2, 0]``).

Neighbours always get ``W = +max(Sh, 0)`` (a neighbour with a negative reference
similarity would otherwise be pushed apart).
"""


# ---------------------------------------------------------------------------- graph
def knn_graph(sim_h: Tensor, k: int) -> Tensor:
    """Indices ``(B, k)`` of the ``k`` largest entries of each row of ``sim_h``, self excluded.

    ``sim_h`` is the reference-space similarity matrix of a batch. ``k`` must be smaller
    than the batch size ``B``; it should also exceed the images-per-class ``n`` of the
    class-balanced sampler, so that every anchor has neighbours beyond its own class
    (docs/methods.md section 1, step 3; default K = 8 with n = 4).
    """
    if sim_h.ndim != 2 or sim_h.shape[0] != sim_h.shape[1]:
        raise ValueError(f"sim_h must be a square (B, B) matrix, got shape {tuple(sim_h.shape)}")
    b = sim_h.shape[0]
    if k < 1:
        raise ValueError(f"K must be at least 1, got {k}")
    if k >= b:
        raise ValueError(f"K = {k} neighbours need a batch of more than K images, got batch size {b} (K must be < batch size)")
    eye = torch.eye(b, dtype=torch.bool, device=sim_h.device)
    masked = sim_h.detach().masked_fill(eye, float("-inf"))
    return masked.topk(k, dim=1).indices


def graph_mask(neighbours: Tensor, batch_size: int) -> Tensor:
    """The (B, B) boolean mask of a neighbour index matrix ``(B, k)``."""
    mask = torch.zeros(batch_size, batch_size, dtype=torch.bool, device=neighbours.device)
    mask.scatter_(1, neighbours, True)
    return mask


def member_sets(positives: Tensor) -> Tensor:
    """(2, B, B) boolean: row 0 the positives of each anchor, row 1 its negatives (every
    other batch member); neither contains the anchor itself."""
    off_diag = ~torch.eye(positives.shape[0], dtype=torch.bool, device=positives.device)
    return torch.stack([positives & off_diag, ~positives & off_diag])


# --------------------------------------------------------------------------- weights
def negative_weight(sim_h: Tensor, rule: str = "clamp0") -> Tensor:
    """The (non-positive) target weight of non-neighbour pairs under ``rule`` (see NEG_WEIGHTS)."""
    if rule == "clamp0":
        return -sim_h.clamp(min=0)
    if rule == "minus_one":
        return -torch.ones_like(sim_h)
    if rule == "one_minus":
        return -(1.0 - sim_h)
    raise ValueError(f"neg_weight must be one of {NEG_WEIGHTS}, got {rule!r}")


def signed_weights(sim_h: Tensor, positives: Tensor, neg_weight: str = "clamp0") -> Tensor:
    """``W[i, j] = +max(Sh[i, j], 0)`` for neighbours, ``negative_weight(Sh, rule)`` otherwise.

    The diagonal is set to 0 (it is excluded from the loss anyway).
    """
    w = torch.where(positives, sim_h.clamp(min=0), negative_weight(sim_h, neg_weight))
    return w.masked_fill(torch.eye(sim_h.shape[0], dtype=torch.bool, device=sim_h.device), 0.0)


def pair_loss(sim: Tensor, weight: Tensor, log_tau: Tensor, bias: Tensor) -> Tensor:
    """Element-wise SigLIP-shaped loss ``softplus(-W * (S / tau + b))`` with ``tau = exp(log_tau)``.

    ``d loss / d S = -(W / tau) * sigmoid(-W (S / tau + b))``: negative for ``W > 0``
    (the pair is pulled together), positive for ``W < 0`` (pushed apart).
    """
    return F.softplus(-weight * (sim / log_tau.exp() + bias))


# --------------------------------------------------------------------------- proxies
@dataclass
class PoolingWeights:
    """Softmax pooling weights of the generator for every anchor, both sides stacked.

    ``weights``: (B, 2n, B); row i, proxy m < n is a distribution over the positives of
    anchor i, proxy n + m over its negatives (zero elsewhere). ``has``: (2, B) whether
    anchor i has any positive (row 0) / negative (row 1) at all. ``pos``/``neg`` are the
    two (B, n, B) halves.
    """

    weights: Tensor
    has: Tensor

    @property
    def n_proxies(self) -> int:
        return self.weights.shape[1] // 2

    @property
    def pos(self) -> Tensor:
        return self.weights[:, : self.n_proxies]

    @property
    def neg(self) -> Tensor:
        return self.weights[:, self.n_proxies :]

    @property
    def has_pos(self) -> Tensor:
        return self.has[0]

    @property
    def has_neg(self) -> Tensor:
        return self.has[1]

    def detach(self) -> "PoolingWeights":
        return PoolingWeights(self.weights.detach(), self.has)


@dataclass
class Proxies:
    """Proxies of every anchor, as the loss needs them, and their target weights.

    ``weights``: (B, 2n, B) detached pooling weights (row i: anchor i's n positive
    proxies, then its n negative ones); ``targets``: (B, 2n) their target weights;
    ``valid``: (B, 2n) whether anchor i has that proxy (a non-empty set); ``sim``:
    ``z z^T`` with its gradient; ``normalize``: proxies projected onto the unit sphere;
    ``cosines``: :func:`proxy_cosines` of the detached ``sim`` (computed once, read by
    both losses). The proxy vectors themselves are :func:`pool`; ``similarity`` is
    ``z_i . P`` with its gradient.
    """

    weights: Tensor
    targets: Tensor
    valid: Tensor
    sim: Tensor
    normalize: bool
    cosines: ProxyCosines

    @property
    def n_proxies(self) -> int:
        return self.weights.shape[1] // 2

    @property
    def similarity(self) -> Tensor:
        """(B, 2n) ``z_i . P`` for each of anchor i's proxies (differentiable in ``z``)."""
        return proxy_cosines(self.sim, self.weights, self.normalize).s


def pool(weights: Tensor, z: Tensor, normalize: bool = True) -> Tensor:
    """Proxy vectors ``A z`` (B, n, D): convex combinations of batch members, projected
    back onto the unit sphere when ``normalize`` (the features live there; an average of
    unit vectors lies inside the ball, nearer the middle of the set than any real point)."""
    proxies = weights @ z
    return F.normalize(proxies, dim=-1) if normalize else proxies


class ProxyCosines(NamedTuple):
    """What :func:`proxy_cosines` computed: ``s`` (B, n) anchor-to-proxy similarities,
    ``a_s = A S`` (B, n, B), ``q = ||A z||^2`` and ``norm = sqrt(max(q, 1e-12))`` (B, n)."""

    s: Tensor
    a_s: Tensor
    q: Tensor
    norm: Tensor


def proxy_cosines(sim: Tensor, weights: Tensor, normalize: bool = True) -> ProxyCosines:
    """``s[i, m] = z_i . P_im`` (B, n) from ``sim = z z^T`` alone, with the products it used.

    ``A_im z . z_i = (A S)[i, m, i]`` and ``||A_im z||^2 = sum_j (A S)[i, m, j] A[i, m, j]``:
    no (B, n, D) tensor is formed, whatever the feature size D. With ``normalize`` the
    proxies are ``A_im z / ||A_im z||`` (:func:`pool`).
    """
    a_s = weights @ sim  # (B, n, B)
    s = a_s.diagonal(dim1=0, dim2=2).t()  # (B, n): row i of A_i S, column i
    q = torch.linalg.vecdot(a_s, weights)  # (B, n)
    norm = q.clamp(min=1e-12).sqrt()
    return ProxyCosines(s / norm if normalize else s, a_s, q, norm)


def proxy_similarity(sim: Tensor, weights: Tensor, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """``(s, G)``: ``s[i, m] = z_i . P_im`` (B, n) and the Gram matrix of each anchor's
    proxies ``G[i] = P_i P_i^T`` (B, n, n), from ``sim = z z^T`` alone (see
    :func:`proxy_cosines`; the Gram matrix costs one more (n, B) x (B, n) product per anchor).
    """
    s, a_s, _, norm = proxy_cosines(sim, weights, normalize)
    gram = a_s @ weights.transpose(1, 2)  # (B, n, n)
    if normalize:
        gram = gram / (norm.unsqueeze(2) * norm.unsqueeze(1))
    return s, gram


def make_proxies(
    z: Tensor, sim_h: Tensor, pooling: PoolingWeights, neg_weight: str = "clamp0", normalize: bool = True, sim: Tensor | None = None
) -> Proxies:
    """Proxies ``P+ = A+ z``, ``P- = A- z`` (normalised, see :func:`pool`) with targets
    ``w+ = A+ Sh_i``, ``w- = A- W-_i``.

    The pooling weights are detached: gradients reach ``z`` (through the proxies) but
    never the generator. ``w-`` pools the non-neighbour weights of ``neg_weight``, so for
    the default ``clamp0`` it is ``-(A- max(Sh_i, 0))``, for ``minus_one`` it is -1.
    ``sim`` (``z z^T`` with its gradient, optional) saves recomputing it.
    """
    pooled = pooling.weights.detach()
    b, two_n, _ = pooled.shape
    side_targets = torch.stack([sim_h.clamp(min=0), negative_weight(sim_h, neg_weight)], dim=1)  # (B, 2, B)
    targets = torch.bmm(pooled.view(2 * b, two_n // 2, b), side_targets.view(2 * b, b, 1)).view(b, two_n)
    valid = pooling.has.t().repeat_interleave(two_n // 2, dim=1)  # (B, 2n)
    sim = (z @ z.t()) if sim is None else sim
    return Proxies(pooled, targets, valid, sim, normalize, proxy_cosines(sim.detach(), pooled, normalize))


# ------------------------------------------------------------------------------ loss
def fda_loss(
    z: Tensor,
    zh: Tensor,
    k: int,
    log_tau: Tensor,
    bias: Tensor,
    neg_weight: str = "clamp0",
    proxies: Proxies | None = None,
    positives: Tensor | None = None,
    ignore: Tensor | None = None,
    sim: Tensor | None = None,
    sim_h: Tensor | None = None,
) -> Tensor:
    """Mean over anchors of ``L_FDA_i = mean_j softplus(-W_ij (S_ij / tau + b))``.

    Args:
        z: (B, D) student features, L2-normalised, with gradient.
        zh: (B, D) reference features, L2-normalised (treated as constants).
        k: neighbours per anchor in the reference-space kNN graph (``k < B``).
        log_tau, bias: learnable scalars (``tau = exp(log_tau)``).
        neg_weight: rule for non-neighbour weights (``NEG_WEIGHTS``).
        proxies: optional Proxy-FDA proxies (``make_proxies``); they join anchor i's
            pairs with ``S_ip = z_i . P`` and their pooled target weights.
        positives: optional (B, B) boolean graph replacing the in-batch kNN graph.
        ignore: optional (B, B) boolean mask of pairs left out of the loss (neither
            pulled nor pushed), e.g. same-class batch members beyond the K neighbours.
        sim, sim_h: optional ``z z^T`` (with its gradient) and ``zh zh^T``, when the
            caller has them already.

    The mean for anchor i runs over its real pairs (B - 1, minus ignored ones) plus its
    valid proxies.
    """
    if z.shape != zh.shape:
        raise ValueError(f"student and reference features differ in shape: {tuple(z.shape)} vs {tuple(zh.shape)}")
    b = z.shape[0]
    zh = zh.detach()
    sim_h = (zh @ zh.t()) if sim_h is None else sim_h.detach()
    if positives is None:
        positives = graph_mask(knn_graph(sim_h, k), b)
    elif positives.shape != (b, b):
        raise ValueError(f"positives must be a ({b}, {b}) mask, got {tuple(positives.shape)}")
    off_diag = ~torch.eye(b, dtype=torch.bool, device=z.device)
    positives = positives & off_diag
    pairs = off_diag if ignore is None else off_diag & (~ignore | positives)
    weights = signed_weights(sim_h, positives, neg_weight)
    sim = (z @ z.t()) if sim is None else sim
    return _FDALossFn.apply(sim, log_tau, bias, weights, pairs, proxies, torch.is_grad_enabled())


class _FDALossFn(torch.autograd.Function):
    """:func:`fda_loss` of ``S = z z^T``, ``log tau`` and ``b`` as one autograd node
    (:func:`_fda_terms` gives the value and its gradients together; ``grad_enabled``: the
    caller's grad mode, as ``forward`` always runs without it)."""

    @staticmethod
    def forward(ctx: Any, sim: Tensor, log_tau: Tensor, bias: Tensor, weights: Tensor, pairs: Tensor, proxies: Proxies | None,
                grad_enabled: bool) -> Tensor:
        needs = tuple(grad_enabled and wanted for wanted in ctx.needs_input_grad[:3])
        loss, grads = _fda_terms(sim, log_tau, bias, weights, pairs, proxies, needs)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grads = tuple(None if g is None else g * grad for g in ctx.saved_tensors)
        return (*grads, None, None, None, None)


def _fda_terms(
    sim: Tensor, log_tau: Tensor, bias: Tensor, weights: Tensor, pairs: Tensor, proxies: Proxies | None, needs: tuple[bool, ...]
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """(loss, (d/d S, d/d log tau, d/d b)) of :func:`fda_loss`; a gradient is None where
    ``needs`` says it is not wanted.

    With ``x = S / tau + b`` and ``l = softplus(-W x)``: ``dl/dx = -W sigmoid(-W x)``,
    ``dx/dS = 1/tau``, ``dx/d log tau = -S/tau``, ``dx/db = 1``. A proxy's similarity
    ``s = A_r S_i / ||A_r z||`` (:func:`proxy_cosines`) sends ``g / norm`` to ``S`` through
    ``s_raw[i, r] = (A_r S)_i``, i.e. ``dS[:, i] += sum_r g_r A_r / norm_r``, and ``-g s /
    norm`` through ``norm = sqrt(A_r S A_r^T)``, i.e. ``dS += sum_r c_r A_r^T A_r``.
    """
    b = sim.shape[0]
    inv_tau = log_tau.detach().neg().exp()
    shift = bias.detach()
    sim = sim.detach()
    pairs = pairs.to(sim.dtype)
    count = pairs.sum(1)
    signed_x = (sim * inv_tau + shift).mul_(weights).neg_()  # -W x
    total = (F.softplus(signed_x) * pairs).sum(1)
    if proxies is not None:
        valid = proxies.valid.to(sim.dtype)
        proxy_sim, _, q, norm = proxies.cosines
        proxy_x = (proxy_sim * inv_tau + shift).mul_(proxies.targets).neg_()
        total = total + (F.softplus(proxy_x) * valid).sum(1)
        count = count + valid.sum(1)
    per_anchor = count.reciprocal() / b
    loss = torch.dot(total, per_anchor)
    if not any(needs):
        return loss, (None, None, None)
    # d loss / dx for every term: -W sigmoid(-W x), weighted by its anchor's 1 / (B count)
    g_x = torch.sigmoid(signed_x).mul_(weights).mul_(pairs * -per_anchor.unsqueeze(1))
    g_proxy = None
    if proxies is not None:
        g_proxy = torch.sigmoid(proxy_x).mul_(proxies.targets).mul_(valid * -per_anchor.unsqueeze(1))
    terms = [(g_x, sim)] if g_proxy is None else [(g_x, sim), (g_proxy, proxy_sim)]  # (d loss / dx, S) per kind of pair
    g_bias = sum(g.sum() for g, _ in terms) if needs[2] else None  # dx/db = 1
    g_log_tau = -inv_tau * sum(torch.linalg.vecdot(g.flatten(), x.flatten()) for g, x in terms) if needs[1] else None  # dx/d log tau = -S/tau
    g_sim = None
    if needs[0]:
        g_sim = g_x * inv_tau
        if proxies is not None:
            g_s = g_proxy * inv_tau  # (B, 2n)
            g_raw = g_s / norm if proxies.normalize else g_s
            g_sim = g_sim + torch.bmm(g_raw.unsqueeze(1), proxies.weights).squeeze(1).t()  # through s_raw
            if proxies.normalize:  # through the norm
                g_q = (-0.5 * g_s * proxy_sim / norm.square()).mul_(q >= 1e-12)
                flat = proxies.weights.reshape(-1, b)
                g_sim = torch.addmm(g_sim, (flat * g_q.reshape(-1, 1)).t(), flat)
    return loss, (g_sim, g_log_tau, g_bias)
