"""Infusing's cosine-classifier head (``infusing_head``): its loss replaces the text-head CE."""
from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import Dataset

from cl_proxyfda.criterion_gate import criterion_gate
from cl_proxyfda.evaluation import TaskEvaluator
from cl_proxyfda.losses.infusing import cosine_classifier_ce, cosine_logits
from cl_proxyfda.models import model_transforms
from cl_proxyfda.strategies.base import CLPlugin, RunContext
from cl_proxyfda.strategies.infusing.data import task_id_of
from cl_proxyfda.strategies.infusing.source import batch_source
from cl_proxyfda.teacher import student_outputs, unwrap


class HeadParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    init: Literal["text", "random"] = Field("text", description="[choice] cosine head from the class-prompt text embeddings, or random (paper)")
    scale: float = Field(16.0, gt=0, description="cosine-classifier logit scale")
    lr: float = Field(1e-3, gt=0, description="learning rate of the head's parameter group")
    weight_decay: float = Field(1e-6, ge=0, description="AdamW weight decay of the head group")
    record_accuracy: bool = Field(True, description="measure the cosine-head test accuracy of each trained task")


class CosineHeadPlugin(CLPlugin):
    """Cosine-classifier cross-entropy (scale 16, no bias) on downstream batches.

    The strategy's criterion (the zero-shot text-head cross-entropy) is muted through its
    criterion gate (:mod:`cl_proxyfda.criterion_gate`) while the head trains; the head's
    loss is added to ``strategy.loss`` in ``before_backward`` like every other term.

    Options (:class:`HeadParams`, read as ``self.params.x``): ``init`` (``text``: frozen
    text embeddings of the class prompts, or ``random``), ``scale`` (logit scale s in
    ``CE(s * cos(e, w_c), y)``), ``lr`` (the head's own parameter group; follows the
    backbone's warm-up/schedule factor), ``weight_decay`` (AdamW, head group) and
    ``record_accuracy``. The random initialisation is seeded by the run's seed (mixed with
    the task id); the cosine-head test accuracy is measured at the run's eval batch size.

    Python-only arguments (keyword-only):
        test_sets: ``(PIL image, label)`` test set per task id; after training a task,
            its cosine-head test accuracy goes to ``diagnostics`` (default: the run's
            stream's test sets when ``record_accuracy``; none on a strategy built by hand).
        task_names: names used in ``diagnostics`` keys (default: the stream's task names,
            else ``task{i}``).
    """

    Params = HeadParams
    name = "infusing_head"
    params: HeadParams

    def __init__(
        self,
        params: HeadParams | None = None,
        /,
        *,
        run: RunContext | None = None,
        test_sets: Sequence[Dataset] | None = None,
        task_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, run=run, **kwargs)
        stream = self.context().stream
        tasks = list(stream.tasks) if stream is not None else []
        if test_sets is None and tasks:
            test_sets = [t.test for t in tasks]
        if task_names is None and tasks:
            task_names = [t.name for t in tasks]
        self.test_sets = list(test_sets) if test_sets is not None and self.params.record_accuracy else None
        self.task_names = list(task_names) if task_names is not None else None
        self.heads: dict[int, nn.Parameter] = {}
        self.diagnostics: dict[str, float] = {}
        self.group: dict[str, Any] | None = None
        self._task = 0
        self._tests: TaskEvaluator | None = None

    def head(self, task: int) -> nn.Parameter | None:
        return self.heads.get(int(task))

    def _make_head(self, strategy: Any, task: int) -> nn.Parameter:
        with torch.no_grad():  # the zero-shot head: the template ensemble, not the training prompts
            text = unwrap(strategy.model).class_embeddings(task).detach().float()
        if self.params.init == "text":
            weight = text.clone()
        else:
            gen = torch.Generator().manual_seed(self.context(strategy).seed * 1_000_003 + task)
            weight = torch.randn(text.shape, generator=gen) / text.shape[1] ** 0.5
        return nn.Parameter(weight.to(strategy.device))

    def _lr_factor(self, strategy: Any) -> float:
        base = getattr(strategy, "base_lr", 0.0)
        if not base:
            return 1.0
        return strategy.optimizer.param_groups[0]["lr"] / base

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        criterion_gate(strategy, self.name).mute(self.name)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._task = task_id_of(strategy)
        head = self.heads.get(self._task)
        if head is None:
            head = self._make_head(strategy, self._task)
        elif head.device.type != strategy.device.type:  # loaded from a checkpoint (CPU)
            head = nn.Parameter(head.detach().to(strategy.device))
        self.heads[self._task] = head
        # The strategy's optimizer was made (fresh) before plugins' before_training_exp.
        self.group = {"params": [head], "lr": self.params.lr * self._lr_factor(strategy), "weight_decay": self.params.weight_decay, "base_lr": self.params.lr, "name": "infusing_head"}
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
            self.group["lr"] = self.params.lr * self._lr_factor(strategy)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if batch_source(strategy) != "downstream":
            return
        embeds = student_outputs(strategy)["image_embeds"]
        loss = cosine_classifier_ce(embeds, self.heads[self._task], strategy.mb_y, self.params.scale)
        self.loss_terms["cosine_ce"] = float(loss.detach())
        strategy.loss = strategy.loss + loss

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.group = None

    def after_training(self, strategy: Any, **kwargs: Any) -> None:
        criterion_gate(strategy, self.name).mute(self.name, on=False)
        # After every plugin's after_training_exp, so a selected checkpoint is measured.
        if self.test_sets is None or self._task >= len(self.test_sets) or len(self.test_sets[self._task]) == 0:
            return
        if self._tests is None:  # the project's evaluator; test inputs are not kept (cache 0)
            _, eval_transform = model_transforms(unwrap(strategy.model))
            self._tests = TaskEvaluator(self.test_sets, eval_transform, self.context(strategy).eval_batch_size, cache_mb=0, own_rng=True)
        embeds, labels = self._tests.features(strategy.model, self._task, strategy.device, getattr(strategy, "autocast_dtype", None))
        logits = cosine_logits(embeds, self.heads[self._task].detach().cpu(), self.params.scale)
        acc = 100.0 * float((logits.argmax(dim=1) == labels).float().mean())
        name = self.task_names[self._task] if self.task_names and self._task < len(self.task_names) else f"task{self._task}"
        self.diagnostics[f"head_accuracy/{name}"] = acc

    def state_dict(self) -> dict[str, Any]:
        return {"heads": {t: h.detach().cpu().clone() for t, h in self.heads.items()}, "diagnostics": dict(self.diagnostics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.heads = {int(t): nn.Parameter(h.clone().float()) for t, h in state.get("heads", {}).items()}
        self.diagnostics = {str(k): float(v) for k, v in state.get("diagnostics", {}).items()}
