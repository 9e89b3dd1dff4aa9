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
   the SigLIP-shaped loss with learnable ``tau``/``b`` and, with ``proxies: true``,
   generated proxies trained by the generator's own loss: the functions of
   ``cl_proxyfda/losses/fda.py`` unchanged. ``weight * L_FDA + L_generator`` is added to
   the strategy loss in ``before_backward``; ``tau``, ``b`` and the generator step in
   ``after_update`` with their own AdamW.

``PromptFDA`` is the same computation without Avalanche (used by ``base_to_new``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from cl_proxyfda.errors import UserError
from cl_proxyfda.losses.fda import ProxyGenerator, fda_loss, generator_loss, graph_mask, knn_graph, make_proxies
from cl_proxyfda.prompt_learner import PromptLearner, prompt_learner_of
from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.base import CLPlugin, RunContext
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


class PromptFDAParams(_NeedsPromptLearner):
    """Options of Proxy-FDA on class text embeddings (``prompt_fda``)."""

    plugin: ClassVar[str] = "prompt_fda"

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    weight: float = Field(1.0, ge=0, description="lambda, the weight of the FDA loss")
    k: int = Field(8, ge=1, le=65536, description="K neighbours in the reference graph (capped at anchors - 1)")
    min_anchors: int = Field(
        64, ge=0, description="fill the anchor set up to this many nodes with base concepts (shared context only; 0: task classes only)"
    )
    proxies: bool = Field(True, description="add generated proxies (false: plain FDA)")
    n_proxies: int = Field(4, ge=1, le=65536, description="proxies per positive and per negative set")
    tau_init: float = Field(0.1, gt=0, description="initial temperature tau (log-parametrised)")
    bias_init: float = Field(0.0, description="initial bias b")
    learn_tau_bias: bool = Field(True, description="learn tau and b (false: keep them fixed)")
    tau_bias_lr: float = Field(1e-2, gt=0, description="AdamW learning rate of log tau and b")
    neg_weight: Literal["clamp0", "minus_one", "one_minus"] = Field("clamp0", description="non-neighbour weight: -max(Sh,0), -1 or -(1-Sh)")
    generator_lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the proxy generator")
    generator_alpha: float = Field(1.0, ge=0, description="weight of the diversity term in the generator loss")
    generator_temperature: float = Field(0.1, gt=0, description="temperature of the generator's InfoNCE terms")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the base-concept anchor draws")


# --------------------------------------------------------------------------- core
class PromptFDA(nn.Module):
    """Proxy-FDA over class embeddings: learnable ``tau``/``b``, generator, own optimizer.

    Usage per experience: ``set_reference(task, names, zh, pool_names, zh_pool)``; per
    iteration: ``loss(learner, task)`` (add it to the model loss, backward), then
    ``step()`` after the model's optimizer step.
    """

    def __init__(self, params: PromptFDAParams) -> None:
        super().__init__()
        self.params = params
        self.log_tau = nn.Parameter(torch.tensor(math.log(params.tau_init)), requires_grad=params.learn_tau_bias)
        self.bias = nn.Parameter(torch.tensor(float(params.bias_init)), requires_grad=params.learn_tau_bias)
        self.generator: ProxyGenerator | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.dim: int | None = None
        self.rng = torch.Generator().manual_seed(params.seed)
        self.references: dict[int, tuple[list[str], Tensor, list[str], Tensor | None]] = {}
        self.terms: dict[str, float] = {}
        self.anchor_count = 0  # anchors of the last loss (diagnostic)

    @property
    def tau(self) -> float:
        return float(self.log_tau.detach().exp())

    def set_reference(self, task: int, names: Sequence[str], zh: Tensor, pool_names: Sequence[str] = (), zh_pool: Tensor | None = None) -> None:
        """Reference embeddings of a task's classes and of the base-concept pool."""
        if len(names) != zh.shape[0]:
            raise ValueError(f"{len(names)} class names for {zh.shape[0]} reference embeddings")
        if zh_pool is not None and len(pool_names) != zh_pool.shape[0]:
            raise ValueError(f"{len(pool_names)} pool names for {zh_pool.shape[0]} reference embeddings")
        self.references[task] = (list(names), zh.detach().float(), list(pool_names), None if zh_pool is None else zh_pool.detach().float())

    def _setup(self, dim: int | None, device: torch.device) -> None:
        groups = []
        if self.params.learn_tau_bias:
            groups.append({"params": [self.log_tau, self.bias], "lr": self.params.tau_bias_lr, "weight_decay": 0.0})
        if self.params.proxies:
            assert dim is not None
            self.dim = dim
            self.generator = ProxyGenerator(dim, self.params.n_proxies)
            groups.append({"params": list(self.generator.parameters()), "lr": self.params.generator_lr})
        self.to(device)
        self.optimizer = torch.optim.AdamW(groups) if groups else None

    def _to_device(self, device: torch.device) -> None:
        if self.log_tau.device == device:
            return
        state = self.optimizer.state_dict() if self.optimizer is not None else None
        self.to(device)
        if self.optimizer is not None and state is not None:
            self.optimizer.load_state_dict(state)

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
        n = z.shape[0]
        self.anchor_count = n
        if n < 2:
            return None
        if self.optimizer is None and (self.params.learn_tau_bias or self.params.proxies):
            self._setup(z.shape[1], z.device)
        self._to_device(z.device)
        k = min(self.params.k, n - 1)
        sim_h = zh @ zh.t()
        positives = graph_mask(knn_graph(sim_h, k), n)
        proxies = gen_loss = None
        if self.generator is not None:
            pooling = self.generator(z, sim_h, positives)
            proxies = make_proxies(z, sim_h, pooling, self.params.neg_weight)
            gen_loss = generator_loss(z, pooling, positives, temperature=self.params.generator_temperature, alpha=self.params.generator_alpha)
        loss = fda_loss(z, zh, k, self.log_tau, self.bias, self.params.neg_weight, proxies, positives)
        self.terms = {"prompt_fda": float(loss.detach())}
        total = self.params.weight * loss
        if gen_loss is not None:
            self.terms["prompt_fda_generator"] = float(gen_loss.detach())
            total = total + gen_loss
        return total

    def step(self) -> None:
        """Step ``tau``, ``b`` and the generator (after the backward of the model loss)."""
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    # ----------------------------------------------------------------- state
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "log_tau": self.log_tau.detach().cpu().clone(),
            "bias": self.bias.detach().cpu().clone(),
            "dim": -1 if self.dim is None else int(self.dim),
            "generator": {} if self.generator is None else {k: v.detach().cpu().clone() for k, v in self.generator.state_dict().items()},
            "optimizer": {} if self.optimizer is None else self.optimizer.state_dict(),
            "rng": self.rng.get_state(),
        }

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"log_tau", "bias", "dim", "generator", "optimizer", "rng"}
        if unknown:
            raise ValueError(f"prompt_fda got state it does not know: {sorted(unknown)}")
        with torch.no_grad():
            self.log_tau.copy_(state["log_tau"])
            self.bias.copy_(state["bias"])
        if state["optimizer"]:  # the saved loss had been set up (it had seen a batch)
            if self.optimizer is None:
                self._setup(int(state["dim"]) if state["dim"] > 0 else None, self.log_tau.device)
            if self.generator is not None:
                self.generator.load_state_dict(state["generator"])
            self.optimizer.load_state_dict(state["optimizer"])
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
