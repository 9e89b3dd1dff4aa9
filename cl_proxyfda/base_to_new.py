"""Base-to-new generalisation of prompt tuning (the CoCoOp protocol), CoOp vs CoOp + Proxy-FDA.

Per task (each task on its own, from the same pre-trained model, as in the papers):

1. Split the classes into a base and a new half (``split``): ``first_half`` (default, as
   CoCoOp's code does: base = the first ``ceil(C / 2)`` labels, new = the rest) or
   ``seeded`` (a seeded random half of size ``ceil(C / 2)``).
2. Draw ``shots`` training images of every base class (default 16, seeded by ``seed``)
   and train the prompt context on the base classes only (cross-entropy over the base
   classes, ``tau_clip`` = the model's logit scale), with or without Proxy-FDA on the
   class embeddings (``strategies/coop.py``: anchors = the base classes plus drawn base
   concepts, reference = the hand-written template ensemble).
3. Evaluate on the test images: **base** accuracy (base-class images, base vocabulary),
   **new** accuracy (new-class images, new vocabulary, zero-shot with the *learned*
   context) and ``H = 2 base new / (base + new)``; plus the hand-written-prompt
   zero-shot figures and ``delta_new`` = new accuracy with learned prompts minus new
   accuracy with the hand-written prompts.

Averages over tasks: base and new are means over tasks, H is the harmonic mean of those
means (as the published tables compute it).

Both encoders are frozen, so the image features are computed once: the training
images with the eval transform (``augment_views: 0``, default), or ``augment_views``
passes with the train transform whose views are then sampled per item
(**[choice]**: CoOp augments every step with random crops and flips; precomputed views
keep the cost of a step at one text-tower pass). The optimiser follows CoOp: SGD with
momentum 0.9, lr 2e-3, weight decay 5e-4, batch 32, cosine schedule.

Published reference (CLIP ViT-B/16, average over 11 datasets, 16 shots; base / new / H):
CoOp 82.69 / 63.22 / 71.66; CoOp + Proxy-FDA 83.16 / 73.67 / 78.13 (Huang et al.,
ICML 2025). The numbers of the tiny test model mean nothing.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor
from torch.utils.data import Dataset

from cl_proxyfda.benchmarks.samplers import RandomBatchSampler
from cl_proxyfda.benchmarks.stream import StreamData, Subset, Task, dataset_targets, few_shot_indices
from cl_proxyfda.device import resolve_device
from cl_proxyfda.errors import ConfigError, UserError
from cl_proxyfda.evaluation import TaskEvaluator
from cl_proxyfda.models import CLIPTaskModel, create_clip
from cl_proxyfda.prompt_learner import PromptLearner, PromptLearnerConfig
from cl_proxyfda.strategies.coop import PromptFDA, PromptFDAParams, template_class_embeddings
from cl_proxyfda.training import warmup_cosine

VARIANTS = ("coop", "coop_prompt_fda")


class BaseToNewSettings(BaseModel):
    """Options of a base-to-new evaluation (all have the CoOp/CoCoOp defaults)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)
    model_name: str = Field("ViT-B-16", description="open_clip model name")
    pretrained: str | None = Field(None, description="open_clip tag, shipped tag or checkpoint path")
    shots: int = Field(16, ge=1, le=100_000, description="training images per base class (seeded)")
    split: Literal["first_half", "seeded"] = Field("first_half", description="base = first ceil(C/2) labels, or a seeded random half")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the split, the shot draw, the context init and the batches")
    iterations: int | None = Field(None, ge=1, description="optimizer steps per task (default: epochs over the few-shot set)")
    epochs: int = Field(200, ge=1, description="passes over the few-shot set when iterations is not given (CoOp: 200)")
    batch_size: int = Field(32, ge=1, le=65536)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    warmup: int = Field(0, ge=0, description="linear warm-up steps before the cosine schedule")
    augment_views: int = Field(0, ge=0, description="0: eval-transform features; V: V precomputed train-transform views per image")
    prompt: PromptLearnerConfig = Field(default_factory=PromptLearnerConfig)
    fda: PromptFDAParams = Field(default_factory=PromptFDAParams)
    variants: list[Literal["coop", "coop_prompt_fda"]] = Field(default_factory=lambda: list(VARIANTS))
    device: str = Field("cpu", description="cpu, cuda or auto")
    eval_batch_size: int = Field(256, ge=1, le=65536)


# ----------------------------------------------------------------------- pieces
def split_classes(num_classes: int, mode: str = "first_half", seed: int = 0) -> tuple[list[int], list[int]]:
    """Base and new class labels: ``ceil(C / 2)`` base classes, the rest new."""
    if num_classes < 2:
        raise UserError(f"base-to-new needs at least 2 classes per task, got {num_classes}")
    m = math.ceil(num_classes / 2)
    if mode == "first_half":
        return list(range(m)), list(range(m, num_classes))
    if mode == "seeded":
        order = np.random.default_rng(seed).permutation(num_classes)
        return sorted(order[:m].tolist()), sorted(order[m:].tolist())
    raise ValueError(f"split must be 'first_half' or 'seeded', got {mode!r}")


def harmonic_mean(base: float, new: float) -> float:
    """``H = 2 base new / (base + new)`` (0 when both are 0)."""
    return 0.0 if base + new == 0 else 2.0 * base * new / (base + new)


class ClassSubset(Dataset):
    """The items of ``classes`` only, relabelled ``classes[i] -> i``."""

    def __init__(self, base: Dataset, classes: Sequence[int]) -> None:
        mapping = {int(c): i for i, c in enumerate(classes)}
        targets = dataset_targets(base)
        self.base = base
        self.indices = [i for i, t in enumerate(targets) if t in mapping]
        self.targets = [mapping[targets[i]] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.base[self.indices[i]][0], self.targets[i]


def accuracy(features: Tensor, labels: Tensor, class_embeddings: Tensor) -> float:
    """Top-1 accuracy (%) of cosine classification."""
    if len(labels) == 0:
        return float("nan")
    pred = (features @ class_embeddings.to(features).t()).argmax(dim=1).cpu()
    return 100.0 * float((pred == labels.cpu()).float().mean())


def _scores(base: float, new: float) -> dict[str, float]:
    return {"base": base, "new": new, "h": harmonic_mean(base, new)}


def train_prompts(
    learner: PromptLearner,
    features: Tensor,
    labels: Tensor,
    settings: BaseToNewSettings,
    logit_scale: float,
    fda: PromptFDA | None = None,
    task: int = 0,
) -> list[float]:
    """Train the learner's context on precomputed features (V, N, D) of task ``task``'s classes.

    Returns the loss of every step. ``fda`` (with its reference set for ``task``) adds
    Proxy-FDA on the class embeddings.
    """
    views, n, _ = features.shape
    steps = settings.iterations or settings.epochs * max(1, math.ceil(n / settings.batch_size))
    params = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    sampler = RandomBatchSampler(n, settings.batch_size, steps, seed=settings.seed)
    losses = []
    for step, batch in enumerate(sampler):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * warmup_cosine(step, steps, settings.warmup, "cosine")
        idx = torch.as_tensor(batch)
        view = torch.randint(views, (len(idx),), generator=generator)
        x = features[view, idx]
        emb = learner.class_embeddings(task)
        loss = F.cross_entropy(logit_scale * x @ emb.t(), labels[idx].to(x.device))
        if fda is not None:
            extra = fda.loss(learner, task, z_task=emb)
            if extra is not None:
                loss = loss + extra
        if not torch.isfinite(loss):
            raise UserError(f"base-to-new: the loss became {float(loss)} at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if fda is not None:
            fda.step()
        losses.append(float(loss.detach()))
    return losses


def _features(model: CLIPTaskModel, datasets: Sequence[Dataset], transform: Any, settings: BaseToNewSettings, device: torch.device, cache: bool = True) -> list[tuple[Tensor, Tensor]]:
    evaluator = TaskEvaluator(datasets, transform, batch_size=settings.eval_batch_size, cache_mb=1024 if cache else 0)
    return [tuple(t.to(device) for t in evaluator.features(model, i, device=device)) for i in range(len(datasets))]  # type: ignore[misc]


# ---------------------------------------------------------------------- runner
def run_base_to_new(stream: StreamData | Sequence[Task], settings: BaseToNewSettings | dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Train CoOp and CoOp + Proxy-FDA on the base classes of every task; score base/new/H.

    Args:
        stream: a ``StreamData`` (its ``base_concepts`` feed Proxy-FDA's extra anchors)
            or a list of tasks.
        settings: ``BaseToNewSettings`` or a mapping of its keys; ``overrides`` update it.

    Returns a JSON-ready dict: ``settings``, ``tasks`` (per task: class split, hand-written
    zero-shot scores and, per variant, ``base``, ``new``, ``h``, ``delta_new``) and
    ``mean`` (per variant and for ``zero_shot``: mean base, mean new, H of the means,
    mean delta_new).
    """
    data = settings.model_dump() if isinstance(settings, BaseToNewSettings) else dict(settings or {})
    try:
        cfg = BaseToNewSettings(**{**data, **overrides})
    except ValidationError as exc:
        from cl_proxyfda.config import first_error

        err = first_error(exc)
        raise ConfigError(f"base-to-new {err.path}", err.problem) from None
    if cfg.prompt.class_specific:
        raise UserError("base-to-new: new classes need a shared context (prompt.class_specific: false)")
    tasks = list(stream.tasks) if isinstance(stream, StreamData) else list(stream)
    base_concepts = list(stream.base_concepts) if isinstance(stream, StreamData) else []
    if not tasks:
        raise UserError("base-to-new: the stream has no tasks")
    device = resolve_device(cfg.device, "base-to-new device")
    torch.manual_seed(cfg.seed)
    clip, pre_train, pre_eval, tokenizer = create_clip(cfg.model_name, cfg.pretrained, device=device)
    model = CLIPTaskModel(clip, tokenizer, [], train_towers=())
    for p in clip.parameters():
        p.requires_grad_(False)
    model.eval()
    logit_scale = float(clip.logit_scale.exp())

    per_task: dict[str, Any] = {}
    for t_index, task in enumerate(tasks):
        base, new = split_classes(task.num_classes, cfg.split, cfg.seed)
        base_names = [task.classnames[c] for c in base]
        new_names = [task.classnames[c] for c in new]
        train_base = ClassSubset(task.train, base)
        shots = few_shot_indices(train_base.targets, cfg.shots, cfg.seed + t_index, len(base), task.name)
        train_set = Subset(train_base, shots)
        (x_base, y_base), (x_new, y_new) = _features(model, [ClassSubset(task.test, base), ClassSubset(task.test, new)], pre_eval, cfg, device)
        if cfg.augment_views:
            views = [_features(model, [train_set], pre_train, cfg, device, cache=False)[0] for _ in range(cfg.augment_views)]
            x_train, y_train = torch.stack([v[0] for v in views]), views[0][1]
        else:
            x_train, y_train = _features(model, [train_set], pre_eval, cfg, device)[0]
            x_train = x_train.unsqueeze(0)
        with torch.no_grad():
            hand_base = template_class_embeddings(model.encode_text, base_names, task.templates)
            hand_new = template_class_embeddings(model.encode_text, new_names, task.templates)
        zero = _scores(accuracy(x_base, y_base, hand_base), accuracy(x_new, y_new, hand_new))
        entry: dict[str, Any] = {"base_classes": base_names, "new_classes": new_names, "zero_shot": zero}
        own = {c.casefold() for c in task.classnames}
        pool = [c for c in dict.fromkeys(base_concepts) if c.casefold() not in own]
        zh_pool = None
        if "coop_prompt_fda" in cfg.variants and pool and cfg.fda.min_anchors > len(base):
            with torch.no_grad():
                zh_pool = template_class_embeddings(model.encode_text, pool, task.templates)
        for variant in cfg.variants:
            torch.manual_seed(cfg.seed)  # the same initial context for every variant
            learner = PromptLearner(clip, tokenizer, [base_names, new_names], cfg.prompt.n_ctx, False, cfg.prompt.init).to(device)
            fda = None
            if variant == "coop_prompt_fda":
                fda = PromptFDA(cfg.fda)
                fda.set_reference(0, base_names, hand_base, pool if zh_pool is not None else (), zh_pool)
            losses = train_prompts(learner, x_train, y_train, cfg, logit_scale, fda)
            with torch.no_grad():
                scores = _scores(accuracy(x_base, y_base, learner.class_embeddings(0)), accuracy(x_new, y_new, learner.class_embeddings(1)))
            scores["delta_new"] = scores["new"] - zero["new"]
            scores["final_loss"] = losses[-1]
            scores["steps"] = len(losses)
            entry[variant] = scores
        per_task[task.name] = entry

    mean: dict[str, Any] = {}
    for variant in ["zero_shot", *cfg.variants]:
        b = float(np.mean([e[variant]["base"] for e in per_task.values()]))
        n = float(np.mean([e[variant]["new"] for e in per_task.values()]))
        mean[variant] = _scores(b, n)
        if variant != "zero_shot":
            mean[variant]["delta_new"] = n - mean["zero_shot"]["new"]
    return {"settings": cfg.model_dump(mode="json"), "tasks": per_task, "mean": mean}


def format_base_to_new(result: dict[str, Any]) -> str:
    """A plain-text table: one line per task and variant, then the means."""
    rows = [f"{'task':<16} {'variant':<16} {'base':>6} {'new':>6} {'H':>6} {'dNew':>6}"]

    def line(name: str, variant: str, s: dict[str, float]) -> str:
        delta = f"{s['delta_new']:>6.1f}" if "delta_new" in s else f"{'-':>6}"
        return f"{name:<16} {variant:<16} {s['base']:>6.1f} {s['new']:>6.1f} {s['h']:>6.1f} {delta}"

    for name, entry in result["tasks"].items():
        for variant in ["zero_shot", *result["settings"]["variants"]]:
            rows.append(line(name, variant, entry[variant]))
    for variant, s in result["mean"].items():
        rows.append(line("mean", variant, s))
    return "\n".join(rows)
