"""Feature distribution alignment (FDA) and Proxy-FDA losses (methods.md section 1).

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

Graphs are (B, B) boolean masks ``positives[i, j] = j in R_i`` (never the diagonal), so
the same code serves the in-batch kNN graph (exactly K positives per row) and graphs with
a varying number of positives per row (the plugin's ``graph: bank`` option).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEG_WEIGHTS = ("clamp0", "minus_one", "one_minus")
"""Rules for the weight of a non-neighbour pair (methods.md step 4):

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
    (methods.md step 3; default K = 8 with n = 4).
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


def threshold_graph(sim_h: Tensor, kth_sim: Tensor, k: int) -> Tensor:
    """Positives of each anchor whose similarity reaches a per-anchor threshold.

    ``positives[i, j]`` is true when ``sim_h[i, j] >= kth_sim[i]`` (``j != i``), keeping
    at most the ``k`` most similar. With ``kth_sim[i]`` the similarity of anchor i's K-th
    nearest neighbour in a feature bank of the whole training set, ``j`` is positive iff
    it would be among i's K global nearest neighbours (``graph: bank``). Rows may have
    fewer than ``k`` positives, or none.
    """
    b = sim_h.shape[0]
    k = min(k, b - 1)
    eye = torch.eye(b, dtype=torch.bool, device=sim_h.device)
    masked = sim_h.detach().masked_fill(eye, float("-inf"))
    top = graph_mask(masked.topk(k, dim=1).indices, b)
    return top & (masked >= kth_sim.to(masked).unsqueeze(1))


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
    """Softmax pooling weights of the generator for every anchor.

    ``pos``/``neg``: (B, n_proxies, B), row i, proxy m is a distribution over the
    positives (resp. negatives) of anchor i (zero elsewhere); ``has_pos``/``has_neg``:
    (B,) whether anchor i has any positive (resp. negative) at all.
    """

    pos: Tensor
    neg: Tensor
    has_pos: Tensor
    has_neg: Tensor

    def detach(self) -> "PoolingWeights":
        return PoolingWeights(self.pos.detach(), self.neg.detach(), self.has_pos, self.has_neg)


@dataclass
class Proxies:
    """Proxies of every anchor and their target weights.

    ``pos``/``neg``: (B, n_proxies, D) convex combinations of the anchor's positives /
    negatives; ``w_pos``/``w_neg``: (B, n_proxies) target weights; ``valid_pos`` /
    ``valid_neg``: (B,) masks of anchors that have such proxies.
    """

    pos: Tensor
    neg: Tensor
    w_pos: Tensor
    w_neg: Tensor
    valid_pos: Tensor
    valid_neg: Tensor


def _masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim restricted to ``mask``; rows with an empty mask give 0."""
    filled = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(filled, dim=-1)
    return torch.where(mask, probs, torch.zeros_like(probs))


class ProxyGenerator(nn.Module):
    """The Proxy-FDA generator G: pooling weights over each anchor's positive/negative sets.

    Architecture (dim D, hidden width ``hidden`` = 32, ``n_proxies`` = 4):

    1. Each batch member j, seen from anchor i, becomes one token
       ``t_ij = Linear(D, h)(z_j) + Linear(2, h)([S_ij, Sh_ij]) + e_type`` where
       ``e_type`` is a learned embedding of "positive of i" / "negative of i".
    2. One pre-norm multi-head self-attention layer (``heads`` = 4, residual) over the
       B - 1 tokens of anchor i (the anchor itself is masked out), so every member sees
       the whole positive and negative sets of its anchor.
    3. Two 1-D convolutions over the set axis, kernel size 1 (so the result does not
       depend on the order of the set): ``Conv1d(h, h, 1) -> GELU -> Conv1d(h, n, 1)``,
       one such pair for the positive and one for the negative set, giving n pooling
       logits per token.
    4. Softmax of the logits over the positives of i gives ``A_i+`` (n, B), over the
       negatives ``A_i-``.

    For D = 512 this has 23,240 parameters (about 24K, as in the paper); the token
    projection ``Linear(D, h)`` holds 16,416 of them.

    The generator always reads detached features: it never sends gradients to the model.
    """

    def __init__(self, dim: int, n_proxies: int = 4, hidden: int = 32, heads: int = 4) -> None:
        super().__init__()
        if n_proxies < 1:
            raise ValueError(f"n_proxies must be at least 1, got {n_proxies}")
        self.dim = dim
        self.n_proxies = n_proxies
        self.embed = nn.Linear(dim, hidden)
        self.embed_sims = nn.Linear(2, hidden)
        self.type_embed = nn.Parameter(torch.randn(2, hidden) * 0.02)
        self.norm = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.pos_head = nn.Sequential(nn.Conv1d(hidden, hidden, 1), nn.GELU(), nn.Conv1d(hidden, n_proxies, 1))
        self.neg_head = nn.Sequential(nn.Conv1d(hidden, hidden, 1), nn.GELU(), nn.Conv1d(hidden, n_proxies, 1))

    def forward(self, z: Tensor, sim_h: Tensor, positives: Tensor) -> PoolingWeights:
        z = z.detach()
        sim_h = sim_h.detach()
        b = z.shape[0]
        eye = torch.eye(b, dtype=torch.bool, device=z.device)
        negatives = ~positives & ~eye
        sims = torch.stack([z @ z.t(), sim_h], dim=-1)  # (B, B, 2)
        tokens = self.embed(z).unsqueeze(0) + self.embed_sims(sims)
        tokens = tokens + torch.where(positives.unsqueeze(-1), self.type_embed[0], self.type_embed[1])
        normed = self.norm(tokens)
        attended, _ = self.attn(normed, normed, normed, key_padding_mask=eye, need_weights=False)
        tokens = tokens + attended  # (B anchors, B members, h)
        channels = tokens.transpose(1, 2)  # (B, h, B): Conv1d over the member axis
        pos_logits = self.pos_head(channels)  # (B, n, B)
        neg_logits = self.neg_head(channels)
        a_pos = _masked_softmax(pos_logits, positives.unsqueeze(1))
        a_neg = _masked_softmax(neg_logits, negatives.unsqueeze(1))
        return PoolingWeights(a_pos, a_neg, positives.any(dim=1), negatives.any(dim=1))


def make_proxies(z: Tensor, sim_h: Tensor, pooling: PoolingWeights, neg_weight: str = "clamp0") -> Proxies:
    """Proxies ``P+ = A+ z``, ``P- = A- z`` and targets ``w+ = A+ Sh_i``, ``w- = A- W-_i``.

    The pooling weights are detached: gradients reach ``z`` (through the proxies) but
    never the generator. ``w-`` pools the non-neighbour weights of ``neg_weight``, so for
    the default ``clamp0`` it is ``-(A- max(Sh_i, 0))``, for ``minus_one`` it is -1.
    """
    pooled = pooling.detach()
    proxies_pos = pooled.pos @ z  # (B, n, D)
    proxies_neg = pooled.neg @ z
    w_pos = (pooled.pos * sim_h.clamp(min=0).unsqueeze(1)).sum(-1)
    w_neg = (pooled.neg * negative_weight(sim_h, neg_weight).unsqueeze(1)).sum(-1)
    return Proxies(proxies_pos, proxies_neg, w_pos, w_neg, pooling.has_pos, pooling.has_neg)


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

    The mean for anchor i runs over its B - 1 real pairs plus its valid proxies.
    """
    if z.shape != zh.shape:
        raise ValueError(f"student and reference features differ in shape: {tuple(z.shape)} vs {tuple(zh.shape)}")
    b = z.shape[0]
    zh = zh.detach()
    sim_h = zh @ zh.t()
    if positives is None:
        positives = graph_mask(knn_graph(sim_h, k), b)
    elif positives.shape != (b, b):
        raise ValueError(f"positives must be a ({b}, {b}) mask, got {tuple(positives.shape)}")
    off_diag = ~torch.eye(b, dtype=torch.bool, device=z.device)
    positives = positives & off_diag
    weights = signed_weights(sim_h, positives, neg_weight)
    losses = pair_loss(z @ z.t(), weights, log_tau, bias) * off_diag
    total = losses.sum(dim=1)
    count = torch.full((b,), float(b - 1), device=z.device)
    if proxies is not None:
        for p, w, valid in ((proxies.pos, proxies.w_pos, proxies.valid_pos), (proxies.neg, proxies.w_neg, proxies.valid_neg)):
            sims = torch.einsum("bd,bnd->bn", z, p)
            term = pair_loss(sims, w, log_tau, bias) * valid.unsqueeze(1)
            total = total + term.sum(dim=1)
            count = count + valid.float() * p.shape[1]
    return (total / count).mean()


def generator_loss(
    z: Tensor,
    pooling: PoolingWeights,
    positives: Tensor,
    temperature: float = 0.1,
    alpha: float = 1.0,
    diversity_target: float = 0.5,
) -> Tensor:
    """The generator's own loss: valid proxies (InfoNCE form) + ``alpha`` * diversity.

    Computed on detached features, so only the generator (through ``pooling``) gets
    gradients. With ``s(a, x) = z_a . x / temperature`` and anchor i:

    - validity of a positive proxy ``P+``: ``-log softmax`` of ``s(i, P+)`` against the
      similarities of i to all its real negatives, i.e. ``P+`` should be closer to
      ``z_i`` than any real negative;
    - validity of a negative proxy ``P-``: the same with signs flipped against the real
      positives (``-s``), i.e. ``P-`` should be farther from ``z_i`` than any real
      positive;
    - diversity (variance hinge, VICReg-like, on each proxy set):
      ``relu(diversity_target * std(real set) - std(proxy set))`` where
      ``std(X) = sqrt(mean_m ||x_m - mean(X)||^2 + 1e-8)``; the real set is anchor i's
      positives (resp. negatives). It keeps the n proxies of a set from collapsing onto
      one point (the proxies should spread at least half as much as the set they pool).

    Each term is averaged over the anchors that have the sets it needs.
    """
    z = z.detach()
    b = z.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=z.device)
    negatives = ~positives & ~eye
    sim = (z @ z.t()) / temperature
    p_pos = pooling.pos @ z  # (B, n, D)
    p_neg = pooling.neg @ z
    s_pos = torch.einsum("bd,bnd->bn", z, p_pos) / temperature
    s_neg = torch.einsum("bd,bnd->bn", z, p_neg) / temperature

    def info_nce(own: Tensor, others: Tensor, others_mask: Tensor) -> Tensor:
        # -log(exp(own) / (exp(own) + sum_j exp(other_j))) for each proxy, per anchor.
        masked = others.masked_fill(~others_mask, float("-inf"))
        rest = torch.logsumexp(masked, dim=1, keepdim=True).expand_as(own)
        return torch.logaddexp(own, rest) - own  # (B, n)

    terms = []
    valid = pooling.has_pos & negatives.any(dim=1)
    if valid.any():
        terms.append(info_nce(s_pos, sim, negatives)[valid].mean())
    valid = pooling.has_neg & positives.any(dim=1)
    if valid.any():
        terms.append(info_nce(-s_neg, -sim, positives)[valid].mean())

    def spread(points: Tensor) -> Tensor:  # (B, m, D) -> (B,)
        return ((points - points.mean(dim=1, keepdim=True)).pow(2).sum(-1).mean(-1) + 1e-8).sqrt()

    def set_spread(mask: Tensor) -> Tensor:  # spread of each anchor's real set
        w = mask.float() / mask.float().sum(dim=1, keepdim=True).clamp(min=1)
        mean = w @ z
        second = w @ z.pow(2).sum(-1)
        return (second - mean.pow(2).sum(-1)).clamp(min=0).add(1e-8).sqrt()

    diversity = []
    if pooling.pos.shape[1] > 1:
        for proxies_set, mask, has in ((p_pos, positives, pooling.has_pos), (p_neg, negatives, pooling.has_neg)):
            if has.any():
                hinge = F.relu(diversity_target * set_spread(mask) - spread(proxies_set))
                diversity.append(hinge[has].mean())
    loss = torch.stack(terms).sum() if terms else z.new_zeros(())
    if diversity:
        loss = loss + alpha * torch.stack(diversity).sum()
    return loss
