"""Feature distribution alignment (FDA) and Proxy-FDA losses (docs/methods.md section 1).

All functions are pure functions of tensors, except ``ProxyGenerator`` (an ``nn.Module``).
Notation per mini-batch of ``B`` images: ``z`` student features, ``zh`` frozen reference
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

Note on ``tau`` and ``b``: most pairs of a batch are non-neighbours, and at the initial
``tau = 0.1, b = 0`` their push dominates the loss; with the default ``clamp0`` rule the
loss then does not yet rank a space that keeps the reference neighbourhoods below one
that scrambles them. Once ``tau`` and ``b`` are fitted (``b`` goes strongly negative,
as in SigLIP, whose own initialisation is ``b = -10``), it does, by a wide margin
(tests/test_fda_losses.py). The ``minus_one`` and ``one_minus`` rules rank them already
at initialisation.

Graphs are (B, B) boolean masks ``positives[i, j] = j in R_i`` (never the diagonal): the
in-batch kNN graph has exactly K positives per row, and any other graph (rows with fewer
positives, or none) works with the same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class _PairPooling(torch.autograd.Function):
    """The generator's per-pair part, as one autograd node: pooling weights (B, 2n, B) of
    ``softmax over each side's set of head(relu(member_j + relation_ij pair^T))``.

    Inputs: ``member`` (B, h) each member's token after ``Linear(h, h)``, ``relation``
    (B, B, 3) constant pair features, ``pair`` (h, 3) their projection, ``head_weight``
    (2n, h), ``head_bias`` (2n,), ``mask`` (B, 2, 1, B) bool, each side's set for its n
    proxies. The same values and gradients as the composition of ``baddbmm``,
    ``F.linear(F.relu(.))`` and a masked softmax (tests/test_fda_losses.py checks them
    with ``gradcheck``); written out because that composition was about a dozen autograd
    nodes on (B, B, h)-sized tensors, and so that each product runs in the layout CPU BLAS
    is fast at (with (4096, 16) x (16, 8) shapes, ``F.linear`` and autograd's backward on
    the permuted gradient were each about 3x slower, one CPU thread).

    The softmax is restricted to the mask by a finite, hugely negative bias on the other
    entries (their exponential is exactly 0, as with -inf): an anchor with an empty set
    gets a finite uniform softmax that the final ``where`` zeroes, with a zero gradient
    instead of NaN.
    """

    @staticmethod
    def forward(ctx: Any, member: Tensor, relation: Tensor, pair: Tensor, head_weight: Tensor, head_bias: Tensor, mask: Tensor) -> Tensor:
        b, h = member.shape
        two_n = head_weight.shape[0]
        # in place wherever autograd does not need the input: the (B^2, h) tensors are a
        # quarter of a megabyte each at B = 64, and their memory traffic is the cost
        hidden = torch.baddbmm(member.unsqueeze(0), relation, pair.t().unsqueeze(0).expand(b, -1, -1)).view(b * b, h).clamp_(min=0)
        logits = torch.addmm(head_bias.unsqueeze(1), head_weight, hidden.t())  # (2n, B^2): row r, pair (i, j)
        logits = logits.view(two_n, b, b).transpose(0, 1).reshape(b, 2, two_n // 2, b)  # (B, 2, n, B), contiguous
        logits += (~mask).to(logits.dtype).mul_(torch.finfo(logits.dtype).min / 2)  # no scalar tensor: no host copy on CUDA
        weights = torch.softmax(logits, dim=-1).mul_(mask).view(b, two_n, b)  # zero for an empty set
        ctx.save_for_backward(hidden, relation, head_weight, weights)
        return weights

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        hidden, relation, head_weight, weights = ctx.saved_tensors
        b = weights.shape[0]
        two_n, h = head_weight.shape
        # softmax backward W * (g - sum(W g)), zero off the mask (where the weights are exactly 0)
        grad_logits = weights * grad
        grad_logits.addcmul_(weights, grad_logits.sum(-1, keepdim=True), value=-1)  # (B, 2n, B)
        grad_logits = grad_logits.permute(1, 0, 2).reshape(two_n, b * b)  # (2n, B^2), contiguous
        # ReLU's own backward kernel, in place (a bool-mask masked_fill_ here took ~370 us at B^2 = 4096)
        grad_pre = grad_logits.t() @ head_weight  # (B^2, h)
        torch.ops.aten.threshold_backward.grad_input(grad_pre, hidden, 0, grad_input=grad_pre)
        grad_member = grad_pre.view(b, b, h).sum(0) if ctx.needs_input_grad[0] else None
        grad_pair = grad_pre.t() @ relation.view(b * b, -1) if ctx.needs_input_grad[2] else None
        grad_head_weight = grad_logits @ hidden if ctx.needs_input_grad[3] else None
        grad_head_bias = grad_logits.sum(1) if ctx.needs_input_grad[4] else None
        return grad_member, None, grad_pair, grad_head_weight, grad_head_bias, None


class ProxyGenerator(nn.Module):
    """The Proxy-FDA generator G: pooling weights over each anchor's positive/negative sets.

    Architecture (dim D, hidden width ``hidden`` = 16, ``n_proxies`` = 4), O(B^2) work:

    1. Each batch member j becomes one token ``c_j = Linear(D, h)(z_j)``; one pre-norm
       single-head self-attention over the B members (residual), shared by all anchors,
       gives every member the context of the whole batch.
    2. Seen from anchor i, member j gets the hidden vector
       ``u_ij = ReLU(Linear(h, h)(c_j) + Linear(3, h)([S_ij, Sh_ij, 1[j in R_i]]))``:
       what j is, and how it relates to i in both spaces (the indicator is the learned
       "positive of i" / "negative of i" embedding).
    3. A linear head ``Linear(h, 2n)`` on every ``u_ij`` gives n pooling logits for the
       positive set and n for the negative set (a per-pair map, so the result does not
       depend on the order of the batch).
    4. Softmax of the logits over the positives of i gives ``A_i+`` (n, B), over the
       negatives ``A_i-``.

    For D = 512 this has 9,784 parameters at width 16 (22,120 at width 32, the default
    until the step's cost was measured: the paper's generator has about 24K); the token
    projection ``Linear(D, h)`` holds most of them. The first version ran a 4-head
    attention per anchor over its B - 1 pair tokens and 1x1 convolutions on them (B^3
    work: ~37 ms a step at B = 64 on one CPU thread); here only (B, B, h) element-wise
    work and one (B^2, h) x (h, 2n) product depend on the pairs, so the width sets the
    cost (width 16: about 0.45 ms less per step than 32 at B = 64, one CPU thread).

    The generator always reads detached features: it never sends gradients to the model.
    """

    def __init__(self, dim: int, n_proxies: int = 4, hidden: int = 16) -> None:
        super().__init__()
        if n_proxies < 1:
            raise ValueError(f"n_proxies must be at least 1, got {n_proxies}")
        self.dim = dim
        self.n_proxies = n_proxies
        self.embed = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, 1, batch_first=True)
        self.member = nn.Linear(hidden, hidden)
        self.pair = nn.Linear(3, hidden, bias=False)
        self.head = nn.Linear(hidden, 2 * n_proxies)

    def forward(self, z: Tensor, sim_h: Tensor, positives: Tensor, sim: Tensor | None = None) -> PoolingWeights:
        """Pooling weights of every anchor; ``sim`` (``z z^T``, optional) saves recomputing it."""
        z = z.detach()
        sim_h = sim_h.detach()
        sim = (z @ z.t()) if sim is None else sim.detach()
        b = z.shape[0]
        sets = member_sets(positives)  # (2, B, B)
        tokens = self.embed(z)  # (B, h): one sequence, shared by every anchor
        tokens = tokens + self._attend(self.norm(tokens))
        relation = torch.stack([sim, sim_h, positives.to(z.dtype)], dim=-1)  # (B, B, 3)
        mask = sets.transpose(0, 1).contiguous().unsqueeze(2)  # (B, 2, 1, B): each side's set, for its n proxies
        weights = _PairPooling.apply(self.member(tokens), relation, self.pair.weight, self.head.weight, self.head.bias, mask)
        return PoolingWeights(weights, sets.any(dim=2))

    def _attend(self, x: Tensor) -> Tensor:
        """Single-head self-attention of the (B, h) tokens on ``self.attn``'s parameters:
        what ``nn.MultiheadAttention`` computes with one head (no dropout, no mask), in
        five operations (its per-call reshaping and ``scaled_dot_product_attention``'s
        general path were over half a millisecond of the step at B = 64, one CPU thread)."""
        q, k, v = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        scores = torch.softmax((q @ k.t()).mul_(q.shape[-1] ** -0.5), dim=-1)
        return self.attn.out_proj(scores @ v)


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


def pooling_entropy(weights: Tensor) -> Tensor:
    """Entropy (nats) of each pooling distribution, (B, n); ``exp`` of it is the effective
    number of batch members a proxy pools."""
    return -(weights * weights.clamp(min=1e-12).log()).sum(-1)


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
    weights = torch.where(positives, sim_h.clamp(min=0), negative_weight(sim_h, neg_weight))  # signed_weights; the diagonal is masked below
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
    g_bias = (g_x.sum() + (0 if g_proxy is None else g_proxy.sum())) if needs[2] else None
    g_log_tau = None
    if needs[1]:
        g_log_tau = -inv_tau * (torch.linalg.vecdot(g_x.flatten(), sim.flatten()) + (0 if g_proxy is None else torch.linalg.vecdot(g_proxy.flatten(), proxy_sim.flatten())))
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


def _set_mean(sim: Tensor, mask: Tensor) -> Tensor:
    """Mean of each row of ``sim`` over ``mask`` (0 for empty rows), (B,)."""
    m = mask.float()
    return (sim * m).sum(1) / m.sum(1).clamp(min=1)


@dataclass(frozen=True)
class GeneratorObjective:
    """The weights of the generator loss's terms (see :func:`generator_loss`)."""

    temperature: float = 0.1
    alpha: float = 1.0
    diversity_target: float = 0.5
    hardness: float = 10.0
    min_members: float = 2.0
    entropy_weight: float = 1.0
    normalize: bool = True


def generator_loss(
    z: Tensor,
    pooling: PoolingWeights,
    positives: Tensor,
    temperature: float = 0.1,
    alpha: float = 1.0,
    diversity_target: float = 0.5,
    hardness: float = 10.0,
    min_members: float = 2.0,
    entropy_weight: float = 1.0,
    normalize: bool = True,
    sim: Tensor | None = None,
    cosines: ProxyCosines | None = None,
) -> Tensor:
    """The generator's own loss: validity + ``hardness`` * hard proxies + ``entropy_weight``
    * entropy floor + ``alpha`` * diversity.

    Computed on detached features, so only the generator (through ``pooling``) gets
    gradients. Proxies are pooled as the FDA loss sees them (:func:`pool`). With
    ``s(a, x) = z_a . x`` and anchor i:

    - validity (InfoNCE form, over ``temperature``): a positive proxy ``P+`` should be
      closer to ``z_i`` than any real negative, a negative proxy ``P-`` farther from it
      than any real positive;
    - hardness (the paper's hard proxies): ``relu(s(i, P+) - mean_{j in R_i} s(i, j))``,
      a positive proxy no easier (no closer) than the average positive, and
      ``relu(mean_{j not in R_i} s(i, j) - s(i, P-))``, a negative proxy no easier
      (no farther) than the average negative. Validity alone rewards the easiest proxy,
      which is a copy of the nearest positive / the farthest negative: the pooling
      collapsed onto single members (1.1 of 8 positives used). The hinges are in cosine
      units while validity is over ``temperature`` (0.1), hence the weight 10;
      normalised positive proxies pooled from two or more members stay somewhat easier
      than the average positive (measured +0.06 cosine vs +0.13 without the hinge);
    - entropy floor: ``relu(log(min(min_members, |set|)) - H(A_i))`` per proxy, so that
      each proxy pools at least ``min_members`` members in the ``exp(entropy)`` sense;
    - diversity (variance hinge, VICReg-like, on each proxy set):
      ``relu(diversity_target * std(real set) - std(proxy set))`` where
      ``std(X) = sqrt(mean_m ||x_m - mean(X)||^2 + 1e-8)``; the real set is anchor i's
      positives (resp. negatives). It keeps the n proxies of a set from collapsing onto
      one point.

    Each term is averaged over the anchors that have the sets it needs (per side:
    positive proxies over anchors with positives, negative proxies over anchors with
    negatives). ``sim`` (``z z^T``, optional) and ``cosines`` (:func:`proxy_cosines` of
    these pooling weights on the detached ``sim``, as :func:`make_proxies` keeps them in
    ``Proxies.cosines``; optional) save recomputing them.

    The loss is small-tensor work whose cost is the number of operations, so it is one
    autograd node (:class:`_GeneratorObjectiveFn`): both sides are computed together on
    stacked tensors, and the gradient with respect to the pooling weights is written out
    by hand and computed with the value. Value and generator gradients equal the
    term-by-term form (tests/test_fda_losses.py).
    """
    z = z.detach()
    sim = (z @ z.t()) if sim is None else sim.detach()
    objective = GeneratorObjective(temperature, alpha, diversity_target, hardness, min_members, entropy_weight, normalize)
    return _GeneratorObjectiveFn.apply(pooling.weights, sim, member_sets(positives), pooling.has, objective, cosines, torch.is_grad_enabled())


class _GeneratorObjectiveFn(torch.autograd.Function):
    """:func:`generator_loss` of the (B, 2n, B) pooling weights as one autograd node (the
    gradient is computed with the value; ``grad_enabled``: the caller's grad mode)."""

    @staticmethod
    def forward(ctx: Any, weights: Tensor, sim: Tensor, sets: Tensor, has: Tensor, objective: GeneratorObjective, cosines: ProxyCosines | None,
                grad_enabled: bool) -> Tensor:
        total, grad = _generator_objective(weights, sim, sets, has, objective, grad_enabled and ctx.needs_input_grad[0], cosines)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, None, None, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_total if grad is not None else None), None, None, None, None, None, None


def _generator_objective(
    weights: Tensor, sim: Tensor, sets: Tensor, has: Tensor, o: GeneratorObjective, with_grad: bool, cosines: ProxyCosines | None = None
) -> tuple[Tensor, Tensor | None]:
    """(value, d value / d weights or None) of the generator loss; ``sim`` must be
    symmetric (it is ``z z^T``). Forward and backward side by side, term by term:

    with ``A = W S`` (B, 2n, B), a proxy's raw similarity ``s_raw[i, r] = A[i, r, i]``,
    its squared norm ``q = sum_j A W``, ``norm = sqrt(max(q, 1e-12))`` and ``s = s_raw /
    norm`` (normalised proxies): ``d s_raw / d W[i, r] = S[i]``, ``d q / d W[i, r] = 2
    A[i, r]``. Each term's gradient is gathered on ``s``, ``norm`` and ``W`` directly,
    then pushed through those two products once.
    """
    b = weights.shape[0]
    n = weights.shape[1] // 2
    sets = sets.to(sim.dtype)  # (2, B, B): each side's real set
    count = sets.sum(2)  # (2, B)
    sign = torch.ones(2, 1, dtype=sim.dtype, device=sim.device)  # built on the device: no host copy per step
    sign[1] = -1.0
    # per side, +s(i, x) for the positive side and -s(i, x) for the negative side: larger = easier
    signed_mean = (sim.unsqueeze(0) * sets).sum(2) / count.clamp(min=1) * sign  # (2, B)
    # validity competitors: a positive proxy against the real negatives, a (negated)
    # negative proxy against the (negated) positives
    others = (sim.unsqueeze(0) * (sign.unsqueeze(2) / o.temperature)).masked_fill(sets.flip(0) == 0, float("-inf"))
    rest = torch.logsumexp(others, dim=2).t().unsqueeze(2)  # (B, 2, 1)
    has = has.to(sim.dtype)  # (2, B)
    per_has = has / has.sum(1, keepdim=True).clamp(min=1)  # (2, B): mean over the anchors with that side's set
    both = has[0] * has[1]
    per_both = both / both.sum().clamp(min=1)
    # per proxy: the mean over the n proxies of a side, then over the anchors
    per_proxy_has = (per_has / n).t().unsqueeze(2)  # (B, 2, 1)
    per_proxy_both = (per_both / n).view(b, 1, 1)
    sign = sign.view(1, 2, 1)

    s, a_s, q, norm = proxy_cosines(sim, weights.detach(), o.normalize) if cosines is None else cosines
    signed = s.view(b, 2, n) * sign
    own = signed / o.temperature
    validity = torch.logaddexp(own, rest) - own  # (B, 2, n), InfoNCE form
    total = (validity * per_proxy_both).sum()
    g_signed = torch.sigmoid(rest - own).mul_(-per_proxy_both / o.temperature)  # d total / d signed
    g_weights = None  # d total / d W from the entropy floor
    g_norm = None  # d total / d norm from the diversity term
    g_u = None  # d total / d u from the diversity term
    if o.hardness > 0:
        gap = signed - (signed_mean.t().unsqueeze(2))
        total = total + (F.relu(gap) * (per_proxy_has * o.hardness)).sum()
        g_signed = g_signed + (gap > 0).to(sim.dtype) * (per_proxy_has * o.hardness)
    if o.entropy_weight > 0:
        log_w = weights.clamp(min=1e-12).log_()
        floor = count.clamp(min=1, max=o.min_members).log().t().unsqueeze(2)  # (B, 2, 1)
        below = torch.linalg.vecdot(weights, log_w).view(b, 2, n) + floor  # floor - entropy
        total = total + (F.relu(below) * (per_proxy_has * o.entropy_weight)).sum()
        if with_grad:  # d (W log W) / dW = log W + 1 (log_w reused in place)
            g_below = (below > 0).to(sim.dtype) * (per_proxy_has * o.entropy_weight)
            g_weights = log_w.add_(1).mul_(g_below.view(b, 2 * n, 1))
    if n > 1 and o.alpha > 0:
        # spread^2 of a side's proxies = mean_m ||P_m||^2 - ||mean_m P_m||^2, with
        # ||sum_m P_m||^2 = u S u^T for u = sum_m A_m / ||A_m z|| (or sum_m A_m unnormalised)
        w = sets / count.clamp(min=1).unsqueeze(2)
        real_spread = (w @ sim.diagonal() - ((w @ sim) * w).sum(-1)).clamp(min=0).add(1e-8).sqrt()  # (2, B)
        inv_norm = norm.reciprocal().view(b, 2, n, 1)
        u = (weights.view(b, 2, n, b) * inv_norm if o.normalize else weights.view(b, 2, n, b)).sum(2)  # (B, 2, B)
        u_s = u @ sim
        inner = (1.0 if o.normalize else norm.square().view(b, 2, n).mean(2)) - (u_s * u).sum(-1) / (n * n)
        spread = inner.clamp(min=0).add(1e-8).sqrt()  # (B, 2)
        short = o.diversity_target * real_spread.t() - spread
        total = total + o.alpha * (F.relu(short) * per_has.t()).sum()
        if with_grad:
            # d total / d inner, then through mean_sq = u S u^T / n^2 to u, and u to W and norm
            g_inner = ((short > 0) & (inner >= 0)).to(sim.dtype) * per_has.t() * (-o.alpha) / (2 * spread)
            g_u = (u_s * (g_inner * (-2.0 / (n * n))).unsqueeze(2)).unsqueeze(2)  # (B, 2, 1, B)
            if o.normalize:  # u = sum_m W_m / norm_m: d/d norm_m = -(W_m . g_u) / norm_m^2 (a product: no (B, 2, n, B) temporary)
                g_norm = -(torch.bmm(weights.view(2 * b, n, b), g_u.view(2 * b, b, 1)).view(b, 2, n) * inv_norm.squeeze(3).square()).reshape(b, 2 * n)
            else:  # u = sum_m W_m; the mean square norm reads norm_m^2
                g_norm = (g_inner.unsqueeze(2) * (2.0 / n) * norm.view(b, 2, n)).reshape(b, 2 * n)
    if not with_grad:
        return total, None
    g_s = (g_signed * sign).reshape(b, 2 * n)
    if o.normalize:
        g_raw = g_s / norm
        g_norm = -g_raw * s if g_norm is None else g_norm - g_raw * s
    else:
        g_raw = g_s
    # (B, 2n, B) terms accumulated in place, in one buffer: their memory traffic is most of the cost
    if g_weights is None:
        grad = g_raw.unsqueeze(2) * sim.unsqueeze(1)  # d s_raw / d W[i, r] = S[i]
    else:
        grad = g_weights.addcmul_(g_raw.unsqueeze(2), sim.unsqueeze(1))
    if g_norm is not None:  # d norm / d W[i, r] = A[i, r] / norm (where q >= 1e-12)
        grad.addcmul_((g_norm / norm).mul_(q >= 1e-12).unsqueeze(2), a_s)
    if g_u is not None:  # the diversity term through u
        grad.view(b, 2, n, b).addcmul_(g_u, inv_norm) if o.normalize else grad.view(b, 2, n, b).add_(g_u)
    return total, grad


@torch.no_grad()
def proxy_diagnostics(z: Tensor, pooling: PoolingWeights, positives: Tensor, normalize: bool = True) -> dict[str, float]:
    """What the proxies are, for logging: effective pooled members, distance off the hull,
    hardness.

    - ``members_pos`` / ``members_neg``: mean ``exp(entropy)`` of the pooling weights
      (1 = a copy of one batch member);
    - ``hull_distance``: mean ``||P - A z|| = 1 - ||A z||``, how far the normalised proxy
      lies from the convex-hull point it was pooled as (0 without normalisation);
    - ``hardness_pos``: mean ``s(i, P+) - mean_{R_i} s(i, j)`` (< 0: harder than the
      average positive); ``hardness_neg``: mean ``s(i, P-) - mean_{not R_i} s(i, j)``
      (> 0: harder than the average negative).
    """
    z = z.detach().float()
    positives, negatives = member_sets(positives)
    sim = z @ z.t()
    out: dict[str, float] = {}
    distances = []
    for side, weights, mask, has in (("pos", pooling.pos, positives, pooling.has_pos), ("neg", pooling.neg, negatives, pooling.has_neg)):
        if not has.any():
            continue
        s, _, _, hull_norm = proxy_cosines(sim, weights, normalize)  # hull_norm: ||A z||
        distances.append((1 - hull_norm if normalize else torch.zeros_like(hull_norm))[has])
        out[f"members_{side}"] = float(pooling_entropy(weights)[has].exp().mean())
        out[f"hardness_{side}"] = float((s - _set_mean(sim, mask).unsqueeze(1))[has].mean())
    if distances:
        out["hull_distance"] = float(torch.cat([d.flatten() for d in distances]).mean())
    return out
