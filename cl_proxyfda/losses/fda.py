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
from typing import Any

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

    ``sim_pos``/``sim_neg``: (B, n_proxies) similarity ``z_i . P`` of anchor i to each of
    its positive / negative proxies (differentiable in ``z``); ``w_pos``/``w_neg``:
    (B, n_proxies) target weights; ``valid_pos``/``valid_neg``: (B,) masks of anchors
    that have such proxies. The proxy vectors themselves are :func:`pool`.
    """

    sim_pos: Tensor
    sim_neg: Tensor
    w_pos: Tensor
    w_neg: Tensor
    valid_pos: Tensor
    valid_neg: Tensor


def _masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim restricted to ``mask``; rows with an empty mask give 0.

    Masked entries get a finite, hugely negative bias (their exponential is exactly 0, as
    with -inf): an empty row is then a finite uniform softmax that the final ``where``
    zeroes, with a zero gradient instead of NaN. A broadcast bool ``masked_fill`` and its
    backward cost about 150 us more at (64, 2, 4, 64) on one CPU thread."""
    # (no scalar tensor: on CUDA its host-to-device copy would wait for the queued work)
    bias = (~mask).to(logits.dtype).mul_(torch.finfo(logits.dtype).min / 2)
    probs = torch.softmax(logits + bias, dim=-1)
    return torch.where(mask, probs, 0.0)


class _ReluHead(torch.autograd.Function):
    """``head(relu(pre))`` for the (P, h) pre-activations of all P = B^2 pairs, returned
    transposed as (2n, P): ``weight @ relu(pre)^T + bias``.

    The same values and gradients as ``F.linear(F.relu(pre), weight, bias).t()``; written
    out so that each of its three products runs in the layout CPU BLAS is fast at. With
    (4096, 32) x (32, 8) shapes, ``F.linear`` and autograd's own backward (on the permuted
    gradient) are each about 3x slower than the forms below (one CPU thread).
    """

    @staticmethod
    def forward(ctx: Any, pre: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        hidden = pre.clamp(min=0)
        ctx.save_for_backward(hidden, weight)
        return torch.addmm(bias.unsqueeze(1), weight, hidden.t())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        hidden, weight = ctx.saved_tensors
        grad = grad.contiguous()  # (2n, P)
        # ReLU's own backward kernel: a bool-mask masked_fill_ here took ~370 us at P = 4096
        grad_pre = torch.ops.aten.threshold_backward(grad.t() @ weight, hidden, 0) if ctx.needs_input_grad[0] else None
        grad_weight = grad @ hidden if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(1) if ctx.needs_input_grad[2] else None
        return grad_pre, grad_weight, grad_bias


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
        # member(c_j) + pair(relation_ij) as one batched product (B, B, 3) x (3, h)
        pair = self.pair.weight.t().unsqueeze(0).expand(b, -1, -1)
        pre = torch.baddbmm(self.member(tokens).unsqueeze(0), relation, pair)  # (B, B, h)
        n = self.n_proxies
        logits = _ReluHead.apply(pre.view(b * b, -1), self.head.weight, self.head.bias).view(2 * n, b, b).permute(1, 0, 2)
        mask = sets.transpose(0, 1).contiguous().unsqueeze(2)  # (B, 2, 1, B): each side's set, for its n proxies
        weights = _masked_softmax(logits.reshape(b, 2, n, b), mask).view(b, 2 * n, b)  # both sides in one pass
        return PoolingWeights(weights, sets.any(dim=2))

    def _attend(self, x: Tensor) -> Tensor:
        """Single-head self-attention of the (B, h) tokens on ``self.attn``'s parameters:
        what ``nn.MultiheadAttention`` computes with one head, without its per-call
        reshaping (half a millisecond of the step at B = 64 on one CPU thread)."""
        q, k, v = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        return self.attn.out_proj(F.scaled_dot_product_attention(q, k, v))


def pool(weights: Tensor, z: Tensor, normalize: bool = True) -> Tensor:
    """Proxy vectors ``A z`` (B, n, D): convex combinations of batch members, projected
    back onto the unit sphere when ``normalize`` (the features live there; an average of
    unit vectors lies inside the ball, nearer the middle of the set than any real point)."""
    proxies = weights @ z
    return F.normalize(proxies, dim=-1) if normalize else proxies


def proxy_cosines(sim: Tensor, weights: Tensor, normalize: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, a_s, norm)``: ``s[i, m] = z_i . P_im`` (B, n) from ``sim = z z^T`` alone, with
    the products ``a_s = A S`` (B, n, B) and the norms ``||A_im z||`` (B, n) it used.

    ``A_im z . z_i = (A S)[i, m, i]`` and ``||A_im z||^2 = sum_j (A S)[i, m, j] A[i, m, j]``:
    no (B, n, D) tensor is formed, whatever the feature size D. With ``normalize`` the
    proxies are ``A_im z / ||A_im z||`` (:func:`pool`).
    """
    a_s = weights @ sim  # (B, n, B)
    s = a_s.diagonal(dim1=0, dim2=2).t()  # (B, n): row i of A_i S, column i
    norm = (a_s * weights).sum(-1).clamp(min=1e-12).sqrt()  # (B, n)
    return (s / norm if normalize else s), a_s, norm


def proxy_similarity(sim: Tensor, weights: Tensor, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """``(s, G)``: ``s[i, m] = z_i . P_im`` (B, n) and the Gram matrix of each anchor's
    proxies ``G[i] = P_i P_i^T`` (B, n, n), from ``sim = z z^T`` alone (see
    :func:`proxy_cosines`; the Gram matrix costs one more (n, B) x (B, n) product per anchor).
    """
    s, a_s, norm = proxy_cosines(sim, weights, normalize)
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
    pooled = pooling.detach()
    n = pooled.n_proxies
    sim = (z @ z.t()) if sim is None else sim
    both, _, _ = proxy_cosines(sim, pooled.weights, normalize)  # one pass for both sets
    w_pos = (pooled.pos * sim_h.clamp(min=0).unsqueeze(1)).sum(-1)
    w_neg = (pooled.neg * negative_weight(sim_h, neg_weight).unsqueeze(1)).sum(-1)
    return Proxies(both[:, :n], both[:, n:], w_pos, w_neg, pooling.has_pos, pooling.has_neg)


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
    losses = pair_loss((z @ z.t()) if sim is None else sim, weights, log_tau, bias) * pairs
    total = losses.sum(dim=1)
    count = pairs.sum(dim=1).to(z.dtype)
    if proxies is not None:  # both proxy sets in one pass
        n = proxies.sim_pos.shape[1]
        sims = torch.cat([proxies.sim_pos, proxies.sim_neg], dim=1)
        valid = torch.stack([proxies.valid_pos, proxies.valid_neg], dim=1).repeat_interleave(n, dim=1)  # (B, 2n)
        total = total + (pair_loss(sims, torch.cat([proxies.w_pos, proxies.w_neg], dim=1), log_tau, bias) * valid).sum(dim=1)
        count = count + valid.sum(dim=1).to(z.dtype)
    return (total / count).mean()


def _set_mean(sim: Tensor, mask: Tensor) -> Tensor:
    """Mean of each row of ``sim`` over ``mask`` (0 for empty rows), (B,)."""
    m = mask.float()
    return (sim * m).sum(1) / m.sum(1).clamp(min=1)


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
    negatives). ``sim`` (``z z^T``, optional) saves recomputing it.

    Both sides are computed together on stacked tensors, and everything that does not
    depend on the pooling weights (set means, the validity denominators, the entropy
    floors, the real sets' spread, the per-anchor averaging weights) is computed first
    without gradient: the same value as the term-by-term form
    (tests/test_fda_losses.py), with a third of its operations (the loss is small-tensor
    work; its cost is the number of operations, forward and backward).
    """
    z = z.detach()
    b = z.shape[0]
    n = pooling.n_proxies
    sim = (z @ z.t()) if sim is None else sim.detach()
    with torch.no_grad():
        sets = member_sets(positives).to(sim.dtype)  # (2, B, B): each side's real set
        count = sets.sum(2)  # (2, B)
        sign = torch.ones(2, 1, dtype=sim.dtype, device=sim.device)  # built on the device: no host copy per step
        sign[1] = -1.0
        # per side, +s(i, x) for the positive side and -s(i, x) for the negative side: larger = easier
        signed_mean = (sim.unsqueeze(0) * sets).sum(2) / count.clamp(min=1) * sign  # (2, B)
        # validity competitors: a positive proxy against the real negatives, a (negated)
        # negative proxy against the (negated) positives
        others = (sim.unsqueeze(0) * (sign.unsqueeze(2) / temperature)).masked_fill(sets.flip(0) == 0, float("-inf"))
        rest = torch.logsumexp(others, dim=2)  # (2, B)
        floor = count.clamp(min=1, max=min_members).log()  # (2, B)
        has = pooling.has.to(sim.dtype)  # (2, B)
        per_has = has / has.sum(1, keepdim=True).clamp(min=1)  # (2, B): mean over the anchors with that side's set
        both = has[0] * has[1]
        per_both = both / both.sum().clamp(min=1)
        w = sets / count.clamp(min=1).unsqueeze(2)
        real_spread = (w @ sim.diagonal() - ((w @ sim) * w).sum(-1)).clamp(min=0).add(1e-8).sqrt()  # (2, B)
        # per proxy: the mean over the n proxies of a side, then over the anchors
        per_proxy_has = (per_has / n).t().unsqueeze(2)  # (B, 2, 1)
        per_proxy_both = (per_both / n).view(b, 1, 1)
    weights = pooling.weights  # (B, 2n, B)
    s, a_s, norm = proxy_cosines(sim, weights, normalize)
    signed = s.view(b, 2, n) * sign.view(1, 2, 1)
    own = signed / temperature
    validity = torch.logaddexp(own, rest.t().unsqueeze(2)) - own  # (B, 2, n), InfoNCE form
    total = (validity * per_proxy_both).sum()
    hinges = None  # (B, 2, n): the per-proxy hinges, weighted
    if hardness > 0:
        hinges = F.relu(signed - signed_mean.t().unsqueeze(2)) * hardness
    if entropy_weight > 0:
        neg_entropy = (weights * weights.clamp(min=1e-12).log()).sum(-1).view(b, 2, n)
        below = F.relu(neg_entropy + floor.t().unsqueeze(2))  # floor - entropy
        hinges = below * entropy_weight if hinges is None else torch.add(hinges, below, alpha=entropy_weight)
    if hinges is not None:
        total = total + (hinges * per_proxy_has).sum()
    if n > 1 and alpha > 0:
        # spread^2 of a side's proxies = mean_m ||P_m||^2 - ||mean_m P_m||^2, with
        # ||sum_m P_m||^2 = u S u^T for u = sum_m A_m / ||A_m z|| (or sum_m A_m unnormalised)
        scaled = weights / norm.unsqueeze(2) if normalize else weights
        u = scaled.view(b, 2, n, b).sum(2).view(2 * b, b)
        mean_sq = ((u @ sim) * u).sum(-1).view(b, 2) / (n * n)
        second = 1.0 if normalize else norm.square().view(b, 2, n).mean(2)
        spread = (second - mean_sq).clamp(min=0).add(1e-8).sqrt()  # (B, 2)
        hinge = F.relu(diversity_target * real_spread.t() - spread)
        total = total + alpha * (hinge * per_has.t()).sum()
    return total


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
        s, _, hull_norm = proxy_cosines(sim, weights, normalize)  # hull_norm: ||A z||
        distances.append((1 - hull_norm if normalize else torch.zeros_like(hull_norm))[has])
        out[f"members_{side}"] = float(pooling_entropy(weights)[has].exp().mean())
        out[f"hardness_{side}"] = float((s - _set_mean(sim, mask).unsqueeze(1))[has].mean())
    if distances:
        out["hull_distance"] = float(torch.cat([d.flatten() for d in distances]).mean())
    return out
