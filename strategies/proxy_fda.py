"""Proxy-FDA and FDA: keep the reference space's neighbourhood structure (docs/methods.md section 1).

``ProxyFDAPlugin`` adds ``weight * L_FDA + L_generator`` to the strategy's loss in
``before_backward``. The learnable ``tau``, ``b`` and the proxy generator, with their
own AdamW, are the shared :class:`~cl_proxyfda.strategies.fda_head.FDAHead` (also used
by ``prompt_fda``), stepped in ``after_update``.

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

import re
from typing import Any, Literal


import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from cl_proxyfda.errors import UserError
from cl_proxyfda.losses.proxy_generator import ProxyGenerator
from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.base import CLPlugin
from cl_proxyfda.strategies.fda_head import FDAHead, FDALossParams, ProxyOptions
from cl_proxyfda.teacher import student_outputs, teacher_bank, teacher_outputs, unwrap

_LAYER = re.compile(r"^(embed|ln_pre|block[1-9][0-9]*)$")


class FDAParams(FDALossParams):
    """Options of FDA (Proxy-FDA without proxies): the loss's own (tau and b **[choice]**,
    see ``FDALossParams``) plus which features and which reference.

    Batches: with ``train.sampler: auto`` (the default) a run with FDA gets the
    class-balanced, hard-mined sampler (m classes x n images, m = batch size / n). A task
    with fewer classes than m gets all its classes with batch size / C images each
    (EuroSAT: 6-7 of each of its 10 classes in a batch of 64), so an anchor's same-class
    batch-mates can outnumber its K neighbours; with ``same_class: neutral`` **[choice]**
    those beyond the K neighbours are left out of the loss rather than pushed apart (as
    non-neighbours most similar in the reference space, they would be pushed hardest).
    """

    feature: str = Field("embed", description="'embed' (final image embedding) or a layer: ln_pre, block1, block2, ...")
    reference: Literal["pretrained", "previous"] = Field("pretrained", description="the frozen reference f0")
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


class ProxyFDAParams(ProxyOptions, FDAParams):
    """Options of Proxy-FDA: FDA's plus the generated proxies' (``ProxyOptions``)."""


@STRATEGIES.register("proxy_fda", help="Proxy-FDA: neighbourhood-preserving feature alignment with generated proxies")
class ProxyFDAPlugin(CLPlugin):
    """Adds ``weight * L_FDA (+ proxies) + L_generator`` in ``before_backward``; tau, b and
    the generator (the shared :class:`FDAHead`) step in ``after_update``."""

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
        self.head = FDAHead(params, params)
        self.diagnostics: dict[str, float] = {}  # proxy diagnostics of the last experience (means)

    @property
    def generator(self) -> ProxyGenerator | None:
        return self.head.generator

    @property
    def tau(self) -> float:
        return self.head.tau

    @property
    def bias(self) -> float:
        return float(self.head.bias.detach())

    @property
    def positives_per_anchor(self) -> float:
        return self.head.positives_per_anchor

    def state_dict(self) -> dict[str, Any]:
        return self.head.checkpoint_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        unknown = set(state) - FDAHead.STATE_KEYS
        if unknown:
            raise ValueError(f"plugin {self.name} got state it does not know: {sorted(unknown)}")
        self.head.load_checkpoint_state(state)

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
        ignore = None
        if self.params.same_class == "neutral" and labels is not None and labels.shape[0] == z.shape[0]:
            labels = labels.to(z.device)
            ignore = labels.unsqueeze(0) == labels.unsqueeze(1)
        return self.head.losses(z, zh, ignore)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        """Publish the experience's mean proxy diagnostics (members pooled, hull distance, hardness)."""
        taken = self.head.take_diagnostics()
        if taken:
            self.diagnostics = {f"{self.name}_{k}": v for k, v in taken.items()}

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        self.head.step()


@STRATEGIES.register("fda", help="FDA: neighbourhood-preserving feature alignment (Proxy-FDA without proxies)")
class FDAPlugin(ProxyFDAPlugin):
    """Proxy-FDA with proxies off (its options: ``FDAParams``)."""

    Params = FDAParams
