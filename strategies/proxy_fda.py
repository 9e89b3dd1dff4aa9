"""Proxy-FDA and FDA: keep the reference space's neighbourhood structure (docs/methods.md section 1).

``ProxyFDAPlugin`` adds ``weight * L_FDA + L_generator`` to the strategy's loss in
``before_backward``. The learnable ``tau``, ``b`` and the proxy generator live in the
plugin's own AdamW optimizer, stepped in ``after_update``; the generator loss reaches
only the generator (it reads detached features) and the FDA loss never reaches the
generator (its pooling weights are detached), so one backward serves both.

Its optimizer: AdamW with two groups, ``log tau`` and ``b`` (lr ``tau_bias_lr``, no
weight decay) and the generator (lr ``generator_lr``, AdamW's default weight decay
0.01). The generator is built at the first batch, when the feature size is known.

Registered as ``proxy_fda`` (proxies on) and ``fda`` (the same plugin without proxies).

The graph is the in-batch kNN graph of the reference space: ``R_i`` = the K most similar
batch members of anchor i (docs/methods.md section 1, step 3). A ``graph: bank`` option (neighbours from a
feature bank of the whole training set) existed and was removed: an anchor's K nearest
training images are almost never in its batch, so it found 0.3 positives per anchor per
batch on the demo stream (random batches 0.30, class-balanced 0.29, against 8 for the
batch graph; BENCHMARKS.md), and it regularised less (control 23.1 vs 34.1, one seed).
Making it work needs a sampler that brings each anchor's bank neighbours into its batch.
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from cl_proxyfda.distributed import average_gradients, broadcast_from_main
from cl_proxyfda.errors import UserError
from cl_proxyfda.losses.fda import (
    ProxyGenerator,
    fda_loss,
    generator_loss,
    graph_mask,
    knn_graph,
    make_proxies,
    proxy_diagnostics,
)
from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.base import CLPlugin
from cl_proxyfda.teacher import student_outputs, teacher_bank, teacher_outputs, unwrap

_LAYER = re.compile(r"^(embed|ln_pre|block[1-9][0-9]*)$")


class FDAParams(BaseModel):
    """Options of FDA (Proxy-FDA without proxies).

    Defaults of tau and b **[choice]**, from ``tools/fda_defaults.py`` on CLIP-like
    features (64 x 512, a shared direction, pairwise cosines 0.67-0.74; BENCHMARKS.md):
    at b = 0 (and tau 0.1) the loss barely prefers the reference to a shuffled copy of
    itself (1.5%) and minimising it alone drives the features away (cos(z, zh) 0.39,
    mean pairwise cosine 0.70 -> 0.0): non-neighbour pushes dominate. At b = -10 the
    reference scores 20% below the shuffled copy and minimising keeps cos(z, zh) at
    0.82. Fitting tau and b to minimise the loss at the reference from b = 0 ends at
    tau 0.62, b -3.6 with a feature gradient 50x smaller, so they are fixed by default.

    Batches: with ``train.sampler: auto`` (the default) a run with FDA gets the
    class-balanced, hard-mined sampler (m classes x n images, m = batch size / n). A task
    with fewer classes than m gets all its classes with batch size / C images each
    (EuroSAT: 6-7 of each of its 10 classes in a batch of 64), so an anchor's same-class
    batch-mates can outnumber its K neighbours; with ``same_class: neutral`` **[choice]**
    those beyond the K neighbours are left out of the loss rather than pushed apart (as
    non-neighbours most similar in the reference space, they would be pushed hardest).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    weight: float = Field(1.0, ge=0, description="lambda, the weight of the FDA loss (tune per setting)")
    k: int = Field(8, ge=1, le=65536, description="K neighbours in the reference-space graph; must be < batch size and > images per class")
    tau_init: float = Field(0.1, gt=0, description="temperature tau (log-parametrised) [choice: 0.1, see the class docstring]")
    bias_init: float = Field(-10.0, description="bias b of S / tau + b [choice: -10, SigLIP's initialisation, see the class docstring]")
    learn_tau_bias: bool = Field(False, description="learn tau and b by minimising the loss [choice: false, it can flatten the regulariser]")
    tau_bias_lr: float = Field(
        1e-2, gt=0, description="AdamW learning rate of log tau and b (1e-2 lets b settle within ~1000 steps; see losses/fda.py)"
    )
    feature: str = Field("embed", description="'embed' (final image embedding) or a layer: ln_pre, block1, block2, ...")
    reference: Literal["pretrained", "previous"] = Field("pretrained", description="the frozen reference f0")
    neg_weight: Literal["clamp0", "minus_one", "one_minus"] = Field("clamp0", description="non-neighbour weight: -max(Sh,0), -1 or -(1-Sh)")
    graph: Literal["batch"] = Field("batch", description="the reference-space kNN graph of each batch (the only graph)")
    same_class: Literal["neutral", "push"] = Field(
        "neutral",
        description="same-class batch members outside the K neighbours: left out of the loss [choice] or pushed apart like any non-neighbour",
    )

    def check_run(self, cfg: Any) -> None:
        """K must be below the batch size, and above images-per-class when batches are class-balanced."""
        if self.k >= cfg.train.batch_size:
            raise ValueError(f"k: K = {self.k} neighbours need batches of more than K images (train.batch_size = {cfg.train.batch_size})")
        if cfg.sampler_layout()[0] == "class_balanced" and self.k <= cfg.train.images_per_class:
            raise ValueError(f"k: K = {self.k} must exceed train.images_per_class = {cfg.train.images_per_class}, or the graph holds only same-class images")

    @field_validator("graph", mode="before")
    @classmethod
    def _graph_bank_removed(cls, value: Any) -> Any:
        if value == "bank":
            raise ValueError("graph: bank was removed: it found 0.3 positives per anchor per batch (see the strategy's docstring); use batch")
        return value

    @field_validator("feature")
    @classmethod
    def _known_feature(cls, value: str) -> str:
        if not _LAYER.match(value):
            raise ValueError(f"feature must be 'embed', 'ln_pre' or 'block<i>', got {value!r}")
        return value


class ProxyFDAParams(FDAParams):
    """Options of Proxy-FDA (FDA plus generated proxies)."""

    proxies: bool = Field(True, description="add generated proxies (false: plain FDA)")
    n_proxies: int = Field(4, ge=1, le=65536, description="proxies per positive and per negative set")
    generator_lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the proxy generator")
    generator_alpha: float = Field(1.0, ge=0, description="weight of the diversity term in the generator loss")
    generator_temperature: float = Field(0.1, gt=0, description="temperature of the generator's InfoNCE terms")
    generator_hardness: float = Field(10.0, ge=0, description="weight of the hard-proxy hinges (proxies no easier than the average member)")
    generator_min_members: float = Field(2.0, ge=1, description="entropy floor: each proxy pools at least this many members (exp of entropy)")
    generator_entropy_weight: float = Field(1.0, ge=0, description="weight of the entropy floor in the generator loss")
    normalize_proxies: bool = Field(True, description="project proxies back onto the unit sphere [choice: true, new points, not averages]")


@STRATEGIES.register("proxy_fda", help="Proxy-FDA: neighbourhood-preserving feature alignment with generated proxies")
class ProxyFDAPlugin(CLPlugin):
    """Adds ``weight * L_FDA (+ proxies) + L_generator`` in ``before_backward``."""

    Params = ProxyFDAParams
    params: ProxyFDAParams

    def __init__(self, params: ProxyFDAParams | FDAParams | None = None, /, *, run: Any = None, **kwargs: Any) -> None:
        super().__init__(params, run=run, **kwargs)
        params = self.params
        if not isinstance(params, ProxyFDAParams):  # plain FDA options: proxies off
            params = ProxyFDAParams(**params.model_dump(), proxies=False)
        self.params = params
        self.name = "proxy_fda" if params.proxies else "fda"
        self.needs_layers = () if params.feature == "embed" else (params.feature,)
        self.head = nn.Module()
        self.head.log_tau = nn.Parameter(torch.tensor(math.log(params.tau_init)), requires_grad=params.learn_tau_bias)
        self.head.bias = nn.Parameter(torch.tensor(float(params.bias_init)), requires_grad=params.learn_tau_bias)
        self.generator: ProxyGenerator | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.dim: int | None = None
        self.positives_per_anchor = 0.0  # mean graph degree of the last batch (diagnostic)
        self.diagnostics: dict[str, float] = {}  # proxy diagnostics of the last experience (means)
        self._proxy_sums: dict[str, float] = {}
        self._proxy_batches = 0
        self._steps = 0  # generator steps so far (diagnostics are taken on every DIAGNOSTICS_EVERY-th)
        if not params.proxies:
            self._setup(None)

    # ------------------------------------------------------------------ state
    @property
    def tau(self) -> float:
        return float(self.head.log_tau.detach().exp())

    @property
    def bias(self) -> float:
        return float(self.head.bias.detach())

    def _setup(self, dim: int | None) -> None:
        """Create the generator (once the feature size is known) and the optimizer."""
        groups = []
        if self.params.learn_tau_bias:
            groups.append({"params": [self.head.log_tau, self.head.bias], "lr": self.params.tau_bias_lr, "weight_decay": 0.0})
        if self.params.proxies:
            assert dim is not None
            self.dim = dim
            self.generator = ProxyGenerator(dim, self.params.n_proxies).to(self.head.log_tau.device)
            broadcast_from_main(self.generator.parameters())  # one generator, whatever the process
            self.head.generator = self.generator
            groups.append({"params": list(self.generator.parameters()), "lr": self.params.generator_lr})
        self.optimizer = _adamw(groups) if groups else None

    def _to_device(self, device: torch.device) -> None:
        if self.head.log_tau.device == device:
            return
        state = self.optimizer.state_dict() if self.optimizer is not None else None
        self.head.to(device)
        if self.optimizer is not None and state is not None:
            self.optimizer.load_state_dict(state)  # moves the moment estimates to the new device

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_tau": self.head.log_tau.detach().cpu().clone(),
            "bias": self.head.bias.detach().cpu().clone(),
            "dim": -1 if self.dim is None else int(self.dim),
            "generator": {} if self.generator is None else {k: v.detach().cpu().clone() for k, v in self.generator.state_dict().items()},
            "optimizer": {} if self.optimizer is None else self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        unknown = set(state) - {"log_tau", "bias", "dim", "generator", "optimizer"}
        if unknown:
            raise ValueError(f"plugin {self.name} got state it does not know: {sorted(unknown)}")
        with torch.no_grad():
            self.head.log_tau.copy_(state["log_tau"])
            self.head.bias.copy_(state["bias"])
        if self.params.proxies and state["dim"] > 0:
            if self.generator is None or self.dim != state["dim"]:
                self._setup(int(state["dim"]))
            self.generator.load_state_dict(state["generator"])
        if self.optimizer is not None and state["optimizer"]:
            self.optimizer.load_state_dict(state["optimizer"])

    # --------------------------------------------------------------- features
    def _student_features(self, strategy: Any) -> Tensor:
        out = student_outputs(strategy)
        if self.params.feature == "embed":
            return out["image_embeds"].float()
        layers = out.get("layers", {})
        if self.params.feature not in layers:
            raise UserError(f"{self.name}: the model did not record layer {self.params.feature!r} (capture_layers was not called)")
        return F.normalize(layers[self.params.feature].float(), dim=-1)

    def _teacher_features(self, strategy: Any) -> Tensor:
        if self.params.feature == "embed":
            return teacher_outputs(strategy, self.params.reference)["image_embeds"].float()
        out = teacher_outputs(strategy, self.params.reference, self.needs_layers)
        return F.normalize(out["layers"][self.params.feature].float(), dim=-1)

    def _graph(self, sim_h: Tensor) -> Tensor:
        """The (B, B) positive mask of the batch: each anchor's K nearest in the reference space."""
        b = sim_h.shape[0]
        k = min(self.params.k, b - 1)  # a short last batch keeps working with fewer neighbours
        return graph_mask(knn_graph(sim_h, k), b)

    # -------------------------------------------------------------- callbacks
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        batch = getattr(strategy, "train_mb_size", None)
        if batch is not None and self.params.k >= batch:
            raise UserError(f"{self.name}.k: K = {self.params.k} neighbours need batches of more than K images (batch size {batch})")
        if self.needs_layers:
            unwrap(strategy.model).capture_layers(self.needs_layers)
        if self.params.reference == "previous":
            teacher_bank(strategy).refresh_previous(strategy.model)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        z = self._student_features(strategy)
        if z.shape[0] < 2:
            return
        labels = getattr(strategy, "mb_y", None)
        loss, gen_loss = self.losses(z, self._teacher_features(strategy), labels if isinstance(labels, Tensor) else None)
        self.loss_terms[self.name] = float(loss.detach())
        total = self.params.weight * loss
        if gen_loss is not None:
            self.loss_terms[f"{self.name}_generator"] = float(gen_loss.detach())
            total = total + gen_loss
        strategy.loss = strategy.loss + total

    def losses(self, z: Tensor, zh: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(FDA loss, generator loss or None) of one batch of student / reference features.

        The whole method on tensors: graph, proxies, both losses (``labels`` lets
        ``same_class: neutral`` leave same-class non-neighbours out). Call
        :meth:`after_update` after the backward to step tau, b and the generator.
        """
        self._to_device(z.device)
        if self.params.proxies and self.generator is None:
            self._setup(z.shape[1])  # on z's device, so that it can be broadcast there
        p = self.params
        sim_h = zh @ zh.t()
        positives = self._graph(sim_h)
        self.positives_per_anchor = float(positives.sum(dim=1).float().mean())
        proxies = None
        gen_loss = None
        if self.generator is not None:
            pooling = self.generator(z, sim_h, positives)
            proxies = make_proxies(z, sim_h, pooling, p.neg_weight, normalize=p.normalize_proxies)
            gen_loss = generator_loss(
                z, pooling, positives, temperature=p.generator_temperature, alpha=p.generator_alpha, hardness=p.generator_hardness,
                min_members=p.generator_min_members, entropy_weight=p.generator_entropy_weight, normalize=p.normalize_proxies,
            )
            if self._steps % DIAGNOSTICS_EVERY == 0:  # a sample of batches: each value is a host sync on GPU
                self._record(proxy_diagnostics(z, pooling, positives, normalize=p.normalize_proxies))
            self._steps += 1
        ignore = None
        if p.same_class == "neutral" and labels is not None and labels.shape[0] == z.shape[0]:
            labels = labels.to(z.device)
            ignore = labels.unsqueeze(0) == labels.unsqueeze(1)
        loss = fda_loss(z, zh, p.k, self.head.log_tau, self.head.bias, p.neg_weight, proxies, positives, ignore=ignore)
        return loss, gen_loss

    def _record(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._proxy_sums[key] = self._proxy_sums.get(key, 0.0) + value
        self._proxy_batches += 1

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        """Publish the experience's mean proxy diagnostics (members pooled, hull distance, hardness)."""
        if self._proxy_batches:
            self.diagnostics = {f"{self.name}_{k}": v / self._proxy_batches for k, v in self._proxy_sums.items()}
        self._proxy_sums, self._proxy_batches = {}, 0

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        if self.optimizer is not None:
            # Under torchrun each process saw its own share of the batch: average the
            # gradients of tau, b and the generator so their copies stay identical.
            average_gradients(p for group in self.optimizer.param_groups for p in group["params"])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


DIAGNOSTICS_EVERY = 10  # proxy diagnostics on one batch in ten


def _adamw(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW, fused where torch has the kernel (6x faster for the generator's small tensors on CPU)."""
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups)


@STRATEGIES.register("fda", help="FDA: neighbourhood-preserving feature alignment (Proxy-FDA without proxies)")
class FDAPlugin(ProxyFDAPlugin):
    """Proxy-FDA with proxies off (its options: ``FDAParams``)."""

    Params = FDAParams
