"""Infusing's generic-set distillation (``infusing_generic``): generic batches alternate
with downstream ones, their embeddings distilled to the pre-trained model's."""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch.utils.data import Dataset

from cl_proxyfda.criterion_gate import criterion_gate
from cl_proxyfda.errors import UserError
from cl_proxyfda.evaluation import TaskEvaluator
from cl_proxyfda.losses.infusing import distill_weight_for_dim, embedding_distillation
from cl_proxyfda.models import model_transforms
from cl_proxyfda.side_data import SideBatches, embed_images
from cl_proxyfda.strategies.base import CLPlugin, RunContext
from cl_proxyfda.strategies.infusing.data import IndexedImages, generic_dataset, stratified_split, task_id_of
from cl_proxyfda.strategies.infusing.source import GENERIC_BATCH
from cl_proxyfda.synthetic import autocast_context
from cl_proxyfda.teacher import student_outputs, teacher_bank, unwrap


class GenericParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    source: Literal["reference", "control", "folder"] = Field("reference", description="generic images: the stream's reference images, its control test set, or a folder")
    root: str | None = Field(None, description="source folder: images under root, labelled by parent folder")
    weight: float | Literal["auto"] = Field("auto", description="lambda_d; auto = 1000 * D / 768")
    mode: Literal["alternate", "joint"] = Field("alternate", description="one source per batch (paper) or both every iteration")
    generic_every: int = Field(2, ge=2, le=10_000_000, description="alternate: iteration k is generic when (k + 1) % generic_every == 0")
    batch_size: int | None = Field(None, gt=0, le=65536, description="generic batch size (default train.batch_size)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="generic images held out for model selection")
    limit: int | None = Field(None, gt=0, description="use at most this many generic images (seeded)")


class GenericDistillPlugin(CLPlugin):
    """Embedding distillation on generic batches, alternating with downstream batches.

    On a generic iteration the plugin swaps the mini-batch for a generic batch before the
    forward and mutes the strategy's criterion for that batch (reason
    :data:`~cl_proxyfda.strategies.infusing.source.GENERIC_BATCH` of the criterion gate,
    which the other parts read as the batch's source).

    Options (:class:`GenericParams`, read as ``self.params.x``): ``source`` / ``root``
    (where the generic images come from, when the set is not given from Python),
    ``weight`` (lambda_d; ``auto`` = ``1000 * D / 768`` for D-dimensional embeddings),
    ``mode`` (``alternate``: one source per batch, the paper; ``joint``: every iteration
    one downstream and one generic batch, losses summed), ``generic_every`` (alternate:
    iteration k, 0-based, is generic when ``(k + 1) % generic_every == 0``; 2 alternates
    1:1), ``batch_size`` (default: the run's train batch size, or the strategy's
    ``train_mb_size``), ``val_fraction`` (share held out for model selection) and
    ``limit`` (a seeded subset of at most this many images).

    From the run (:meth:`context`): the seed of the subset, the split and the generic
    batch order; the eval batch size and workers of the one-time target computation and
    the loaders; ``augment`` (generic training batches use the model's train transform,
    else its eval transform).

    Python-only argument (keyword-only, or the one positional argument):
        generic: the generic image set, yielding ``(PIL image, label)`` (labels serve only
            the k-NN validation score); default: ``source`` / ``root`` of the params with
            the run's stream (:func:`~cl_proxyfda.strategies.infusing.data.generic_dataset`).
    """

    Params = GenericParams
    name = "infusing_generic"
    params: GenericParams

    def __init__(
        self,
        params: GenericParams | Dataset | None = None,
        /,
        *,
        run: RunContext | None = None,
        generic: Dataset | None = None,
        **kwargs: Any,
    ) -> None:
        if params is not None and not isinstance(params, BaseModel):  # GenericDistillPlugin(images, ...)
            if generic is not None:
                raise TypeError("GenericDistillPlugin: give the generic set once (positionally or as generic=)")
            params, generic = None, params
        super().__init__(params, run=run, **kwargs)
        from cl_proxyfda.benchmarks.image_folder import limit_indices
        from cl_proxyfda.benchmarks.stream import dataset_targets

        ctx = self.context()
        if generic is None:
            generic = generic_dataset(self.params.source, self.params.root, ctx.stream)
        self.generic = generic
        self.weight_option = None if self.params.weight == "auto" else float(self.params.weight)
        self.weight = self.weight_option
        self.batch_size: int | None = None  # the params' or the run's, from before_training
        n = len(generic)  # type: ignore[arg-type]
        if n == 0:
            raise UserError("infusing generic: the generic image set is empty")
        chosen = limit_indices(n, self.params.limit, ctx.seed)
        self.items = list(range(n)) if chosen is None else chosen
        all_labels = dataset_targets(generic)
        self.labels = torch.tensor([all_labels[i] for i in self.items], dtype=torch.long)
        self.train_pos, self.val_pos = stratified_split(self.labels.tolist(), self.params.val_fraction, ctx.seed)
        if not self.train_pos:
            raise UserError("infusing generic: no generic images left for training after the validation split")
        self.targets: Tensor | None = None
        self.target_batches = 0  # teacher forwards spent on the targets (once per run)
        self.counts = {"downstream": 0, "generic": 0}
        self._batches: SideBatches | None = None
        self._pos: Tensor | None = None
        self._x: Tensor | None = None
        self._generic_batch = False

    # ---------------------------------------------------------------- targets
    def compute_targets(self, strategy: Any) -> None:
        """Pre-trained embeddings of every used generic image, eval transform, once."""
        teacher = teacher_bank(strategy).get(strategy.model, "pretrained")
        _, eval_transform = model_transforms(unwrap(strategy.model))
        data = IndexedImages(self.generic, self.items, range(len(self.items)), eval_transform)
        ctx = self.context(strategy)
        # own generator: the targets must not consume the global RNG
        out, forwards = embed_images(teacher, data, ctx.eval_batch_size, ctx.workers, out_device="cpu", generator=torch.Generator())
        self.target_batches += forwards
        self.targets = out
        if self.weight_option is None:
            self.weight = distill_weight_for_dim(out.shape[1])

    def val_set(self, strategy: Any, cache_mb: float = 512.0) -> TaskEvaluator | None:
        """The held-out generic images for the project's evaluator: its one set (id 0)
        yields the eval-transformed images keyed by position (see :attr:`labels`)."""
        if not self.val_pos:
            return None
        _, eval_transform = model_transforms(unwrap(strategy.model))
        data = IndexedImages(self.generic, self.items, self.val_pos, eval_transform)
        ctx = self.context(strategy)
        return TaskEvaluator([data], None, ctx.eval_batch_size, cache_mb=cache_mb, workers=ctx.workers, own_rng=True)

    # --------------------------------------------------------------- callbacks
    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        if self.batch_size is None:  # the run's batch size (on a strategy built by hand: its own)
            self.batch_size = self.params.batch_size or self.context(strategy).train_batch_size
        if self.targets is None:
            self.compute_targets(strategy)
        elif self.weight is None:
            self.weight = distill_weight_for_dim(self.targets.shape[1])

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.params.mode == "alternate":
            criterion_gate(strategy, self.name)  # a strategy without a gate fails here, not mid-way
        ctx = self.context(strategy)
        train_transform, eval_transform = model_transforms(unwrap(strategy.model))
        data = IndexedImages(self.generic, self.items, self.train_pos, train_transform if ctx.augment else eval_transform)
        steps = getattr(strategy, "total_steps", 0) or 2**31 - 1
        seed = ctx.seed * 1_000_003 + 7919 + int(getattr(strategy, "experience_index", task_id_of(strategy)))
        # [seed, 0]: the stream RandomBatchSampler(seed) drew at its first pass; each process
        # takes its slice of the global batch
        dist = getattr(strategy, "dist", None)
        self._batches = SideBatches(data, self.batch_size, [seed, 0], ctx.workers, period=steps, dist=dist, device=strategy.device)
        self.counts = {"downstream": 0, "generic": 0}

    def _is_generic(self, strategy: Any) -> bool:
        k = strategy.clock.train_exp_iterations
        return self.params.mode == "alternate" and (k + 1) % self.params.generic_every == 0

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        generic = self._is_generic(strategy)
        if generic or self._generic_batch:  # a downstream-only run never needs the gate
            criterion_gate(strategy, self.name).mute(GENERIC_BATCH, generic)
        self._generic_batch = generic
        self.counts["generic" if generic else "downstream"] += 1
        if generic or self.params.mode == "joint":
            assert self._batches is not None
            x, pos = self._batches.next()
            self._pos = pos
            self._x = x
        if generic:
            task = int(strategy.mb_task_id[0])
            n = x.shape[0]
            strategy.mbatch = [x, torch.zeros(n, dtype=torch.long, device=strategy.device), torch.full((n,), task, dtype=torch.long, device=strategy.device)]

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.weight == 0 or self.targets is None:
            return
        if self.params.mode == "joint":
            with autocast_context(strategy):
                embeds = unwrap(strategy.model).encode_image(self._x)
        elif self._generic_batch:
            embeds = student_outputs(strategy)["image_embeds"]
        else:
            return
        targets = self.targets[self._pos].to(embeds.device)
        loss = embedding_distillation(embeds, targets)
        self.loss_terms["generic_distill"] = float(loss.detach())
        strategy.loss = strategy.loss + self.weight * loss

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self._batches is not None:
            self._batches.close()  # stops loader workers
        self._batches = None
        self._x = self._pos = None
        if self._generic_batch:
            criterion_gate(strategy, self.name).mute(GENERIC_BATCH, False)
        self._generic_batch = False

    def ledger(self) -> dict[str, float]:
        """Extra data for the run's cost ledger: the generic image set."""
        return {"reference_images": len(self.generic)}

    def state_dict(self) -> dict[str, Any]:
        return {"targets": self.targets, "items": len(self.items), "weight": self.weight, "target_batches": self.target_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if int(state["items"]) != len(self.items):
            raise UserError(f"infusing generic: the checkpoint was made with {state['items']} generic images, the set now has {len(self.items)}")
        self.targets = state["targets"]
        self.weight = state["weight"] if self.weight_option is None else self.weight_option
        self.target_batches = int(state.get("target_batches", 0))

