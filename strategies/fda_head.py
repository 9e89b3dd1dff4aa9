"""The learnable part of (Proxy-)FDA, shared by ``proxy_fda``/``fda`` and ``prompt_fda``.

:class:`FDAHead` holds ``log tau``, ``b``, the proxy generator, their own AdamW and the
proxy diagnostics; ``losses(z, zh)`` runs the whole method on one set of anchors (graph,
proxies, FDA loss, generator loss) and ``step()`` updates tau, b and the generator after
the model's backward. The plugins only decide *which* features are the anchors: image
features of the batch (``proxy_fda``) or class text embeddings (``prompt_fda``).

Its optimizer: AdamW with two groups, ``log tau`` and ``b`` (lr ``tau_bias_lr``, no
weight decay; only when ``learn_tau_bias``) and the generator (lr ``generator_lr``,
AdamW's default weight decay 0.01). The generator is built at the first call, when the
feature size is known. The generator loss reaches only the generator (it reads detached
features) and the FDA loss never reaches the generator (its pooling weights are
detached), so one backward serves both.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from cl_proxyfda.distributed import average_gradients, broadcast_from_main
from cl_proxyfda.losses.fda import fda_loss, graph_mask, knn_graph, make_proxies
from cl_proxyfda.losses.proxy_generator import ProxyGenerator, generator_loss, proxy_diagnostics

DIAGNOSTICS_EVERY = 10  # proxy diagnostics on one batch in ten (each value is a host sync on GPU)


class FDALossParams(BaseModel):
    """Options of the FDA loss itself (every FDA-family plugin has them).

    Defaults of tau and b **[choice]**, from ``tools/fda_defaults.py`` on CLIP-like
    features (64 x 512, a shared direction, pairwise cosines 0.67-0.74; BENCHMARKS.md):
    at b = 0 (and tau 0.1) the loss barely prefers the reference to a shuffled copy of
    itself (1.5%) and minimising it alone drives the features away (cos(z, zh) 0.39,
    mean pairwise cosine 0.70 -> 0.0): non-neighbour pushes dominate. At b = -10 the
    reference scores 20% below the shuffled copy and minimising keeps cos(z, zh) at
    0.82. Fitting tau and b to minimise the loss at the reference from b = 0 ends at
    tau 0.62, b -3.6 with a feature gradient 50x smaller, so they are fixed by default.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    weight: float = Field(1.0, ge=0, description="lambda, the weight of the FDA loss (tune per setting)")
    k: int = Field(8, ge=1, le=65536, description="K neighbours in the reference-space graph (capped at anchors - 1)")
    tau_init: float = Field(0.1, gt=0, description="temperature tau (log-parametrised) [choice: 0.1, see docs/proxy_fda.md]")
    bias_init: float = Field(-10.0, description="bias b of S / tau + b [choice: -10, SigLIP's initialisation, see docs/proxy_fda.md]")
    learn_tau_bias: bool = Field(False, description="learn tau and b by minimising the loss [choice: false, it can flatten the regulariser]")
    tau_bias_lr: float = Field(
        1e-2, gt=0, description="AdamW learning rate of log tau and b (1e-2 lets b settle within ~1000 steps; used only with learn_tau_bias)"
    )
    neg_weight: Literal["clamp0", "minus_one", "one_minus"] = Field("clamp0", description="non-neighbour weight: -max(Sh,0), -1 or -(1-Sh)")


class ProxyOptions(BaseModel):
    """Options of the generated proxies (Proxy-FDA)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    proxies: bool = Field(True, description="add generated proxies (false: plain FDA)")
    n_proxies: int = Field(4, ge=1, le=65536, description="proxies per positive and per negative set")
    generator_hidden: int = Field(
        16, ge=1, le=4096, description="hidden width of the proxy generator [choice: 16, see docs/proxy_fda.md: the step's cost scales with it]"
    )
    generator_lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the proxy generator")
    generator_alpha: float = Field(1.0, ge=0, description="weight of the diversity term in the generator loss")
    generator_temperature: float = Field(0.1, gt=0, description="temperature of the generator's InfoNCE terms")
    generator_hardness: float = Field(10.0, ge=0, description="weight of the hard-proxy hinges (proxies no easier than the average member)")
    generator_min_members: float = Field(2.0, ge=1, description="entropy floor: each proxy pools at least this many members (exp of entropy)")
    generator_entropy_weight: float = Field(1.0, ge=0, description="weight of the entropy floor in the generator loss")
    normalize_proxies: bool = Field(True, description="project proxies back onto the unit sphere [choice: true, new points, not averages]")


NO_PROXIES = ProxyOptions(proxies=False)


class FDAHead(nn.Module):
    """``log tau``, ``b``, the proxy generator, their AdamW and diagnostics (see the module doc).

    ``losses(z, zh, ignore)`` returns ``(FDA loss, generator loss or None)``; add
    ``weight * fda + generator`` to the model's loss, backward, step the model, then call
    :meth:`step`. ``checkpoint_state``/``load_checkpoint_state`` carry everything.
    """

    def __init__(self, loss: FDALossParams, proxies: ProxyOptions = NO_PROXIES) -> None:
        super().__init__()
        self.loss_params = loss
        self.proxy_options = proxies
        self.log_tau = nn.Parameter(torch.tensor(math.log(loss.tau_init)), requires_grad=loss.learn_tau_bias)
        self.bias = nn.Parameter(torch.tensor(float(loss.bias_init)), requires_grad=loss.learn_tau_bias)
        self.generator: ProxyGenerator | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.dim: int | None = None
        self.positives_per_anchor = 0.0  # mean graph degree of the last call (diagnostic)
        self._proxy_sums: dict[str, float] = {}
        self._proxy_batches = 0
        self._steps = 0  # generator calls so far (diagnostics are taken on every DIAGNOSTICS_EVERY-th)
        if not proxies.proxies:
            self._setup(None)

    @property
    def tau(self) -> float:
        return float(self.log_tau.detach().exp())

    def _setup(self, dim: int | None) -> None:
        """Create the generator (once the feature size is known) and the optimizer."""
        groups = []
        if self.loss_params.learn_tau_bias:
            groups.append({"params": [self.log_tau, self.bias], "lr": self.loss_params.tau_bias_lr, "weight_decay": 0.0})
        if self.proxy_options.proxies:
            assert dim is not None
            self.dim = dim
            self.generator = ProxyGenerator(dim, self.proxy_options.n_proxies, self.proxy_options.generator_hidden).to(self.log_tau.device)
            broadcast_from_main(self.generator.parameters())  # one generator, whatever the process
            groups.append({"params": list(self.generator.parameters()), "lr": self.proxy_options.generator_lr})
        self.optimizer = _adamw(groups) if groups else None

    def _to_device(self, device: torch.device) -> None:
        if self.log_tau.device == device:
            return
        state = self.optimizer.state_dict() if self.optimizer is not None else None
        self.to(device)
        if self.optimizer is not None and state is not None:
            self.optimizer.load_state_dict(state)  # moves the moment estimates to the new device

    # ------------------------------------------------------------------ the loss
    def losses(self, z: Tensor, zh: Tensor, ignore: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(FDA loss, generator loss or None) of anchors ``z`` (with gradient) and their
        reference ``zh``; ``ignore`` (N, N) marks pairs left out of the loss."""
        self._to_device(z.device)
        if self.proxy_options.proxies and self.generator is None:
            self._setup(z.shape[1])  # on z's device, so that it can be broadcast there
        p, o = self.loss_params, self.proxy_options
        n = z.shape[0]
        k = min(p.k, n - 1)  # a short batch / few anchors keep working with fewer neighbours
        sim_h = zh @ zh.t()
        positives = graph_mask(knn_graph(sim_h, k), n)
        self.positives_per_anchor = float(k)  # the in-batch kNN graph has exactly k per anchor
        sim = z @ z.t()  # computed once for every part below
        proxies = gen_loss = None
        if self.generator is not None:
            pooling = self.generator(z, sim_h, positives, sim=sim)
            proxies = make_proxies(z, sim_h, pooling, p.neg_weight, normalize=o.normalize_proxies, sim=sim)
            gen_loss = generator_loss(
                z, pooling, positives, temperature=o.generator_temperature, alpha=o.generator_alpha, hardness=o.generator_hardness,
                min_members=o.generator_min_members, entropy_weight=o.generator_entropy_weight, normalize=o.normalize_proxies, sim=sim,
                cosines=proxies.cosines,
            )
            if self._steps % DIAGNOSTICS_EVERY == 0:
                self._record(proxy_diagnostics(z, pooling, positives, normalize=o.normalize_proxies))
            self._steps += 1
        loss = fda_loss(z, zh, k, self.log_tau, self.bias, p.neg_weight, proxies, positives, ignore=ignore, sim=sim, sim_h=sim_h)
        return loss, gen_loss

    def step(self) -> None:
        """Step tau, b and the generator (after the model's backward). Under torchrun each
        process saw its own anchors: their gradients are averaged so the copies stay equal."""
        if self.optimizer is not None:
            average_gradients(q for group in self.optimizer.param_groups for q in group["params"])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    # ---------------------------------------------------------------- diagnostics
    def _record(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._proxy_sums[key] = self._proxy_sums.get(key, 0.0) + value
        self._proxy_batches += 1

    def take_diagnostics(self) -> dict[str, float]:
        """Mean proxy diagnostics since the last call (members pooled, hull distance, hardness)."""
        out = {k: v / self._proxy_batches for k, v in self._proxy_sums.items()} if self._proxy_batches else {}
        self._proxy_sums, self._proxy_batches = {}, 0
        return out

    # --------------------------------------------------------------------- state
    STATE_KEYS = frozenset({"log_tau", "bias", "dim", "generator", "optimizer"})

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "log_tau": self.log_tau.detach().cpu().clone(),
            "bias": self.bias.detach().cpu().clone(),
            "dim": -1 if self.dim is None else int(self.dim),
            "generator": {} if self.generator is None else {k: v.detach().cpu().clone() for k, v in self.generator.state_dict().items()},
            "optimizer": {} if self.optimizer is None else self.optimizer.state_dict(),
        }

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.log_tau.copy_(state["log_tau"])
            self.bias.copy_(state["bias"])
        if self.proxy_options.proxies and state["dim"] > 0 and (self.generator is None or self.dim != state["dim"]):
            self._setup(int(state["dim"]))
        if self.generator is not None and state["generator"]:
            self.generator.load_state_dict(state["generator"])
        if self.optimizer is not None and state["optimizer"]:
            self.optimizer.load_state_dict(state["optimizer"])


def _adamw(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW, fused where torch has the kernel (6x faster for the generator's small tensors on CPU)."""
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups)
