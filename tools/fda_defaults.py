"""Which tau / b make the FDA loss hold the reference structure on CLIP-like features?

An experiment, not a test: for each (tau, b) it measures on CLIP-like features (one big
shared direction, class structure, pairwise cosines ~0.6-0.9):

- ``margin``: how far the loss at the reference (z = zh) lies below the loss at a
  shuffled copy (z = zh[perm]), as 1 - L(ref) / L(shuffled);
- ``cos``: mean cos(z_i, zh_i) after minimising the FDA loss alone from the reference
  (Adam on the raw features, renormalised), i.e. whether the loss by itself keeps the
  features where they are or drives them away;
- ``mean_cos``: the mean pairwise cosine after that minimisation (0.7 at the start).

Run: ``python tools/fda_defaults.py`` (one CPU thread, about a minute).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cl_proxyfda.losses.fda import fda_loss
from cl_proxyfda.testing import clip_like_features


def centred_bias(zh: torch.Tensor, tau: float, k: int = 8) -> float:
    """b that puts the logit S / tau + b at 0 midway between a K-th neighbour and a typical pair."""
    sim = zh @ zh.t()
    off = ~torch.eye(len(zh), dtype=torch.bool)
    kth = sim.masked_fill(~off, -2).topk(k, dim=1).values[:, -1].mean()
    return float(-(kth + sim[off].mean()) / 2 / tau)


def measure(zh: torch.Tensor, tau: float, bias: float, k: int = 8, rule: str = "clamp0", steps: int = 300) -> dict[str, float]:
    log_tau, b = torch.tensor(math.log(tau)), torch.tensor(bias)
    perm = torch.randperm(len(zh), generator=torch.Generator().manual_seed(1))
    ref = float(fda_loss(zh, zh, k, log_tau, b, rule))
    shuffled = float(fda_loss(zh[perm], zh, k, log_tau, b, rule))
    raw = zh.clone().requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=1e-2)
    for _ in range(steps):
        z = F.normalize(raw, dim=1)
        loss = fda_loss(z, zh, k, log_tau, b, rule)
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = F.normalize(raw.detach(), dim=1)
    off = ~torch.eye(len(z), dtype=torch.bool)
    return {"margin": 1 - ref / shuffled, "cos": float((z * zh).sum(1).mean()), "mean_cos": float((z @ z.t())[off].mean())}


def main() -> None:
    torch.set_num_threads(1)
    zh, _ = clip_like_features()
    off = ~torch.eye(len(zh), dtype=torch.bool)
    sims = (zh @ zh.t())[off]
    print(f"features: 64 x 512, pairwise cosine mean {sims.mean():.2f}, 5-95% {sims.quantile(0.05):.2f}-{sims.quantile(0.95):.2f}")
    print("| tau | b | rule | reference below shuffled | cos(z, zh) after minimising | mean pairwise cos after |")
    print("|---|---|---|---|---|---|")
    for rule in ("clamp0", "minus_one"):
        for tau in (0.1, 0.05):
            for bias in (0.0, -5.0, -10.0, -15.0, centred_bias(zh, tau)):
                m = measure(zh, tau, bias, rule=rule)
                print(f"| {tau} | {bias:.1f} | {rule} | {100 * m['margin']:.1f}% | {m['cos']:.3f} | {m['mean_cos']:.3f} |")
    print()
    print("Fitting tau and b to minimise the loss at the reference (what learn_tau_bias does), from tau 0.1:")
    print("| b init | fitted tau | fitted b | feature-gradient norm, fitted / initial |")
    print("|---|---|---|---|")
    for bias in (0.0, -10.0):
        tau, b, ratio = fitted(zh, bias)
        print(f"| {bias:g} | {tau:.2f} | {b:.2f} | {ratio:.2g} |")


def fitted(zh: torch.Tensor, bias: float, k: int = 8, steps: int = 1000) -> tuple[float, float, float]:
    """Fit log tau and b at the reference; return tau, b and how the feature gradient shrank."""
    log_tau = torch.tensor(math.log(0.1), requires_grad=True)
    b = torch.tensor(bias, requires_grad=True)

    def grad_norm() -> float:
        z = F.normalize(zh + 0.05 * torch.randn(zh.shape, generator=torch.Generator().manual_seed(2)), dim=1).requires_grad_(True)
        fda_loss(z, zh, k, log_tau.detach(), b.detach()).backward()
        return float(z.grad.norm())

    before = grad_norm()
    opt = torch.optim.Adam([log_tau, b], lr=1e-2)
    for _ in range(steps):
        loss = fda_loss(zh, zh, k, log_tau, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(log_tau.detach().exp()), float(b.detach()), grad_norm() / before


if __name__ == "__main__":
    main()
