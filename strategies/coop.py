"""CoOp prompt tuning and Proxy-FDA on class text embeddings.

``coop`` (``CoOpPlugin``): the prompt-tuning strategy. The training itself is the
strategy's task loss (cross-entropy of ``tau_clip * u(x) W^T`` where ``W`` are the class
embeddings of the learned prompts); the plugin owns nothing and only checks that the
model classifies with a prompt learner (``model.prompt_learner``) whose context is the
only trainable tensor.

``prompt_fda`` (``PromptFDAPlugin``): Proxy-FDA (docs/methods.md section 1) with *classes in
place of images*. Per training iteration:

1. Anchors: **all C classes of the current task**, every iteration. When C is below
   ``min_anchors`` (default 64, the image plugin's batch size) and the context is
   shared, the anchor set is filled up to ``min_anchors`` with class names drawn from
   the stream's base-concept vocabulary (``StreamData.base_concepts``, concepts never
   trained in the stream; the task's own class names are removed from it): a fresh
   draw without replacement every iteration from the plugin's own seeded generator
   (``seed``), as the image plugin sees a fresh batch every iteration. A
   class-specific context has no context for those names, so it uses the task's
   classes only.
2. ``zh`` (reference, pre-trained space): the frozen template-ensemble embedding of each
   anchor name with the **hand-written prompts** (the current task's templates), from
   the pre-trained reference model, computed once per experience for the task's
   classes and the whole base-concept pool (no gradient).
3. ``z``: the embedding of each anchor name with the **learned prompts**
   (``learner.class_embeddings(task)`` for the task's classes, reusing the one the
   model's forward just computed, and ``learner.encode_names`` for the drawn base
   concepts).
4. The kNN graph in the reference space with ``K = min(k, anchors - 1)``, signed weights,
   the SigLIP-shaped loss and, with ``proxies: true``, generated proxies trained by the
   generator's own loss: the same :class:`~cl_proxyfda.strategies.fda_head.FDAHead`
   (and the same defaults: tau 0.1, b -10 fixed) as ``proxy_fda``.
   ``weight * L_FDA + L_generator`` is added to the strategy loss in
   ``before_backward``; ``tau``, ``b`` and the generator step in ``after_update``.

``PromptFDA`` is the same computation without Avalanche (used by ``base_to_new``).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from cl_proxyfda.errors import UserError
from cl_proxyfda.losses.fda import graph_mask, knn_graph
from cl_proxyfda.losses.proxy_generator import ProxyGenerator
from cl_proxyfda.prompt_learner import PromptLearner, prompt_learner_of
from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.base import CLPlugin, RunContext
from cl_proxyfda.strategies.fda_head import FDAHead, FDALossParams, ProxyOptions
from cl_proxyfda.teacher import teacher_bank, unwrap


# ------------------------------------------------------------------------ helpers
@torch.no_grad()
def template_class_embeddings(encode_text: Callable[[list[str]], Tensor], names: Sequence[str], templates: Sequence[str], chunk: int = 1024) -> Tensor:
    """Normalised template-ensemble embeddings (N, D) of class names (hand-written prompts).

    ``encode_text`` maps a list of strings to normalised text features
    (``CLIPTaskModel.encode_text``). Same computation as the model's zero-shot heads.
    """
    names, templates = list(names), list(templates)
    if not names:
        raise ValueError("no class names to embed")
    prompts = [t.format(c) for c in names for t in templates]
    feats = torch.cat([encode_text(prompts[i : i + chunk]).float() for i in range(0, len(prompts), chunk)])
    return F.normalize(feats.view(len(names), len(templates), -1).mean(dim=1), dim=-1)


def knn_overlap(z: Tensor, zh: Tensor, k: int) -> float:
    """Mean fraction of each anchor's K reference-space neighbours that are also its K
    nearest in the student space (1 = identical graphs; ``1 - overlap`` is the graph
    mismatch)."""
    n = z.shape[0]
    k = min(k, n - 1)
    mine = graph_mask(knn_graph(z.detach() @ z.detach().t(), k), n)
    ref = graph_mask(knn_graph(zh @ zh.t(), k), n)
    return float((mine & ref).sum(dim=1).float().mean() / k)


def graph_mismatch(z: Tensor, zh: Tensor, k: int) -> float:
    """``1 - knn_overlap``: 0 when the student keeps every reference neighbourhood."""
    return 1.0 - knn_overlap(z, zh, k)


# ------------------------------------------------------------------------- params
class _NeedsPromptLearner(BaseModel):
    """Options of a plugin that trains the prompt context: the run needs ``model.prompt_learner``."""

    plugin: ClassVar[str] = "coop"

    def check_run(self, cfg: Any) -> None:
        if cfg.model.prompt_learner is None:  # ": " first: the error names the strategy entry itself
            raise ValueError(f": {self.plugin} needs a prompt learner: set model.prompt_learner (e.g. {{n_ctx: 16}})")


class CoOpParams(_NeedsPromptLearner):
    """``coop`` takes no options (prompt options live in ``model.prompt_learner``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PromptFDAParams(_NeedsPromptLearner, ProxyOptions, FDALossParams):
    """Options of Proxy-FDA on class text embeddings (``prompt_fda``): the FDA loss's and
    the proxies' (the same head and defaults as ``proxy_fda``) plus the anchor set's."""

    plugin: ClassVar[str] = "prompt_fda"

    min_anchors: int = Field(
        64, ge=0, description="fill the anchor set up to this many nodes with base concepts (shared context only; 0: task classes only)"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the base-concept anchor draws")


# --------------------------------------------------------------------------- core
class PromptFDA(nn.Module):
    """Proxy-FDA over class embeddings: the shared :class:`FDAHead` plus the anchor set.

    Usage per experience: ``set_reference(task, names, zh, pool_names, zh_pool)``; per
    iteration: ``loss(learner, task)`` (add it to the model loss, backward), then
    ``step()`` after the model's optimizer step.
    """

    def __init__(self, params: PromptFDAParams) -> None:
        super().__init__()
        self.params = params
        self.head = FDAHead(params, params)
        self.rng = torch.Generator().manual_seed(params.seed)
        self.references: dict[int, tuple[list[str], Tensor, list[str], Tensor | None]] = {}
        self.terms: dict[str, float] = {}
        self.anchor_count = 0  # anchors of the last loss (diagnostic)

    @property
    def tau(self) -> float:
        return self.head.tau

    @property
    def bias(self) -> Tensor:
        return self.head.bias

    @property
    def generator(self) -> ProxyGenerator | None:
        return self.head.generator

    def set_reference(self, task: int, names: Sequence[str], zh: Tensor, pool_names: Sequence[str] = (), zh_pool: Tensor | None = None) -> None:
        """Reference embeddings of a task's classes and of the base-concept pool."""
        if len(names) != zh.shape[0]:
            raise ValueError(f"{len(names)} class names for {zh.shape[0]} reference embeddings")
        if zh_pool is not None and len(pool_names) != zh_pool.shape[0]:
            raise ValueError(f"{len(pool_names)} pool names for {zh_pool.shape[0]} reference embeddings")
        self.references[task] = (list(names), zh.detach().float(), list(pool_names), None if zh_pool is None else zh_pool.detach().float())

    def anchors(self, learner: PromptLearner, task: int, z_task: Tensor | None = None) -> tuple[Tensor, Tensor, list[str]]:
        """``(z, zh, names)`` of this iteration's anchors (task classes, then drawn base concepts)."""
        if task not in self.references:
            raise RuntimeError(f"prompt_fda: no reference embeddings for task {task} (set_reference was not called)")
        names, zh, pool, zh_pool = self.references[task]
        z = learner.class_embeddings(task) if z_task is None else z_task
        z = z.float()
        zh = zh.to(z.device)
        extra = 0 if learner.class_specific else min(max(0, self.params.min_anchors - len(names)), len(pool))
        if extra == 0 or zh_pool is None:
            return z, zh, list(names)
        idx = torch.randperm(len(pool), generator=self.rng)[:extra]
        drawn = [pool[i] for i in idx.tolist()]
        z_extra = learner.encode_names(drawn).float()
        return torch.cat([z, z_extra]), torch.cat([zh, zh_pool[idx].to(z.device)]), names + drawn

    def loss(self, learner: PromptLearner, task: int, z_task: Tensor | None = None) -> Tensor | None:
        """``weight * L_FDA (+ proxies) + L_generator`` for this iteration (None below 2 anchors)."""
        z, zh, _ = self.anchors(learner, task, z_task)
        self.anchor_count = z.shape[0]
        if z.shape[0] < 2:
            return None
        loss, gen_loss = self.head.losses(z, zh)
        self.terms = {"prompt_fda": float(loss.detach())}
        total = self.params.weight * loss
        if gen_loss is not None:
            self.terms["prompt_fda_generator"] = float(gen_loss.detach())
            total = total + gen_loss
        return total

    def step(self) -> None:
        """Step ``tau``, ``b`` and the generator (after the backward of the model loss)."""
        self.head.step()

    # ----------------------------------------------------------------- state
    def checkpoint_state(self) -> dict[str, Any]:
        return {**self.head.checkpoint_state(), "rng": self.rng.get_state()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        unknown = set(state) - FDAHead.STATE_KEYS - {"rng"}
        if unknown:
            raise ValueError(f"prompt_fda got state it does not know: {sorted(unknown)}")
        self.head.load_checkpoint_state(state)
        self.rng.set_state(state["rng"])


# ------------------------------------------------------------------------ plugins
@STRATEGIES.register("coop", help="CoOp: few-shot prompt tuning (needs model.prompt_learner)")
class CoOpPlugin(CLPlugin):
    """Marks a prompt-tuning run: checks that only the prompt context trains."""

    Params = CoOpParams
    name = "coop"

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        learner = prompt_learner_of(strategy.model)
        own = {id(p) for p in learner.parameters()}
        stray = [n for n, p in unwrap(strategy.model).named_parameters() if p.requires_grad and id(p) not in own]
        if stray:
            raise UserError(f"coop: only the prompt context may train, but {len(stray)} other tensors are trainable (e.g. {stray[0]})")


@STRATEGIES.register("prompt_fda", help="Proxy-FDA on class text embeddings of learned prompts")
class PromptFDAPlugin(CLPlugin):
    """Adds ``weight * L_FDA (+ proxies) + L_generator`` over class embeddings (see module doc).

    The extra anchors are the base concepts of ``run.stream`` (none without a run).
    """

    Params = PromptFDAParams
    params: PromptFDAParams

    def __init__(self, params: PromptFDAParams | None = None, /, *, run: RunContext | None = None, **kwargs: Any) -> None:
        super().__init__(params, run=run, **kwargs)
        self.name = "prompt_fda"
        base_concepts: Sequence[str] = getattr(self.context().stream, "base_concepts", ()) or ()
        self.base_concepts = list(dict.fromkeys(base_concepts))
        self.core = PromptFDA(self.params)

    def state_dict(self) -> dict[str, Any]:
        return self.core.checkpoint_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.core.load_checkpoint_state(state)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        learner = prompt_learner_of(strategy.model)
        model = unwrap(strategy.model)
        reference = teacher_bank(strategy).get(strategy.model, "pretrained")
        for task in strategy.experience.task_labels:
            vocab = model.tasks[int(task)]
            own = {c.casefold() for c in vocab.classnames}
            pool = [c for c in self.base_concepts if c.casefold() not in own]
            zh = template_class_embeddings(reference.encode_text, vocab.classnames, vocab.templates)
            wants_pool = pool and not learner.class_specific and self.params.min_anchors > len(vocab.classnames)
            zh_pool = template_class_embeddings(reference.encode_text, pool, vocab.templates) if wants_pool else None
            self.core.set_reference(int(task), vocab.classnames, zh, pool if wants_pool else (), zh_pool)

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        # The forward refills it; never reuse embeddings whose graph a backward freed.
        prompt_learner_of(strategy.model).last_trained.clear()

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        learner = prompt_learner_of(strategy.model)
        tasks = [int(t) for t in torch.unique(strategy.mb_task_id).tolist()]
        losses = []
        for task in tasks:
            loss = self.core.loss(learner, task, learner.last_trained.get(task))
            if loss is not None:
                losses.append(loss)
        if losses:
            self.loss_terms.update(self.core.terms)
            strategy.loss = strategy.loss + torch.stack(losses).mean()

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        self.core.step()
