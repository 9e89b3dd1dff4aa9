"""FDA / Proxy-FDA losses: graph, weights, gradient signs, proxies, gradient isolation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cl_proxyfda.losses.fda import (
    NEG_WEIGHTS,
    PoolingWeights,
    fda_loss,
    graph_mask,
    knn_graph,
    make_proxies,
    member_sets,
    pair_loss,
    signed_weights,
    pool,
    proxy_similarity,
)
from cl_proxyfda.losses.proxy_generator import ProxyGenerator, _PairPooling, generator_loss, proxy_diagnostics

torch.set_num_threads(1)


def clustered(b: int = 32, d: int = 16, clusters: int = 4, noise: float = 0.4, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
    """Normalised features in ``clusters`` groups; ``offset`` adds a shared direction (all Sh > 0)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    x = centres.repeat_interleave(b // clusters, dim=0) + noise * torch.randn(b, d, generator=g)
    x[:, 0] += offset
    return F.normalize(x, dim=1)


def scalars(tau: float = 0.1, b: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(math.log(tau), requires_grad=True), torch.tensor(b, requires_grad=True)


def full_step(z: torch.Tensor, zh: torch.Tensor, gen: ProxyGenerator, k: int = 6, neg_weight: str = "clamp0"):
    log_tau, bias = scalars()
    sim_h = zh @ zh.t()
    positives = graph_mask(knn_graph(sim_h, k), len(z))
    pooling = gen(z, sim_h, positives)
    proxies = make_proxies(z, sim_h, pooling, neg_weight)
    model = fda_loss(z, zh, k, log_tau, bias, neg_weight, proxies, positives)
    return model, generator_loss(z, pooling, positives), pooling, proxies, positives


# ------------------------------------------------------------------------ graph
def test_knn_graph_matches_brute_force_and_excludes_self():
    zh = clustered(24)
    sim = zh @ zh.t()
    idx = knn_graph(sim, 5)
    assert idx.shape == (24, 5) and idx.dtype == torch.long
    assert not (idx == torch.arange(24).unsqueeze(1)).any()
    for i in range(24):
        others = [(float(sim[i, j]), j) for j in range(24) if j != i]
        expected = {j for _, j in sorted(others, reverse=True)[:5]}
        assert set(idx[i].tolist()) == expected
    mask = graph_mask(idx, 24)
    assert mask.sum(1).eq(5).all() and not mask.diagonal().any()


@pytest.mark.parametrize("k", [8, 9])
def test_k_must_be_smaller_than_batch(k):
    zh = clustered(8)
    with pytest.raises(ValueError, match="K must be < batch size"):
        knn_graph(zh @ zh.t(), k)
    with pytest.raises(ValueError, match="K must be < batch size"):
        fda_loss(zh, zh, k, *scalars())


def test_signed_weights_follow_the_negative_rule():
    sim_h = torch.tensor([[1.0, 0.6, -0.3, 0.2], [0.6, 1.0, 0.1, -0.5], [-0.3, 0.1, 1.0, 0.4], [0.2, -0.5, 0.4, 1.0]])
    pos = torch.zeros(4, 4, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = pos[2, 3] = pos[3, 2] = True
    w = signed_weights(sim_h, pos, "clamp0")
    assert w[0, 1] == pytest.approx(0.6) and w[2, 3] == pytest.approx(0.4)
    assert w[0, 2] == 0.0 and w[0, 3] == pytest.approx(-0.2)  # -max(Sh, 0)
    assert signed_weights(sim_h, pos, "minus_one")[0, 3] == -1.0
    assert signed_weights(sim_h, pos, "one_minus")[0, 2] == pytest.approx(-1.3)
    assert (w.diagonal() == 0).all()
    with pytest.raises(ValueError, match="neg_weight"):
        signed_weights(sim_h, pos, "nope")


@pytest.mark.parametrize("rule", NEG_WEIGHTS)
def test_gradient_pulls_neighbours_and_pushes_non_neighbours(rule):
    zh = clustered(24, offset=10.0)  # every reference similarity > 0
    sim_h = zh @ zh.t()
    assert (sim_h > 0).all()
    pos = graph_mask(knn_graph(sim_h, 6), 24)
    sim = (clustered(24, seed=1) @ clustered(24, seed=1).t()).requires_grad_()
    log_tau, bias = scalars()
    off = ~torch.eye(24, dtype=torch.bool)
    loss = (pair_loss(sim, signed_weights(sim_h, pos, rule), log_tau, bias) * off).sum()
    (grad,) = torch.autograd.grad(loss, sim)
    assert (grad[pos] < 0).all()  # d loss / d S_ij < 0: raising S_ij lowers the loss (pull)
    assert (grad[~pos & off] > 0).all()  # pushed apart


def test_fda_loss_is_the_mean_pair_loss_on_the_knn_graph():
    z, zh = clustered(16, seed=3), clustered(16)
    log_tau, bias = scalars(0.2, 0.3)
    pos = graph_mask(knn_graph(zh @ zh.t(), 5), 16)
    off = ~torch.eye(16, dtype=torch.bool)
    manual = (pair_loss(z @ z.t(), signed_weights(zh @ zh.t(), pos), log_tau, bias) * off).sum(1).div(15).mean()
    assert torch.allclose(fda_loss(z, zh, 5, log_tau, bias), manual, atol=1e-6)


# ------------------------------------------------------------------ properties
@pytest.mark.parametrize("with_proxies", [False, True])
def test_finite_and_invariant_to_batch_permutation(with_proxies):
    torch.manual_seed(0)
    z, zh = clustered(32, seed=5), clustered(32)
    perm = torch.randperm(32)
    if with_proxies:
        gen = ProxyGenerator(16).eval()
        a = full_step(z, zh, gen)[0]
        b = full_step(z[perm], zh[perm], gen)[0]
    else:
        a = fda_loss(z, zh, 6, *scalars())
        b = fda_loss(z[perm], zh[perm], 6, *scalars())
    assert a.ndim == 0 and torch.isfinite(a)
    assert torch.allclose(a, b, atol=1e-5)


def fitted_loss(z: torch.Tensor, zh: torch.Tensor, rule: str, steps: int = 300) -> float:
    """The FDA loss after fitting tau and b to this pair of spaces (as training does)."""
    log_tau, bias = scalars()
    opt = torch.optim.Adam([log_tau, bias], lr=0.05)
    for _ in range(steps):
        loss = fda_loss(z, zh, 6, log_tau, bias, rule)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(fda_loss(z, zh, 6, log_tau, bias, rule).detach())


def spaces(seed: int) -> dict[str, torch.Tensor]:
    zh = clustered(32, offset=1.0, seed=seed)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(7)))
    rotated = zh @ q  # other absolute positions, same neighbourhoods
    return {
        "ref": zh,
        "rotated": rotated,
        "drifted": F.normalize(rotated + 0.1 * torch.randn(32, 16, generator=torch.Generator().manual_seed(8)), dim=1),
        "scrambled": rotated[torch.randperm(32, generator=torch.Generator().manual_seed(9))],
    }


def test_loss_depends_on_relations_not_absolute_positions():
    s = spaces(0)
    same = fda_loss(s["ref"], s["ref"], 6, *scalars()).detach()
    assert torch.allclose(fda_loss(s["rotated"], s["ref"], 6, *scalars()).detach(), same, atol=1e-5)


@pytest.mark.parametrize("rule", NEG_WEIGHTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_neighbourhood_preserving_space_scores_lower_than_scrambled(rule, seed):
    s = spaces(seed)
    drifted, scrambled = fitted_loss(s["drifted"], s["ref"], rule), fitted_loss(s["scrambled"], s["ref"], rule)
    assert drifted < scrambled - 0.1
    if rule != "clamp0":  # these rules already rank the spaces at the initial tau = 0.1, b = 0
        at_init = {k: float(fda_loss(s[k], s["ref"], 6, *scalars(), rule).detach()) for k in ("drifted", "scrambled")}
        assert at_init["drifted"] < at_init["scrambled"] - 0.5


# --------------------------------------------------------------------- proxies
def test_generator_parameter_counts():
    # hidden 16 (the default): embed 512*16+16, norm 32, one-head attention 4*16*16+4*16, member 16*16+16, pair 3*16, head 16*8+8
    assert sum(p.numel() for p in ProxyGenerator(512).parameters()) == 8_208 + 32 + 1_088 + 272 + 48 + 136 == 9_784
    # hidden 32 (the default before; what run folders without generator_hidden used)
    assert sum(p.numel() for p in ProxyGenerator(512, hidden=32).parameters()) == 16_416 + 64 + 4_224 + 1_056 + 96 + 264 == 22_120


def test_proxies_are_convex_combinations_of_their_sets():
    torch.manual_seed(0)
    z, zh = clustered(24, seed=2), clustered(24, offset=1.0)
    gen = ProxyGenerator(16, n_proxies=3)
    _, _, pooling, proxies, pos = full_step(z, zh, gen, k=5)
    neg = ~pos & ~torch.eye(24, dtype=torch.bool)
    for weights, members in ((pooling.pos, pos), (pooling.neg, neg)):
        assert weights.shape == (24, 3, 24)
        assert (weights >= 0).all()
        assert torch.allclose(weights.sum(-1), torch.ones(24, 3), atol=1e-5)
        assert (weights * (~members).unsqueeze(1)).abs().max() == 0  # nothing outside the set
    vectors = pool(pooling.pos, z)  # normalised convex combinations: points on the sphere
    assert torch.allclose(vectors, F.normalize(pooling.pos @ z, dim=-1), atol=1e-6)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(24, 3), atol=1e-5)
    # the positive proxies come first, then the negative ones
    assert torch.allclose(proxies.similarity[:, :3], torch.einsum("bd,bnd->bn", z, vectors), atol=1e-5)
    assert torch.allclose(proxies.similarity[:, 3:], torch.einsum("bd,bnd->bn", z, pool(pooling.neg, z)), atol=1e-5)
    assert torch.allclose(proxies.cosines.s, proxies.similarity, atol=1e-6)  # the detached copy both losses read
    sim_h = zh @ zh.t()
    lo = sim_h.masked_fill(~pos, 9).min(1).values.unsqueeze(1)
    hi = sim_h.masked_fill(~pos, -9).max(1).values.unsqueeze(1)
    w_pos, w_neg = proxies.targets[:, :3], proxies.targets[:, 3:]
    assert ((w_pos >= lo - 1e-5) & (w_pos <= hi + 1e-5)).all()
    assert (w_neg <= 0).all()


def test_proxies_change_the_loss_and_reach_the_features():
    torch.manual_seed(0)
    zh = clustered(24, offset=1.0)
    z = clustered(24, seed=4).requires_grad_()
    with_p = full_step(z, zh, ProxyGenerator(16), k=5)[0]
    without = fda_loss(z, zh, 5, *scalars())
    assert abs(float(with_p.detach()) - float(without.detach())) > 1e-4
    (g_with,) = torch.autograd.grad(with_p, z)
    (g_without,) = torch.autograd.grad(without, z)
    assert (g_with - g_without).abs().max() > 1e-5


def test_model_loss_gives_no_gradient_to_generator_and_generator_loss_none_to_features():
    torch.manual_seed(0)
    zh = clustered(24, offset=1.0)
    z = clustered(24, seed=6).requires_grad_()
    gen = ProxyGenerator(16)
    model, gen_loss, *_ = full_step(z, zh, gen, k=5)
    model.backward(retain_graph=True)
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in gen.parameters())
    z.grad = None
    gen_loss.backward()
    assert z.grad is None
    assert sum(float(p.grad.abs().sum()) for p in gen.parameters() if p.grad is not None) > 0


def test_generator_loss_decreases_when_trained():
    torch.manual_seed(0)
    z, zh = clustered(32, seed=1, noise=0.8), clustered(32, noise=0.8)
    gen = ProxyGenerator(16)
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = full_step(z, zh, gen)[1]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(full_step(z, zh, gen)[1].detach()) < 0.9 * first


def test_anchors_without_positives_stay_finite():
    torch.manual_seed(0)
    z, zh = clustered(16, seed=1), clustered(16)
    sim_h = zh @ zh.t()
    pos = graph_mask(knn_graph(sim_h, 4), 16)
    pos[:4] = False  # four anchors get no positive at all
    assert not pos[:4].any() and pos[4:].any()
    gen = ProxyGenerator(16)
    pooling = gen(z, sim_h, pos)
    assert not pooling.has_pos[:4].any()
    assert pooling.pos[:4].abs().sum() == 0
    proxies = make_proxies(z, sim_h, pooling)
    loss = fda_loss(z, zh, 4, *scalars(), proxies=proxies, positives=pos)
    assert torch.isfinite(loss) and torch.isfinite(generator_loss(z, pooling, pos))


# ------------------------------------------------------- CLIP-like features, plugin defaults
def _fda_at_defaults():
    from cl_proxyfda.strategies.proxy_fda import FDAParams

    p = FDAParams()
    return p.k, torch.tensor(math.log(p.tau_init)), torch.tensor(p.bias_init), p.neg_weight


def test_defaults_rank_the_reference_well_below_a_shuffled_copy_on_clip_like_features():
    from cl_proxyfda.testing import clip_like_features

    zh, _ = clip_like_features(seed=0)
    k, log_tau, bias, rule = _fda_at_defaults()
    ref = fda_loss(zh, zh, k, log_tau, bias, rule)
    for seed in range(3):
        perm = torch.randperm(len(zh), generator=torch.Generator().manual_seed(seed))
        shuffled = fda_loss(zh[perm], zh, k, log_tau, bias, rule)
        assert ref <= 0.85 * shuffled  # measured 20% below (tools/fda_defaults.py)


def test_minimising_fda_alone_from_the_reference_keeps_clip_like_features_in_place():
    """At the old defaults (b = 0) this drove cos(z, zh) to ~0.4 and the mean pairwise
    cosine from 0.70 to 0; at the defaults it must stay >= 0.8 (measured 0.82)."""
    from cl_proxyfda.testing import clip_like_features

    zh, _ = clip_like_features(seed=1)
    k, log_tau, bias, rule = _fda_at_defaults()

    def minimise(b: torch.Tensor) -> torch.Tensor:
        raw = zh.clone().requires_grad_(True)
        opt = torch.optim.Adam([raw], lr=1e-2)
        for _ in range(300):
            loss = fda_loss(F.normalize(raw, dim=1), zh, k, log_tau, b, rule)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return F.normalize(raw.detach(), dim=1)

    kept = (minimise(bias) * zh).sum(1).mean()
    assert kept >= 0.8
    old = (minimise(torch.tensor(0.0)) * zh).sum(1).mean()
    assert old < 0.6  # the failure the defaults fix, on the same data


# ------------------------------------------------ proxies: the parts whose maths is unchanged
def test_proxy_similarity_from_the_gram_matrix_equals_the_vector_form():
    """The loss reads z_i . P from z z^T alone; unnormalised it is the first version's
    ``einsum(z, A z)``, normalised the same over ||A z||, gradients included."""
    torch.manual_seed(0)
    z = clustered(20, seed=3).requires_grad_()
    weights = torch.softmax(torch.randn(20, 3, 20), dim=-1)
    for normalize in (False, True):
        s, gram = proxy_similarity(z @ z.t(), weights, normalize)
        vectors = weights @ z
        if normalize:
            vectors = F.normalize(vectors, dim=-1)
        expected = torch.einsum("bd,bnd->bn", z, vectors)
        assert torch.allclose(s, expected, atol=1e-5)
        assert torch.allclose(gram, vectors @ vectors.transpose(1, 2), atol=1e-5)
        (g1,) = torch.autograd.grad(s.sum(), z)
        (g2,) = torch.autograd.grad(expected.sum(), z)
        assert torch.allclose(g1, g2, atol=1e-5)


def test_unnormalised_loss_with_proxies_matches_the_first_version_formula():
    """With ``normalize=False`` the proxy pairs are the first version's: S_ip = z_i . (A z)."""
    torch.manual_seed(0)
    z, zh = clustered(24, seed=4), clustered(24, offset=1.0)
    sim_h = zh @ zh.t()
    pos = graph_mask(knn_graph(sim_h, 5), 24)
    pooling = ProxyGenerator(16)(z, sim_h, pos)
    log_tau, bias = scalars(b=-2.0)
    got = fda_loss(z, zh, 5, log_tau, bias, proxies=make_proxies(z, sim_h, pooling, normalize=False), positives=pos)
    off = ~torch.eye(24, dtype=torch.bool)
    w = torch.where(pos, sim_h.clamp(min=0), -sim_h.clamp(min=0))
    pairs = F.softplus(-w * ((z @ z.t()) / 0.1 + bias)) * off
    total, count = pairs.sum(1), torch.full((24,), 23.0)
    for a, wt in ((pooling.pos, (pooling.pos * sim_h.clamp(min=0).unsqueeze(1)).sum(-1)), (pooling.neg, (pooling.neg * -sim_h.clamp(min=0).unsqueeze(1)).sum(-1))):
        s = torch.einsum("bd,bnd->bn", z, a.detach() @ z)
        total, count = total + F.softplus(-wt * (s / 0.1 + bias)).sum(1), count + a.shape[1]
    assert torch.allclose(got, (total / count).mean(), atol=1e-5)


def test_generator_is_equivariant_to_batch_order():
    torch.manual_seed(0)
    z, zh = clustered(24, seed=1), clustered(24, offset=1.0)
    sim_h = zh @ zh.t()
    pos = graph_mask(knn_graph(sim_h, 5), 24)
    gen = ProxyGenerator(16).eval()
    perm = torch.randperm(24)
    a = gen(z, sim_h, pos)
    b = gen(z[perm], sim_h[perm][:, perm], pos[perm][:, perm])
    assert torch.allclose(a.pos[perm][:, :, perm], b.pos, atol=1e-5)
    assert torch.allclose(a.neg[perm][:, :, perm], b.neg, atol=1e-5)


def test_trained_proxies_do_not_collapse_and_are_harder_on_clip_like_features():
    """The first generator loss (validity + diversity only) lets the negative pooling go
    one-hot (a copy of one easy negative) within ~300 steps. With the entropy floor and
    the hardness hinges, on the same data and training: each proxy pools about two or
    more members, negative proxies are no easier than the average negative, positive
    proxies are harder than without the hinges."""
    from cl_proxyfda.testing import clip_like_features

    zh, _ = clip_like_features(64, 128, seed=2)
    z = F.normalize(zh + 0.03 * torch.randn(zh.shape, generator=torch.Generator().manual_seed(3)), dim=1)
    sim_h = zh @ zh.t()
    pos = graph_mask(knn_graph(sim_h, 8), 64)

    def trained(**options: float) -> dict[str, float]:
        torch.manual_seed(0)
        gen = ProxyGenerator(128)
        opt = torch.optim.AdamW(gen.parameters(), lr=1e-3)
        for _ in range(300):  # measured: the width-32 generator collapsed within 150 steps, width 16 within 300
            loss = generator_loss(z, gen(z, sim_h, pos), pos, **options)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return proxy_diagnostics(z, gen(z, sim_h, pos), pos)

    first = trained(hardness=0.0, entropy_weight=0.0)
    now = trained()
    assert first["members_neg"] < 1.2  # the collapse, reproduced (measured 1.01)
    assert now["members_neg"] >= 1.9 and now["members_pos"] >= 1.9  # measured 2.19 and 3.2
    assert now["hardness_neg"] >= 0.0 > first["hardness_neg"]  # measured +0.014 vs -0.001
    assert now["hardness_pos"] < first["hardness_pos"] - 0.03  # measured 0.055 vs 0.134
    assert 0 < now["hull_distance"] < 0.2  # normalisation lifts proxies off the hull, a little


def test_ignored_pairs_are_neither_pulled_nor_pushed():
    torch.manual_seed(0)
    zh = clustered(16, offset=1.0)
    z = clustered(16, seed=3).requires_grad_()
    sim_h = zh @ zh.t()
    pos = graph_mask(knn_graph(sim_h, 3), 16)
    ignore = torch.zeros(16, 16, dtype=torch.bool)
    j = int((~pos[0]).nonzero()[1])  # a non-neighbour of anchor 0 (index 0 is anchor 0 itself)
    ignore[0, j] = ignore[j, 0] = True
    ignore[0, int(pos[0].nonzero()[0])] = True  # an ignored neighbour stays a neighbour
    log_tau, bias = scalars(b=-10.0)
    loss = fda_loss(z, zh, 3, log_tau, bias, positives=pos, ignore=ignore)
    # Hand computation: the same mean with pair (0, j) and (j, 0) dropped.
    w = signed_weights(sim_h, pos)
    pairs = F.softplus(-w * ((z @ z.t()) / 0.1 - 10.0))
    keep = ~torch.eye(16, dtype=torch.bool)
    keep[0, j] = keep[j, 0] = False
    expected = ((pairs * keep).sum(1) / keep.sum(1)).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(fda_loss(z, zh, 3, log_tau, bias, positives=pos), fda_loss(z, zh, 3, log_tau, bias, positives=pos, ignore=torch.zeros_like(ignore)))


def _generator_loss_one_side_at_a_time(z, pooling, positives, temperature=0.1, alpha=1.0, diversity_target=0.5, hardness=10.0,
                                       min_members=2.0, entropy_weight=1.0, normalize=True):
    """The generator loss written term by term and side by side, as documented (the form
    the stacked implementation replaced): the reference it must equal."""
    z = z.detach()
    eye = torch.eye(z.shape[0], dtype=torch.bool)
    negatives = ~positives & ~eye
    sim = z @ z.t()

    def rows_mean(values, rows):
        per_row = values.reshape(values.shape[0], -1).mean(1)
        return (per_row * rows.float()).sum() / rows.float().sum().clamp(min=1)

    def set_mean(mask):
        return (sim * mask.float()).sum(1) / mask.float().sum(1).clamp(min=1)

    def spread(gram):
        return (gram.diagonal(dim1=1, dim2=2).mean(-1) - gram.mean(dim=(1, 2))).clamp(min=0).add(1e-8).sqrt()

    def set_spread(mask):
        w = mask.to(sim.dtype) / mask.to(sim.dtype).sum(dim=1, keepdim=True).clamp(min=1)
        return (w @ sim.diagonal() - ((w @ sim) * w).sum(-1)).clamp(min=0).add(1e-8).sqrt()

    def info_nce(own, others, mask):
        rest = torch.logsumexp(others.masked_fill(~mask, float("-inf")), dim=1, keepdim=True).expand_as(own)
        return torch.logaddexp(own, rest) - own

    s_pos, gram_pos = proxy_similarity(sim, pooling.pos, normalize)
    s_neg, gram_neg = proxy_similarity(sim, pooling.neg, normalize)
    both = pooling.has_pos & pooling.has_neg
    total = rows_mean(info_nce(s_pos / temperature, sim / temperature, negatives), both)
    total = total + rows_mean(info_nce(-s_neg / temperature, -sim / temperature, positives), both)
    total = total + hardness * rows_mean(F.relu(s_pos - set_mean(positives).unsqueeze(1)), pooling.has_pos)
    total = total + hardness * rows_mean(F.relu(set_mean(negatives).unsqueeze(1) - s_neg), pooling.has_neg)
    for weights, mask, has in ((pooling.pos, positives, pooling.has_pos), (pooling.neg, negatives, pooling.has_neg)):
        floor = mask.sum(1).float().clamp(min=1).clamp(max=min_members).log().unsqueeze(1)
        entropy = -(weights * weights.clamp(min=1e-12).log()).sum(-1)
        total = total + entropy_weight * rows_mean(F.relu(floor - entropy), has)
    for gram, mask, has in ((gram_pos, positives, pooling.has_pos), (gram_neg, negatives, pooling.has_neg)):
        total = total + alpha * rows_mean(F.relu(diversity_target * set_spread(mask) - spread(gram)), has)
    return total


@pytest.mark.parametrize("normalize", [True, False])
def test_stacked_generator_loss_equals_the_side_by_side_form(normalize):
    """Value and generator gradients equal the term-by-term form on CLIP-like features,
    including anchors without positives (a sparse custom graph) and without negatives."""
    from cl_proxyfda.testing import clip_like_features

    z, _ = clip_like_features(24, 64, classes=6, seed=3)
    zh, _ = clip_like_features(24, 64, classes=6, seed=4)
    z, zh = z.double(), zh.double()  # float64: the two forms sum in different orders
    sim_h = zh @ zh.t()
    positives = graph_mask(knn_graph(sim_h, 5), 24)
    positives[0] = False  # anchor 0: no positives
    positives[1] = ~torch.eye(24, dtype=torch.bool)[1]  # anchor 1: no negatives
    options = dict(temperature=0.2, alpha=0.7, hardness=3.0, min_members=2.5, entropy_weight=0.5, normalize=normalize)
    grads = []
    values = []
    for fn in (generator_loss, _generator_loss_one_side_at_a_time):
        gen = ProxyGenerator(64, n_proxies=3, hidden=8).double()
        torch.manual_seed(0)
        for p in gen.parameters():
            torch.nn.init.normal_(p, std=0.3)
        loss = fn(z, gen(z, sim_h, positives), positives, **options)
        loss.backward()
        values.append(float(loss))
        grads.append(torch.cat([p.grad.flatten() for p in gen.parameters()]))
    assert values[0] > 0.1
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    assert torch.allclose(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_pair_pooling_gradients_match_finite_differences():
    """The generator's hand-written pair node (relu head + masked softmax) against
    gradcheck, in float64, with an anchor whose positive set is empty."""
    g = torch.Generator().manual_seed(0)
    b, h, n = 7, 5, 2
    sim_h = torch.randn(b, b, generator=g, dtype=torch.float64)
    positives = graph_mask(knn_graph(sim_h, 3), b)
    positives[0] = False
    mask = member_sets(positives).transpose(0, 1).contiguous().unsqueeze(2)
    relation = torch.randn(b, b, 3, generator=g, dtype=torch.float64)
    inputs = [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) for shape in ((b, h), (h, 3), (2 * n, h), (2 * n,))]
    member, pair, head_weight, head_bias = inputs

    def pooled(member, pair, head_weight, head_bias):
        weights = _PairPooling.apply(member, relation, pair, head_weight, head_bias, mask)
        return weights * torch.arange(1.0, b + 1, dtype=torch.float64)  # a non-uniform output gradient

    assert torch.autograd.gradcheck(pooled, inputs)
    weights = _PairPooling.apply(member, relation, pair, head_weight, head_bias, mask)
    assert torch.allclose(weights[1:].sum(-1), torch.ones(b - 1, 2 * n, dtype=torch.float64))
    assert torch.equal(weights[0, :n], torch.zeros(n, b, dtype=torch.float64))  # no positives: zero pooling


def test_generator_objective_gradient_matches_finite_differences():
    """The generator loss's hand-written gradient against gradcheck (float64), both with
    normalised and unnormalised proxies."""
    from cl_proxyfda.testing import clip_like_features

    z, _ = clip_like_features(10, 16, classes=3, seed=5)
    z = z.double()
    positives = graph_mask(knn_graph(z @ z.t(), 3), 10)
    positives[2] = False
    logits = torch.randn(10, 6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    sets = member_sets(positives)
    mask = sets.transpose(0, 1).repeat_interleave(3, dim=1)  # (B, 2n, B)
    for normalize in (True, False):
        def loss(logits):
            weights = torch.where(mask, torch.softmax(logits.masked_fill(~mask, -1e30), -1), 0.0)
            pooling = PoolingWeights(weights, sets.any(dim=2))
            return generator_loss(z, pooling, positives, min_members=3.0, diversity_target=0.9, normalize=normalize)

        assert float(loss(logits)) > 0
        assert torch.autograd.gradcheck(loss, (logits,))


def test_generator_attention_is_multihead_attention_with_one_head():
    """The generator's written-out attention equals nn.MultiheadAttention on the same
    parameters, value and gradients."""
    gen = ProxyGenerator(16, n_proxies=2, hidden=8).double()
    for p in gen.attn.parameters():
        torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(2))
    x = torch.randn(12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    ours = gen._attend(x)
    (theirs,) = gen.attn(x.unsqueeze(0), x.unsqueeze(0), x.unsqueeze(0), need_weights=False)[:1]
    assert torch.allclose(ours, theirs.squeeze(0), atol=1e-12)
    grads = [torch.autograd.grad(out.square().sum(), [x, gen.attn.in_proj_weight]) for out in (ours, theirs)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("normalize", [True, False])
def test_fda_loss_gradients_match_finite_differences(normalize):
    """The FDA loss's hand-written gradients (features, log tau, b), with proxies and
    ignored pairs, against gradcheck in float64 on CLIP-like features."""
    from cl_proxyfda.testing import clip_like_features

    raw, _ = clip_like_features(10, 12, classes=3, seed=6)
    zh, _ = clip_like_features(10, 12, classes=3, seed=7)
    raw, zh = raw.double().requires_grad_(True), zh.double()
    sim_h = zh @ zh.t()
    positives = graph_mask(knn_graph(sim_h, 3), 10)
    positives[4] = False  # anchor 4: no positives, no positive proxies
    gen = ProxyGenerator(12, n_proxies=2, hidden=6).double()
    pooling = gen(F.normalize(raw, dim=1), sim_h, positives)
    ignore = torch.zeros(10, 10, dtype=torch.bool)
    ignore[0, 5] = ignore[5, 0] = True
    log_tau = torch.tensor(math.log(0.3), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)

    def loss(raw, log_tau, bias):
        z = F.normalize(raw, dim=1)
        proxies = make_proxies(z, sim_h, pooling, "clamp0", normalize=normalize)
        return fda_loss(z, zh, 3, log_tau, bias, "clamp0", proxies, positives, ignore=ignore)

    assert torch.autograd.gradcheck(loss, (raw, log_tau, bias))
    assert torch.autograd.gradcheck(lambda raw: fda_loss(F.normalize(raw, dim=1), zh, 3, log_tau, bias, "one_minus"), (raw,))


def test_losses_under_no_grad_give_the_same_values():
    """Under torch.no_grad the fused losses skip their gradients and give the same values
    (CLIP-like features)."""
    from cl_proxyfda.testing import clip_like_features

    (z, _), (zh, _) = clip_like_features(32, 64, classes=8, seed=8), clip_like_features(32, 64, classes=8, seed=9)
    gen = ProxyGenerator(64)
    with_grad = full_step(z.clone().requires_grad_(True), zh, gen)
    with torch.no_grad():
        without = full_step(z.clone().requires_grad_(True), zh, gen)
    assert with_grad[0].requires_grad and not without[0].requires_grad and not without[1].requires_grad
    assert float(with_grad[0]) == pytest.approx(float(without[0]), rel=1e-6)
    assert float(with_grad[1]) == pytest.approx(float(without[1]), rel=1e-6)


def test_generator_loss_reading_the_proxies_cosines_is_the_same():
    """generator_loss(..., cosines=proxies.cosines), as the FDA head calls it, gives the
    value and generator gradients of computing them afresh (CLIP-like features)."""
    from cl_proxyfda.testing import clip_like_features

    (z, _), (zh, _) = clip_like_features(32, 64, classes=8, seed=10), clip_like_features(32, 64, classes=8, seed=11)
    gen = ProxyGenerator(64)
    sim_h = zh @ zh.t()
    positives = graph_mask(knn_graph(sim_h, 6), len(z))
    results = []
    for shared in (False, True):
        gen.zero_grad(set_to_none=True)
        pooling = gen(z, sim_h, positives)
        proxies = make_proxies(z, sim_h, pooling)
        loss = generator_loss(z, pooling, positives, cosines=proxies.cosines if shared else None)
        loss.backward()
        results.append((float(loss), torch.cat([p.grad.flatten() for p in gen.parameters()])))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])
