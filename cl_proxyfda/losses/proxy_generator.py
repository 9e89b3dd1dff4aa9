"""The Proxy-FDA proxy generator, its own loss and its diagnostics (docs/methods.md
section 1; docs/proxy_fda.md).

``ProxyGenerator`` (an ``nn.Module``) turns a batch into pooling weights over each
anchor's neighbours and non-neighbours; :func:`generator_loss` trains it (it reads
detached features, so it never reaches the model); :func:`proxy_diagnostics` describes
the proxies for logging. The FDA loss the proxies join, the graph and the proxy geometry
(:func:`~cl_proxyfda.losses.fda.make_proxies`, :func:`~cl_proxyfda.losses.fda.proxy_cosines`)
live in :mod:`cl_proxyfda.losses.fda`.

At batch 64 the work here is small tensors, whose cost is the number of operations and
the memory traffic of the (B, B, width) and (B, 2n, B) tensors, so the per-pair head and
the generator loss are each one autograd node with a hand-written gradient
(tests/test_fda_losses.py checks both against ``gradcheck``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_proxyfda.losses.fda import PoolingWeights, ProxyCosines, member_sets, proxy_cosines


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


def pooling_entropy(weights: Tensor) -> Tensor:
    """Entropy (nats) of each pooling distribution, (B, n); ``exp`` of it is the effective
    number of batch members a proxy pools."""
    return -(weights * weights.clamp(min=1e-12).log()).sum(-1)


def _set_mean(sim: Tensor, mask: Tensor) -> Tensor:
    """Mean of each row of ``sim`` over ``mask`` (0 for empty rows), (B,)."""
    m = mask.float()
    return (sim * m).sum(1) / m.sum(1).clamp(min=1)


@dataclass(frozen=True)
class GeneratorObjective:
    """The options of the generator loss's terms, as :func:`generator_loss` was given them
    (its signature holds the defaults)."""

    temperature: float
    alpha: float
    diversity_target: float
    hardness: float
    min_members: float
    entropy_weight: float
    normalize: bool


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
