"""Infusing (Ypsilantis et al., 2025): vision-only fine-tuning with a regulariser mix.

The recipe of docs/methods.md section 6 as four plugins that work alone or together:

- ``CosineHeadPlugin`` (``infusing_head``): the downstream loss is the cross-entropy of a
  bias-free cosine classifier (scale 16) on the L2-normalised image embedding, one head
  per task, replacing the zero-shot text-head cross-entropy of the strategy. The head is
  initialised from the frozen text embeddings of the class prompts (``init: text``, the
  default here for task-incremental use) or at random (``init: random``, the paper). It
  trains in its own AdamW parameter group (lr 1e-3, weight decay 1e-6) next to the
  backbone group (``train.lr``, ``train.weight_decay``).
- ``GenericDistillPlugin`` (``infusing_generic``): batches alternate between the
  downstream set and a generic image set, one source per batch (``mode: alternate``,
  iteration k is generic when ``(k + 1) % generic_every == 0``; 2 = strict alternation).
  On a generic iteration the plugin swaps the mini-batch for a generic batch before the
  forward, the strategy's criterion returns 0 (see ``SourceCriterion``), and the loss is
  ``lambda_d * mean_i mean_d (e_i - t_i)^2`` against pre-trained embeddings ``t``
  computed once per run with the eval transform (no teacher forward while training).
  ``lambda_d: auto`` is ``1000 * D / 768``. ``mode: joint`` (not the paper) adds one
  generic batch to every downstream iteration instead, losses summed.
- ``MeanL2Plugin`` (``infusing_l2``): ``lambda_w * sum over trainable tensors of
  mean((theta - theta_0)^2)`` on every batch, lambda_w 1e4.
- ``BestCheckpointPlugin`` (``infusing_select``): model selection. A seeded, class-
  stratified validation split is carved from each task's training data (and kept out
  of training); every ``every`` steps (and after the last) the score
  ``(downstream val accuracy + generic val score) / 2`` is computed, the best weights
  (trainable tensors and cosine heads) are kept in memory (CPU) and restored at the end
  of the experience. Downstream accuracy uses the cosine head when one trains, else the
  zero-shot text head; the generic score is leave-one-out k-NN accuracy on the generic
  validation split (``generic_score: knn``) or ``100 * mean cos(e, t)`` to the stored
  pre-trained embeddings (``alignment``, needs no labels); ``auto`` (default) takes knn
  when the generic validation images carry two or more labels. Without a generic plugin the
  score is the downstream accuracy alone. The task's classes are the same in training
  and validation (the paper's disjoint validation classes are not possible for a
  classification task).

``InfusingPlugin`` (``infusing``) bundles the four with the paper's defaults. The runner's
accuracy matrix stays zero-shot text-head accuracy for every task; the cosine-head test
accuracy of each trained task is kept in ``CosineHeadPlugin.diagnostics``.

Counting: ``train.iterations`` counts optimizer steps of both sources; with strict
alternation half of them are downstream steps. The downstream batch drawn by the
loader at a generic iteration is dropped (the downstream sampler stays seeded).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cl_proxyfda.errors import UserError
from cl_proxyfda.losses.infusing import (
    cosine_classifier_ce,
    cosine_logits,
    distill_weight_for_dim,
    embedding_distillation,
    knn_accuracy,
    per_tensor_mean_l2,
)
from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.side_data import SideBatches, embed_images
from cl_proxyfda.strategies.anchors import AnchoredPenaltyPlugin, trainable_named_parameters
from cl_proxyfda.strategies.base import CLPlugin, RunContext
from cl_proxyfda.teacher import student_outputs, teacher_bank, unwrap

SOURCES = ("downstream", "generic")


# --------------------------------------------------------------------- configs
class HeadParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    init: Literal["text", "random"] = Field("text", description="[choice] cosine head from the class-prompt text embeddings, or random (paper)")
    scale: float = Field(16.0, gt=0, description="cosine-classifier logit scale")
    lr: float = Field(1e-3, gt=0, description="learning rate of the head's parameter group")
    weight_decay: float = Field(1e-6, ge=0, description="AdamW weight decay of the head group")
    record_accuracy: bool = Field(True, description="measure the cosine-head test accuracy of each trained task")


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


class L2Params(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    weight: float = Field(1e4, ge=0, description="lambda_w of sum over tensors of mean((theta - theta_0)^2)")
    anchor: Literal["pretrained", "previous"] = "pretrained"


class SelectParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    every: int = Field(50, ge=1, le=10_000_000, description="evaluate every this many optimizer steps (and after the last)")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="class-stratified share of each task's training data held out")
    generic_score: Literal["auto", "knn", "alignment"] = Field(
        "auto", description="generic validation score: k-NN accuracy, mean cosine to the pre-trained embeddings, or auto (knn with 2+ labels)"
    )
    knn_k: int = Field(10, ge=1, le=65536)
    include_start: bool = Field(False, description="also score the start-of-experience weights")
    cache_mb: float = Field(512.0, ge=0, description="keep preprocessed validation inputs in memory up to this size")


class InfusingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    head: HeadParams | None = Field(default_factory=HeadParams, description="null: keep the zero-shot text-head loss")
    generic: GenericParams | None = Field(default_factory=GenericParams, description="null: no generic batches")
    l2: L2Params | None = Field(default_factory=L2Params, description="null: no weight regulariser")
    select: SelectParams | None = Field(default_factory=SelectParams, description="null: keep the last iterate")
    vision_only: bool = Field(True, description="refuse a trainable text tower")


# --------------------------------------------------------------------- shared helpers
class SourceCriterion(nn.Module):
    """Wraps the strategy's criterion: 0 on generic batches or when a head replaces it.

    ``source`` says where the current mini-batch comes from (set by the alternation
    plugin each iteration); ``replaced`` is set by ``CosineHeadPlugin``, whose own loss
    takes the place of the text-head cross-entropy. The zero keeps the autograd graph so
    that a backward always works.
    """

    def __init__(self, base: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.base = base
        self.source = "downstream"
        self.replaced = False

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        if self.source == "generic" or self.replaced:
            finite = torch.where(torch.isfinite(output), output, torch.zeros_like(output))
            return finite.sum() * 0.0
        return self.base(output, target)


def source_criterion(strategy: Any) -> SourceCriterion:
    """The strategy's ``SourceCriterion`` (installed around its criterion on first use)."""
    crit = strategy._criterion
    if not isinstance(crit, SourceCriterion):
        crit = SourceCriterion(crit)
        strategy._criterion = crit
    return crit


def batch_source(strategy: Any) -> str:
    """``downstream`` or ``generic``: where the current mini-batch comes from."""
    crit = getattr(strategy, "_criterion", None)
    return crit.source if isinstance(crit, SourceCriterion) else "downstream"


def find_plugin(strategy: Any, cls: type) -> Any:
    """The strategy's plugin of type ``cls`` (also inside an ``InfusingPlugin``), or None."""
    for p in strategy.plugins:
        for q in (p, *getattr(p, "parts", ())):
            if isinstance(q, cls):
                return q
    return None


def model_transforms(model: nn.Module) -> tuple[Callable, Callable]:
    """The open_clip train and eval transforms of the task model (from its preprocess config)."""
    cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(unwrap(model).clip))
    return image_transform_v2(cfg, is_train=True), image_transform_v2(cfg, is_train=False)


def task_id_of(strategy: Any) -> int:
    """The task label of the experience being trained."""
    labels = getattr(strategy.experience, "task_labels", None) or [0]
    return int(labels[0])


def _autocast(strategy: Any) -> Any:
    dtype = getattr(strategy, "autocast_dtype", None)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(strategy.device.type, dtype=dtype)


def _loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    # Own generator: evaluating inside training must not consume the global RNG.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=getattr(dataset, "collate_fn", None),
        generator=torch.Generator(),
    )


class IndexedImages(Dataset):
    """``(transform(image), position)`` for the items at ``positions`` of ``items``.

    ``base`` yields ``(PIL image, label)``; ``items[p]`` is the base index of position p,
    so that per-item tensors (targets, labels) are indexed by position.
    """

    def __init__(self, base: Dataset, items: Sequence[int], positions: Sequence[int], transform: Callable) -> None:
        self.base, self.items, self.positions, self.transform = base, list(items), list(positions), transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        pos = self.positions[i]
        image = self.base[self.items[pos]][0]
        return self.transform(image), pos


class EvalSet:
    """A dataset of ``(x, key, ...)`` items embedded in eval mode.

    Preprocessed inputs are kept in memory after the first pass when they fit
    ``cache_mb``; otherwise every pass reads the dataset again.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 256, workers: int = 0, cache_mb: float = 512.0) -> None:
        self.dataset, self.batch_size, self.workers, self.cache_mb = dataset, batch_size, workers, cache_mb
        self._cache: tuple[Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _batches(self) -> Any:
        if self._cache is not None:
            x, k = self._cache
            for i in range(0, len(k), self.batch_size):
                yield x[i : i + self.batch_size], k[i : i + self.batch_size]
            return
        xs, ks, size, keep = [], [], 0, True
        for batch in _loader(self.dataset, self.batch_size, self.workers):
            x, k = batch[0], torch.as_tensor(batch[1])
            if keep:
                size += x.numel() * x.element_size()
                keep = size <= self.cache_mb * 2**20
                xs.append(x)
                ks.append(k)
            yield x, k
        if keep and xs:
            self._cache = (torch.cat(xs), torch.cat(ks))

    @torch.no_grad()
    def embed(self, model: nn.Module, strategy: Any) -> tuple[Tensor, Tensor]:
        """Normalised embeddings (CPU, float) and keys of every item."""
        net = unwrap(model)
        was_training = net.training
        net.eval()
        feats, keys = [], []
        try:
            for x, k in self._batches():
                with _autocast(strategy):
                    feats.append(net.encode_image(x.to(strategy.device)).float().cpu())
                keys.append(k)
        finally:
            net.train(was_training)
        return torch.cat(feats), torch.cat(keys)


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded class-stratified (train, val) indices: ``round(fraction * n_c)`` per class,
    at least one when the class has two or more items, never the class's last item."""
    rng = np.random.default_rng(seed)
    y = np.asarray(targets)
    val: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2 or fraction <= 0:
            continue
        k = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        val.extend(rng.choice(idx, size=k, replace=False).tolist())
    val_set = set(val)
    return [i for i in range(len(y)) if i not in val_set], sorted(val)


def _dataset_targets(ds: Dataset) -> list[int]:
    from cl_proxyfda.benchmarks.stream import dataset_targets

    return dataset_targets(ds)


# ------------------------------------------------------------------ generic data
def folder_images(root: str | Path) -> Dataset:
    """Every image under ``root`` (recursive), labelled by its parent folder."""
    from cl_proxyfda.benchmarks.image_folder import ImageFileDataset, list_images

    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise UserError(f"infusing generic.root: folder {folder} does not exist")
    paths = list_images(folder)
    if not paths:
        raise UserError(f"infusing generic.root: no images under {folder}")
    parents = sorted({str(p.parent.relative_to(folder)) for p in paths})
    label = {name: i for i, name in enumerate(parents)}
    return ImageFileDataset(paths, [label[str(p.parent.relative_to(folder))] for p in paths])


def generic_dataset(source: str, root: str | None, stream: Any) -> Dataset:
    """The generic image set: the stream's reference images, its control test set, or a folder."""
    if source == "folder":
        if root is None:
            raise UserError("infusing generic.root: source 'folder' needs a root folder")
        return folder_images(root)
    if source == "reference":
        ref = getattr(stream, "reference", None)
        if ref is None or len(ref) == 0:
            raise UserError("infusing generic.source: the stream provides no reference images; use source: folder with a root")
        return ref
    if source == "control":
        control = getattr(stream, "control", None)
        if control is None or len(control.test) == 0:
            raise UserError("infusing generic.source: the stream has no control set; use source: folder with a root")
        return control.test
    raise UserError(f"infusing generic.source: unknown source {source!r} (use reference, control, folder)")


# -------------------------------------------------------------------- cosine head
class CosineHeadPlugin(CLPlugin):
    """Cosine-classifier cross-entropy (scale 16, no bias) on downstream batches.

    Args:
        scale: logit scale s in ``CE(s * cos(e, w_c), y)``.
        init: ``text`` (frozen text embeddings of the class prompts) or ``random``.
        lr: learning rate of the head's own parameter group (follows the backbone's
            warm-up/schedule factor).
        weight_decay: AdamW weight decay of the head group.
        seed: seed of the random initialisation (mixed with the task id).
        test_sets: optional ``(PIL image, label)`` test set per task id; after training
            a task, its cosine-head test accuracy goes to ``diagnostics``.
        task_names: names used in ``diagnostics`` keys (default ``task{i}``).
        eval_batch_size: batch size of that evaluation.
    """

    Params = HeadParams
    name = "infusing_head"

    @classmethod
    def from_params(cls, params: HeadParams, run: RunContext | None = None) -> "CosineHeadPlugin":
        ctx = run or RunContext()
        tasks = list(ctx.stream.tasks) if ctx.stream is not None else None
        plugin = cls(
            scale=params.scale,
            init=params.init,
            lr=params.lr,
            weight_decay=params.weight_decay,
            seed=ctx.seed,
            test_sets=[t.test for t in tasks] if (tasks and params.record_accuracy) else None,
            task_names=[t.name for t in tasks] if tasks else None,
            eval_batch_size=ctx.eval_batch_size,
        )
        plugin.params, plugin.run = params, run
        return plugin

    def __init__(
        self,
        scale: float = 16.0,
        init: str = "text",
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        seed: int = 0,
        test_sets: Sequence[Dataset] | None = None,
        task_names: Sequence[str] | None = None,
        eval_batch_size: int = 256,
    ) -> None:
        if init not in ("text", "random"):
            raise ValueError(f"init must be 'text' or 'random', got {init!r}")
        super().__init__(HeadParams(init=init, scale=scale, lr=lr, weight_decay=weight_decay, record_accuracy=test_sets is not None))
        self.scale, self.init, self.lr, self.weight_decay, self.seed = scale, init, lr, weight_decay, seed
        self.test_sets = list(test_sets) if test_sets is not None else None
        self.task_names = list(task_names) if task_names is not None else None
        self.eval_batch_size = eval_batch_size
        self.heads: dict[int, nn.Parameter] = {}
        self.diagnostics: dict[str, float] = {}
        self.group: dict[str, Any] | None = None
        self._task = 0

    def head(self, task: int) -> nn.Parameter | None:
        return self.heads.get(int(task))

    def _make_head(self, strategy: Any, task: int) -> nn.Parameter:
        with torch.no_grad():  # the zero-shot head: the template ensemble, not the training prompts
            text = unwrap(strategy.model).class_embeddings(task).detach().float()
        if self.init == "text":
            weight = text.clone()
        else:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + task)
            weight = torch.randn(text.shape, generator=gen) / text.shape[1] ** 0.5
        return nn.Parameter(weight.to(strategy.device))

    def _lr_factor(self, strategy: Any) -> float:
        base = getattr(strategy, "base_lr", 0.0)
        if not base:
            return 1.0
        return strategy.optimizer.param_groups[0]["lr"] / base

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        source_criterion(strategy).replaced = True

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._task = task_id_of(strategy)
        head = self.heads.get(self._task)
        if head is None:
            head = self._make_head(strategy, self._task)
        elif head.device.type != strategy.device.type:  # loaded from a checkpoint (CPU)
            head = nn.Parameter(head.detach().to(strategy.device))
        self.heads[self._task] = head
        # The strategy's optimizer was made (fresh) before plugins' before_training_exp.
        self.group = {"params": [head], "lr": self.lr * self._lr_factor(strategy), "weight_decay": self.weight_decay, "base_lr": self.lr, "name": "infusing_head"}
        strategy.optimizer.add_param_group(self.group)
        self.group = strategy.optimizer.param_groups[-1]

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        # The head is not inside the DDP module: average its gradient over processes here.
        dist = getattr(strategy, "dist", None)
        head = self.heads.get(self._task)
        if dist is not None and dist.enabled and head is not None and head.grad is not None:
            torch.distributed.all_reduce(head.grad)
            head.grad /= dist.world

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        # CLStrategy sets every group to base_lr * factor after each step: put ours back.
        if self.group is not None:
            self.group["lr"] = self.lr * self._lr_factor(strategy)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if batch_source(strategy) != "downstream":
            return
        embeds = student_outputs(strategy)["image_embeds"]
        loss = cosine_classifier_ce(embeds, self.heads[self._task], strategy.mb_y, self.scale)
        self.loss_terms["cosine_ce"] = float(loss.detach())
        strategy.loss = strategy.loss + loss

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.group = None

    def after_training(self, strategy: Any, **kwargs: Any) -> None:
        # After every plugin's after_training_exp, so a selected checkpoint is measured.
        if self.test_sets is None or self._task >= len(self.test_sets) or len(self.test_sets[self._task]) == 0:
            return
        test = self.test_sets[self._task]
        _, eval_transform = model_transforms(strategy.model)
        everything = range(len(test))
        labels = torch.tensor(_dataset_targets(test))
        embeds, pos = EvalSet(IndexedImages(test, everything, everything, eval_transform), self.eval_batch_size, cache_mb=0).embed(strategy.model, strategy)
        logits = cosine_logits(embeds, self.heads[self._task].detach().cpu(), self.scale)
        acc = 100.0 * float((logits.argmax(dim=1) == labels[pos]).float().mean())
        name = self.task_names[self._task] if self.task_names and self._task < len(self.task_names) else f"task{self._task}"
        self.diagnostics[f"head_accuracy/{name}"] = acc

    def state_dict(self) -> dict[str, Any]:
        return {"heads": {t: h.detach().cpu().clone() for t, h in self.heads.items()}, "diagnostics": dict(self.diagnostics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.heads = {int(t): nn.Parameter(h.clone().float()) for t, h in state.get("heads", {}).items()}
        self.diagnostics = {str(k): float(v) for k, v in state.get("diagnostics", {}).items()}


# ------------------------------------------------------- generic-set distillation
class GenericDistillPlugin(CLPlugin):
    """Embedding distillation on generic batches, alternating with downstream batches.

    Args:
        generic: the generic image set, yielding ``(PIL image, label)`` (labels serve only
            the k-NN validation score).
        weight: lambda_d; ``None`` = ``1000 * D / 768`` for D-dimensional embeddings.
        mode: ``alternate`` (one source per batch, the paper) or ``joint`` (every
            iteration one downstream and one generic batch, losses summed).
        generic_every: alternate mode: iteration k (0-based) is generic when
            ``(k + 1) % generic_every == 0``; 2 alternates 1:1.
        batch_size: generic batch size (default: the run's, or the strategy's ``train_mb_size``).
        val_fraction: share of the generic set held out for model selection.
        limit: use a seeded subset of at most this many generic images.
        seed: seed of the subset, the split and the generic batch order.
        eval_batch_size, workers: of the one-time target computation and the loaders.
        augment: generic training batches use the model's train transform (else eval).
    """

    Params = GenericParams
    name = "infusing_generic"

    @classmethod
    def from_params(cls, params: GenericParams, run: RunContext | None = None) -> "GenericDistillPlugin":
        ctx = run or RunContext()
        plugin = cls(
            generic_dataset(params.source, params.root, ctx.stream),
            weight=None if params.weight == "auto" else float(params.weight),
            mode=params.mode,
            generic_every=params.generic_every,
            batch_size=params.batch_size or ctx.train_batch_size,
            val_fraction=params.val_fraction,
            limit=params.limit,
            seed=ctx.seed,
            eval_batch_size=ctx.eval_batch_size,
            workers=ctx.workers,
            augment=ctx.augment,
        )
        plugin.params, plugin.run = params, run
        return plugin

    def __init__(
        self,
        generic: Dataset,
        weight: float | None = None,
        mode: str = "alternate",
        generic_every: int = 2,
        batch_size: int | None = None,
        val_fraction: float = 0.1,
        limit: int | None = None,
        seed: int = 0,
        eval_batch_size: int = 256,
        workers: int = 0,
        augment: bool = True,
    ) -> None:
        if mode not in ("alternate", "joint"):
            raise ValueError(f"mode must be 'alternate' or 'joint', got {mode!r}")
        if generic_every < 2 and mode == "alternate":
            raise ValueError("generic_every must be >= 2 (every iteration generic leaves no downstream batch)")
        super().__init__(GenericParams(
            weight="auto" if weight is None else weight, mode=mode, generic_every=generic_every, batch_size=batch_size,
            val_fraction=val_fraction, limit=limit,
        ))
        from cl_proxyfda.benchmarks.image_folder import limit_indices

        self.generic = generic
        self.weight_option = weight
        self.weight = weight
        self.mode, self.generic_every, self.batch_size = mode, generic_every, batch_size
        self.seed, self.eval_batch_size, self.workers, self.augment = seed, eval_batch_size, workers, augment
        n = len(generic)  # type: ignore[arg-type]
        if n == 0:
            raise UserError("infusing generic: the generic image set is empty")
        chosen = limit_indices(n, limit, seed)
        self.items = list(range(n)) if chosen is None else chosen
        all_labels = _dataset_targets(generic)
        self.labels = torch.tensor([all_labels[i] for i in self.items], dtype=torch.long)
        self.train_pos, self.val_pos = stratified_split(self.labels.tolist(), val_fraction, seed)
        if not self.train_pos:
            raise UserError("infusing generic: no generic images left for training after the validation split")
        self.targets: Tensor | None = None
        self.target_batches = 0  # teacher forwards spent on the targets (once per run)
        self.counts = {"downstream": 0, "generic": 0}
        self._batches: SideBatches | None = None
        self._pos: Tensor | None = None
        self._x: Tensor | None = None
        self._eval_transform: Callable | None = None

    # ---------------------------------------------------------------- targets
    def compute_targets(self, strategy: Any) -> None:
        """Pre-trained embeddings of every used generic image, eval transform, once."""
        teacher = teacher_bank(strategy).get(strategy.model, "pretrained")
        _, eval_transform = model_transforms(strategy.model)
        data = IndexedImages(self.generic, self.items, range(len(self.items)), eval_transform)
        # own generator: the targets must not consume the global RNG
        out, forwards = embed_images(teacher, data, self.eval_batch_size, self.workers, out_device="cpu", generator=torch.Generator())
        self.target_batches += forwards
        self.targets = out
        if self.weight_option is None:
            self.weight = distill_weight_for_dim(out.shape[1])

    def val_set(self, strategy: Any, cache_mb: float = 512.0) -> EvalSet | None:
        """The held-out generic images as an ``EvalSet`` of (x, position)."""
        if not self.val_pos:
            return None
        _, eval_transform = model_transforms(strategy.model)
        return EvalSet(IndexedImages(self.generic, self.items, self.val_pos, eval_transform), self.eval_batch_size, self.workers, cache_mb)

    # --------------------------------------------------------------- callbacks
    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        if self.batch_size is None:  # joined a strategy by hand: its batch size
            self.batch_size = self.context(strategy).train_batch_size
        source_criterion(strategy)
        if self.targets is None:
            self.compute_targets(strategy)
        elif self.weight is None:
            self.weight = distill_weight_for_dim(self.targets.shape[1])

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        train_transform, eval_transform = model_transforms(strategy.model)
        data = IndexedImages(self.generic, self.items, self.train_pos, train_transform if self.augment else eval_transform)
        steps = getattr(strategy, "total_steps", 0) or 2**31 - 1
        seed = self.seed * 1_000_003 + 7919 + int(getattr(strategy, "experience_index", task_id_of(strategy)))
        # [seed, 0]: the stream RandomBatchSampler(seed) drew at its first pass; each process
        # takes its slice of the global batch
        dist = getattr(strategy, "dist", None)
        self._batches = SideBatches(data, self.batch_size, [seed, 0], self.workers, period=steps, dist=dist, device=strategy.device)
        self.counts = {"downstream": 0, "generic": 0}

    def _is_generic(self, strategy: Any) -> bool:
        k = strategy.clock.train_exp_iterations
        return self.mode == "alternate" and (k + 1) % self.generic_every == 0

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        crit = source_criterion(strategy)
        generic = self._is_generic(strategy)
        crit.source = "generic" if generic else "downstream"
        self.counts[crit.source] += 1
        if generic or self.mode == "joint":
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
        if self.mode == "joint":
            with _autocast(strategy):
                embeds = unwrap(strategy.model).encode_image(self._x)
        elif batch_source(strategy) == "generic":
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
        source_criterion(strategy).source = "downstream"

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


# -------------------------------------------------------------------- mean L2-SP
class MeanL2Plugin(AnchoredPenaltyPlugin):
    """``weight * sum over trainable tensors of mean((theta - theta_0)^2)``, every batch."""

    Params = L2Params
    name = "infusing_l2"
    term = "mean_l2"
    penalty = staticmethod(per_tensor_mean_l2)


# -------------------------------------------------------------- model selection
class BestCheckpointPlugin(CLPlugin):
    """Keeps the best iterate of each experience by validation score and restores it.

    Args:
        every: evaluate after every ``every`` optimizer steps (and after the last step).
        val_fraction: class-stratified share of the task's training data held out.
        generic_score: ``knn`` (leave-one-out k-NN accuracy on the generic validation
            split), ``alignment`` (100 * mean cosine to the pre-trained embeddings) or
            ``auto`` (knn when the generic validation images carry two or more labels,
            else alignment: unlabelled reference images).
        knn_k: neighbours of the k-NN score.
        include_start: also score the weights at the start of the experience.
        seed: seed of the validation split (mixed with the experience index).
        eval_batch_size, workers, cache_mb: of the validation passes.
        scorer: Python only: replaces the score, ``scorer(strategy) -> float``.
    """

    Params = SelectParams
    name = "infusing_select"

    @classmethod
    def from_params(cls, params: SelectParams, run: RunContext | None = None) -> "BestCheckpointPlugin":
        ctx = run or RunContext()
        plugin = cls(
            every=params.every,
            val_fraction=params.val_fraction,
            generic_score=params.generic_score,
            knn_k=params.knn_k,
            include_start=params.include_start,
            seed=ctx.seed,
            eval_batch_size=ctx.eval_batch_size,
            workers=ctx.workers,
            cache_mb=params.cache_mb,
        )
        plugin.params, plugin.run = params, run
        return plugin

    def __init__(
        self,
        every: int = 50,
        val_fraction: float = 0.1,
        generic_score: str = "auto",
        knn_k: int = 10,
        include_start: bool = False,
        seed: int = 0,
        eval_batch_size: int = 256,
        workers: int = 0,
        cache_mb: float = 512.0,
        scorer: Callable[[Any], float] | None = None,
    ) -> None:
        if every < 1:
            raise ValueError("every must be >= 1")
        if generic_score not in ("auto", "knn", "alignment"):
            raise ValueError(f"generic_score must be 'auto', 'knn' or 'alignment', got {generic_score!r}")
        super().__init__(SelectParams(
            every=every, val_fraction=val_fraction, generic_score=generic_score, knn_k=knn_k, include_start=include_start, cache_mb=cache_mb,
        ))
        self.every, self.val_fraction, self.generic_score, self.knn_k = every, val_fraction, generic_score, knn_k
        self.include_start, self.seed = include_start, seed
        self.eval_batch_size, self.workers, self.cache_mb, self.scorer = eval_batch_size, workers, cache_mb, scorer
        self.history: list[dict[str, Any]] = []
        self.val: EvalSet | None = None
        self.generic_val: EvalSet | None = None
        self._best: dict[str, Any] | None = None
        self._evaluations: list[list[float]] = []
        self._last_step = -1

    # ------------------------------------------------------------------ data
    def after_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        exp_data = strategy.experience.dataset
        adapted = strategy.adapted_dataset
        if len(adapted) != len(exp_data):
            raise UserError("infusing_select: another plugin changed the training data of the experience; list infusing_select first")
        seed = self.seed * 1_000_003 + 104_729 + int(strategy.experience.current_experience)
        train_idx, val_idx = stratified_split([int(t) for t in exp_data.targets], self.val_fraction, seed)
        if not val_idx:
            raise UserError(f"infusing_select: val_fraction {self.val_fraction} leaves no validation images (every class needs 2 or more training images)")
        strategy.adapted_dataset = adapted.subset(train_idx)
        self.val = EvalSet(exp_data.eval().subset(val_idx), self.eval_batch_size, self.workers, self.cache_mb)

    # ----------------------------------------------------------------- score
    def score(self, strategy: Any) -> dict[str, float]:
        """``downstream`` and ``generic`` validation scores (%) and their mean ``score``."""
        if self.scorer is not None:
            return {"score": float(self.scorer(strategy))}
        task = task_id_of(strategy)
        model = unwrap(strategy.model)
        head_plugin = find_plugin(strategy, CosineHeadPlugin)
        embeds, labels = self.val.embed(model, strategy)  # type: ignore[union-attr]
        if head_plugin is not None and head_plugin.head(task) is not None:
            logits = cosine_logits(embeds, head_plugin.head(task).detach().cpu(), head_plugin.scale)
        else:
            with torch.no_grad():
                logits = embeds @ model.class_embeddings(task).detach().float().cpu().t()
        out = {"downstream": 100.0 * float((logits.argmax(dim=1) == labels).float().mean())}
        generic = find_plugin(strategy, GenericDistillPlugin)
        if generic is not None:
            if self.generic_val is None:
                self.generic_val = generic.val_set(strategy, self.cache_mb)
                if self.generic_val is None:
                    raise UserError("infusing_select: the generic set has no validation split; set generic val_fraction > 0")
            g_embeds, pos = self.generic_val.embed(model, strategy)
            if self.generic_kind(generic) == "knn":
                out["generic"] = knn_accuracy(g_embeds, generic.labels[pos], self.knn_k)
            else:
                targets = torch.nn.functional.normalize(generic.targets[pos].float(), dim=-1)
                out["generic"] = 100.0 * float((g_embeds * targets).sum(dim=1).mean())
            out["score"] = (out["downstream"] + out["generic"]) / 2
        else:
            out["score"] = out["downstream"]
        return out

    def generic_kind(self, generic: "GenericDistillPlugin") -> str:
        """``knn`` or ``alignment``: the generic score in use (``auto`` resolved)."""
        if self.generic_score != "auto":
            return self.generic_score
        return "knn" if len(set(generic.labels[generic.val_pos].tolist())) >= 2 else "alignment"

    def _snapshot(self, strategy: Any) -> dict[str, Any]:
        params = {n: p.detach().to("cpu", copy=True) for n, p in trainable_named_parameters(strategy)}
        head_plugin = find_plugin(strategy, CosineHeadPlugin)
        heads = {t: h.detach().to("cpu", copy=True) for t, h in head_plugin.heads.items()} if head_plugin is not None else {}
        return {"params": params, "heads": heads}

    def _evaluate(self, strategy: Any, step: int) -> None:
        result = self.score(strategy)
        self._evaluations.append([float(step), result.get("downstream", float("nan")), result.get("generic", float("nan")), result["score"]])
        self._last_step = step
        if self._best is None or result["score"] > self._best["score"]:
            self._best = {"score": result["score"], "step": step, "state": self._snapshot(strategy)}

    def _restore(self, strategy: Any) -> None:
        assert self._best is not None
        state = self._best["state"]
        with torch.no_grad():
            for n, p in trainable_named_parameters(strategy):
                p.copy_(state["params"][n].to(p.device))
            head_plugin = find_plugin(strategy, CosineHeadPlugin)
            if head_plugin is not None:
                for t, h in state["heads"].items():
                    head_plugin.heads[t].copy_(h.to(head_plugin.heads[t].device))
        model = unwrap(strategy.model)
        if getattr(model, "text_trainable", False):
            model.text_changed()

    # ------------------------------------------------------------- callbacks
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._best, self._evaluations, self._last_step = None, [], -1
        if self.include_start:
            self._evaluate(strategy, 0)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        step = strategy.clock.train_exp_iterations + 1  # the clock counts after the plugins
        if step % self.every == 0:
            self._evaluate(strategy, step)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        steps = strategy.clock.train_exp_iterations
        if steps != self._last_step and steps > 0:
            self._evaluate(strategy, steps)
        if self._best is None:
            return
        self._restore(strategy)
        self.history.append({
            "experience": int(strategy.experience.current_experience),
            "best_step": int(self._best["step"]),
            "best_score": float(self._best["score"]),
            "final_step": int(steps),
            "evaluations": [list(e) for e in self._evaluations],
        })
        self._best = None
        self.val = None

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state.get("history", [])]


# ---------------------------------------------------------------------- bundle
class InfusingPlugin(CLPlugin):
    """The whole recipe as one plugin: its ``parts`` (generic, head, L2, selection) in order.

    Forwards the callbacks the parts use (before_training, after_train_dataset_adaptation,
    before_training_exp, before_training_iteration, before_backward, after_backward, after_update,
    after_training_iteration, after_training_exp, after_training) to each part in turn; parts
    given as ``None`` are left out. ``vision_only`` refuses a trainable text tower.
    """

    Params = InfusingParams
    name = "infusing"

    @classmethod
    def from_params(cls, params: InfusingParams, run: RunContext | None = None) -> "InfusingPlugin":
        plugin = cls(
            head=CosineHeadPlugin.from_params(params.head, run) if params.head is not None else None,
            generic=GenericDistillPlugin.from_params(params.generic, run) if params.generic is not None else None,
            l2=MeanL2Plugin.from_params(params.l2, run) if params.l2 is not None else None,
            select=BestCheckpointPlugin.from_params(params.select, run) if params.select is not None else None,
            vision_only=params.vision_only,
        )
        plugin.params, plugin.run = params, run
        return plugin

    def __init__(
        self,
        head: CosineHeadPlugin | None = None,
        generic: GenericDistillPlugin | None = None,
        l2: MeanL2Plugin | None = None,
        select: BestCheckpointPlugin | None = None,
        vision_only: bool = True,
    ) -> None:
        super().__init__(InfusingParams(
            head=None if head is None else head.params, generic=None if generic is None else generic.params,
            l2=None if l2 is None else l2.params, select=None if select is None else select.params, vision_only=vision_only,
        ))
        self.head, self.generic, self.l2, self.select = head, generic, l2, select
        self.vision_only = vision_only
        self.parts: list[CLPlugin] = [p for p in (generic, head, l2, select) if p is not None]

    @property
    def loss_terms(self) -> dict[str, float]:  # type: ignore[override]
        terms: dict[str, float] = {}
        for p in self.parts:
            terms.update(p.loss_terms)
        return terms

    @loss_terms.setter
    def loss_terms(self, value: dict[str, float]) -> None:
        pass  # the parts keep their own terms

    def _forward(self, event: str, strategy: Any, **kwargs: Any) -> None:
        for p in self.parts:
            getattr(p, event)(strategy, **kwargs)

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        if self.vision_only and getattr(unwrap(strategy.model), "text_trainable", False):
            raise UserError("infusing: the recipe fine-tunes the image tower only; set model.train_towers: [image] (or vision_only: false)")
        self._forward("before_training", strategy, **kwargs)

    def after_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        self._forward("after_train_dataset_adaptation", strategy, **kwargs)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._forward("before_training_exp", strategy, **kwargs)

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._forward("before_training_iteration", strategy, **kwargs)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        self._forward("before_backward", strategy, **kwargs)

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        self._forward("after_backward", strategy, **kwargs)

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        self._forward("after_update", strategy, **kwargs)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._forward("after_training_iteration", strategy, **kwargs)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._forward("after_training_exp", strategy, **kwargs)

    def after_training(self, strategy: Any, **kwargs: Any) -> None:
        self._forward("after_training", strategy, **kwargs)

    def ledger(self) -> dict[str, float]:
        """The parts' extra data, for the run's cost ledger."""
        out: dict[str, float] = {}
        for part in (self.head, self.generic, self.l2, self.select):
            report = getattr(part, "ledger", None)
            for key, value in (report() if callable(report) else {}).items():
                out[key] = out.get(key, 0) + value
        return out

    def state_dict(self) -> dict[str, Any]:
        return {p.name: p.state_dict() for p in self.parts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {p.name for p in self.parts}
        if set(state) != names:
            raise ValueError(f"infusing: checkpoint holds parts {sorted(state)}, the plugin has {sorted(names)}")
        for p in self.parts:
            p.load_state_dict(state[p.name])


STRATEGIES.register("infusing_head", help="Infusing: cosine-classifier head (scale 16) replacing the text-head loss")(CosineHeadPlugin)
STRATEGIES.register("infusing_generic", help="Infusing: alternating generic batches with embedding distillation")(GenericDistillPlugin)
STRATEGIES.register("infusing_l2", help="Infusing: per-tensor mean L2 to the pre-trained weights")(MeanL2Plugin)
STRATEGIES.register("infusing_select", help="Infusing: keep the best iterate by downstream + generic validation")(BestCheckpointPlugin)
STRATEGIES.register("infusing", help="Infusing: vision-only fine-tuning (head + generic distillation + L2 + selection)")(InfusingPlugin)
