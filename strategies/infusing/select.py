"""Infusing's model selection (``infusing_select``): keep the best iterate of each experience."""
from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from cl_proxyfda.errors import UserError
from cl_proxyfda.evaluation import TaskEvaluator
from cl_proxyfda.knn import knn_accuracy
from cl_proxyfda.losses.infusing import cosine_logits
from cl_proxyfda.strategies.anchors import trainable_named_parameters
from cl_proxyfda.strategies.base import CLPlugin, RunContext
from cl_proxyfda.strategies.infusing.data import stratified_split, task_id_of
from cl_proxyfda.strategies.infusing.generic import GenericDistillPlugin
from cl_proxyfda.strategies.infusing.head import CosineHeadPlugin
from cl_proxyfda.teacher import unwrap


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


def find_plugin(strategy: Any, cls: type) -> Any:
    """The strategy's plugin of type ``cls`` (another part of the recipe), or None."""
    return next((p for p in strategy.plugins if isinstance(p, cls)), None)


class BestCheckpointPlugin(CLPlugin):
    """Keeps the best iterate of each experience by validation score and restores it.

    The validation sets are scored by the project's evaluator
    (:class:`cl_proxyfda.evaluation.TaskEvaluator`, preprocessed inputs kept up to
    ``cache_mb``); the generic k-NN score is :func:`cl_proxyfda.knn.knn_accuracy`.

    Options (:class:`SelectParams`, read as ``self.params.x``): ``every`` (evaluate after
    every ``every`` optimizer steps and after the last), ``val_fraction`` (class-stratified
    share of the task's training data held out), ``generic_score`` (``knn``: leave-one-out
    k-NN accuracy on the generic validation split; ``alignment``: 100 * mean cosine to the
    pre-trained embeddings; ``auto``: knn when the generic validation images carry two or
    more labels, else alignment, as for unlabelled reference images), ``knn_k``,
    ``include_start`` (also score the weights at the start of the experience) and
    ``cache_mb`` (of the validation passes).

    From the run (:meth:`context`): the seed of the validation split (mixed with the
    experience index), the eval batch size and workers of the validation passes.

    Python-only argument (keyword-only):
        scorer: replaces the score, ``scorer(strategy) -> float``.
    """

    Params = SelectParams
    name = "infusing_select"
    params: SelectParams

    def __init__(
        self,
        params: SelectParams | None = None,
        /,
        *,
        run: RunContext | None = None,
        scorer: Callable[[Any], float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, run=run, **kwargs)
        self.scorer = scorer
        self.history: list[dict[str, Any]] = []
        self.val: TaskEvaluator | None = None  # the experience's validation split (set 0)
        self.generic_val: TaskEvaluator | None = None  # the generic validation images (set 0)
        self._best: dict[str, Any] | None = None
        self._evaluations: list[list[float]] = []
        self._last_step = -1

    # ------------------------------------------------------------------ data
    def after_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        exp_data = strategy.experience.dataset
        adapted = strategy.adapted_dataset
        if len(adapted) != len(exp_data):
            raise UserError("infusing_select: another plugin changed the training data of the experience; list infusing_select first")
        ctx = self.context(strategy)
        seed = ctx.seed * 1_000_003 + 104_729 + int(strategy.experience.current_experience)
        train_idx, val_idx = stratified_split([int(t) for t in exp_data.targets], self.params.val_fraction, seed)
        if not val_idx:
            raise UserError(f"infusing_select: val_fraction {self.params.val_fraction} leaves no validation images (every class needs 2 or more training images)")
        strategy.adapted_dataset = adapted.subset(train_idx)
        # eval-transformed items (x, y, t): the evaluator keeps x and y
        self.val = TaskEvaluator([exp_data.eval().subset(val_idx)], None, ctx.eval_batch_size, cache_mb=self.params.cache_mb, workers=ctx.workers, own_rng=True)

    # ----------------------------------------------------------------- score
    def _embed(self, evaluator: TaskEvaluator, strategy: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return evaluator.features(strategy.model, 0, strategy.device, getattr(strategy, "autocast_dtype", None))

    def score(self, strategy: Any) -> dict[str, float]:
        """``downstream`` and ``generic`` validation scores (%) and their mean ``score``."""
        if self.scorer is not None:
            return {"score": float(self.scorer(strategy))}
        task = task_id_of(strategy)
        model = unwrap(strategy.model)
        head_plugin = find_plugin(strategy, CosineHeadPlugin)
        embeds, labels = self._embed(self.val, strategy)  # type: ignore[arg-type]
        if head_plugin is not None and head_plugin.head(task) is not None:
            logits = cosine_logits(embeds, head_plugin.head(task).detach().cpu(), head_plugin.params.scale)
        else:
            with torch.no_grad():
                logits = embeds @ model.class_embeddings(task).detach().float().cpu().t()
        out = {"downstream": 100.0 * float((logits.argmax(dim=1) == labels).float().mean())}
        generic = find_plugin(strategy, GenericDistillPlugin)
        if generic is not None:
            if self.generic_val is None:
                self.generic_val = generic.val_set(strategy, self.params.cache_mb)
                if self.generic_val is None:
                    raise UserError("infusing_select: the generic set has no validation split; set generic val_fraction > 0")
            g_embeds, pos = self._embed(self.generic_val, strategy)
            if self.generic_kind(generic) == "knn":
                out["generic"] = knn_accuracy(g_embeds, generic.labels[pos], self.params.knn_k)
            else:
                targets = torch.nn.functional.normalize(generic.targets[pos].float(), dim=-1)
                out["generic"] = 100.0 * float((g_embeds * targets).sum(dim=1).mean())
            out["score"] = (out["downstream"] + out["generic"]) / 2
        else:
            out["score"] = out["downstream"]
        return out

    def generic_kind(self, generic: GenericDistillPlugin) -> str:
        """``knn`` or ``alignment``: the generic score in use (``auto`` resolved)."""
        if self.params.generic_score != "auto":
            return self.params.generic_score
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
        if self.params.include_start:
            self._evaluate(strategy, 0)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        step = strategy.clock.train_exp_iterations + 1  # the clock counts after the plugins
        if step % self.params.every == 0:
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
