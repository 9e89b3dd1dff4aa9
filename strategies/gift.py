"""GIFT: synthetic-replay distillation with a text-to-image model (docs/methods.md section 2).

Per experience the teacher is the model at the end of the previous experience (the
pre-trained model for the first); a synthetic set of ``images_per_experience`` image-
prompt pairs is planned from base concepts and the *previous* tasks' classes, generated
once into a disk cache (see :mod:`cl_proxyfda.synthetic`) and read with the model's eval
transform. Each iteration draws one synthetic batch beside the real one and adds

    kd_weight * L_KD(M, M0) + ita_weight * L_ITA(M, A)

where ``M``/``M0`` are the student's/teacher's B x B similarity matrices of the batch's
images against its own prompts and ``A`` the duplicate-aware matching targets. The
synthetic set is fixed within an experience, so the teacher's image and text embeddings
of the whole set are computed once per experience (``cache_teacher``); so are the
student's text embeddings when its text tower is frozen; and the transformed images are
read once and kept in memory when they fit ``cache_images_mb`` (else every batch reads
and transforms its files). Under ``torch.distributed`` each process takes its share of
every synthetic batch (the tables hold the whole set, indexed by dataset position).

The synthetic term is published on the strategy's synthetic-loss channel
(:mod:`cl_proxyfda.synthetic_terms`) so that the ``awc`` strategy can take its importance
from it without a second backward.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from cl_proxyfda.errors import UserError
from cl_proxyfda.generators.prompt_pool import BASE_TEMPLATE
from cl_proxyfda.losses.gift import (
    ITA_LABEL_SMOOTHING,
    KD_TEMPERATURE,
    contrastive_distillation,
    duplicate_aware_targets,
    image_text_alignment,
    similarity_logits,
)
from cl_proxyfda.ledger import tensor_mb
from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.synthetic_terms import add_synthetic_loss, publish_synthetic_loss, register_synthetic_producer, release_synthetic_terms
from cl_proxyfda.side_data import SideBatches
from cl_proxyfda.strategies.base import CLPlugin, RunContext
from cl_proxyfda.synthetic import (
    BaseConcepts,
    SyntheticPlan,
    SyntheticSpec,
    TransformedImages,
    autocast_context,
    cache_root,
    derived_seed,
    eval_transform,
    load_plan,
    prepare_experience,
    stream_key,
)
from cl_proxyfda.teacher import teacher_bank, unwrap


class GeneratorChoice(BaseModel):
    """``{name: <generator backend>, ...its arguments}``, checked against the registry."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str = "diffusers"

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _known_backend(self) -> "GeneratorChoice":
        from cl_proxyfda import generators  # noqa: F401  (registers the backends)
        from cl_proxyfda.registry import GENERATORS

        try:
            entry = GENERATORS.get(self.name)
        except KeyError as exc:
            raise ValueError(str(exc.args[0])) from None
        try:
            entry.params(**self.args)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{self.name} generator: {where}: {err['msg']}") from None
        return self


class GIFTParams(BaseModel):
    """Options of the ``gift`` strategy (defaults: the paper's)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    generator: GeneratorChoice = Field(default_factory=GeneratorChoice, description="text-to-image backend: {name: diffusers|..., args}")
    images_per_experience: int = Field(1000, ge=1, le=10_000_000, description="N synthetic image-prompt pairs per experience")
    synthetic_batch_size: int = Field(64, ge=2, le=65536, description="synthetic pairs per iteration (beside the real batch)")
    kd_weight: float = Field(1.0, ge=0, description="weight of the contrastive distillation L_KD")
    ita_weight: float = Field(0.25, ge=0, description="weight of the image-text alignment L_ITA")
    kd_temperature: float = Field(KD_TEMPERATURE, gt=0, description="T of L_KD")
    ita_label_smoothing: float = Field(ITA_LABEL_SMOOTHING, ge=0, lt=1, description="label smoothing of L_ITA")
    base_template: str = Field(BASE_TEMPLATE, description="template of the base concepts' prompts")
    base_concepts: BaseConcepts = Field(
        "auto", description="auto: the stream's base concepts, else ImageNet's classes; stream; imagenet; or a list of names"
    )
    exclude_current_classes: bool = Field(False, description="also drop pool prompts naming a current-task class (paper: off)")
    dedupe: bool = Field(
        False, description="drop repeated prompts from the pool (official code: kept, so a repeated prompt is drawn more often)"
    )
    cache_dir: str | None = Field(None, description="synthetic cache root (default: <run.output_dir>/synthetic)")
    cache_teacher: bool = Field(True, description="teacher embeddings of the synthetic set once per experience (false: per batch)")
    cache_images_mb: float = Field(
        1024.0, ge=0, description="keep the transformed synthetic set in memory when it fits this many MB (0: read the files at every batch)"
    )
    paper_doubled_weights: bool = Field(False, description="double KD, ITA and AWC as the code at the time of the paper effectively did")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the prompt draw and of the image seeds (fixed: runs share one synthetic set)")

    @model_validator(mode="after")
    def _template_has_placeholder(self) -> "GIFTParams":
        if "{}" not in self.base_template and "{c}" not in self.base_template:
            raise ValueError(f"base_template {self.base_template!r} has no '{{}}' placeholder")
        return self

    def spec(self, output_dir: str) -> SyntheticSpec:
        """The synthetic-set description shared with ``cl-proxyfda generate``."""
        concepts = list(self.base_concepts) if isinstance(self.base_concepts, list) else self.base_concepts
        return SyntheticSpec(
            images_per_experience=self.images_per_experience,
            seed=self.seed,
            base_concepts=concepts,
            base_template=self.base_template,
            exclude_current_classes=self.exclude_current_classes,
            root=cache_root(self.cache_dir, output_dir),
            generator_name=self.generator.name,
            generator_args=self.generator.args,
            dedupe=self.dedupe,
        )


@STRATEGIES.register("gift", help="GIFT: distillation on generated image-text pairs from the previous model")
class GIFTPlugin(CLPlugin):
    """Adds ``kd_weight * L_KD + ita_weight * L_ITA`` on a synthetic batch per iteration.

    Needs the stream (its tasks name the synthetic prompts): ``run=RunContext(stream=...)``.
    """

    Params = GIFTParams
    name = "gift"
    params: GIFTParams

    def __init__(self, params: GIFTParams | None = None, /, *, run: RunContext | None = None, **kwargs: Any) -> None:
        super().__init__(params, run=run, **kwargs)
        ctx = self.context()
        if ctx.stream is None:
            raise UserError("gift: the strategy needs the stream (build it through the runner)")
        params = self.params
        self.stream = ctx.stream
        self.key = stream_key(ctx.stream_name, dict(ctx.stream_args))
        self.spec = params.spec(ctx.output_dir)
        self.run_seed = ctx.seed
        self.workers = ctx.workers
        self.progress = ctx.progress
        scale = 2.0 if params.paper_doubled_weights else 1.0
        self.kd_weight = params.kd_weight * scale
        self.ita_weight = params.ita_weight * scale
        self.consumer_weight_multiplier = scale  # asked of AWC through the synthetic channel
        # per experience
        self.plan: SyntheticPlan | None = None
        self.generation_stats: dict[str, int] = {}
        self._transform: Any = None
        self._images: TransformedImages | None = None
        self._prompt_ids: Tensor | None = None  # (n,) id of each item's prompt in self._prompts
        self._prompts: list[str] = []
        self._teacher_image: Tensor | None = None
        self._teacher_text: Tensor | None = None
        self._student_text: Tensor | None = None
        self._batches: SideBatches | None = None
        # counters (tests, benchmarks)
        self.teacher_image_forwards = 0
        self.table_mb = 0.0  # the largest teacher table of a synthetic set (cost ledger)
        self.teacher_text_forwards = 0
        self.experiences_prepared = 0
        self.synthetic_images = 0  # images of the synthetic sets used so far (cost ledger)
        self.synthetic_seconds = 0.0  # time spent generating or loading them

    def ledger(self) -> dict[str, float]:
        """Extra data for the run's cost ledger."""
        return {"synthetic_images": self.synthetic_images, "synthetic_seconds": self.synthetic_seconds, "teacher_table_mb": self.table_mb}

    # ------------------------------------------------------------ experience
    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        register_synthetic_producer(strategy, "gift", self.consumer_weight_multiplier)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = unwrap(strategy.model)
        bank = teacher_bank(strategy)
        bank.refresh_previous(strategy.model)
        index = strategy.experience_index
        started = time.perf_counter()
        self.plan, self.generation_stats = prepare_experience(
            self.spec, self.stream, self.key, index, device=strategy.device, progress=self.progress
        )
        self.synthetic_seconds += time.perf_counter() - started
        dataset = load_plan(self.plan)
        self.synthetic_images += len(dataset)
        prompts = dataset.prompts
        self._prompts = list(dict.fromkeys(prompts))
        lookup = {p: i for i, p in enumerate(self._prompts)}
        self._prompt_ids = torch.tensor([lookup[p] for p in prompts], dtype=torch.long)
        if self._transform is None:
            self._transform = eval_transform(model)
        self._images = TransformedImages(dataset, self._transform)
        seed = derived_seed(self.run_seed, index, 7)
        steps = int(strategy.total_steps)
        self._batches = SideBatches(
            self._images, self.params.synthetic_batch_size, seed, self.workers, period=steps, dist=self.context(strategy).dist,
            device=strategy.device, keep_mb=self.params.cache_images_mb,
        )
        teacher = bank.get(strategy.model, "previous")
        self._teacher_image = self._encode_all_images(teacher, strategy) if self.params.cache_teacher else None
        with torch.no_grad():
            self._teacher_text = self._encode_texts(teacher, self._prompts).float()
            self.teacher_text_forwards += 1
            self._student_text = None
            if not model.text_trainable:
                with model.side_forward():
                    self._student_text = self._encode_texts(model, self._prompts).float()
        self.experiences_prepared += 1

    def _encode_texts(self, model: Any, prompts: list[str]) -> Tensor:
        chunk = max(1, self.params.synthetic_batch_size * 4)
        parts = [model.encode_text(prompts[s : s + chunk]) for s in range(0, len(prompts), chunk)]
        return torch.cat(parts)

    def _encode_all_images(self, teacher: Any, strategy: Any) -> Tensor:
        """The teacher's embeddings of the whole synthetic set, in dataset order."""
        assert self._batches is not None
        out, forwards = self._batches.table(teacher)
        self.teacher_image_forwards += forwards
        self.table_mb = max(self.table_mb, tensor_mb([out]))
        return out

    # ------------------------------------------------------------- iteration
    def synthetic_losses(self, strategy: Any) -> tuple[Tensor, Tensor]:
        """``(L_KD, L_ITA)`` on the next synthetic batch (student graph kept)."""
        model = unwrap(strategy.model)
        assert self._batches is not None
        x, idx = self._batches.next()  # more iterations than planned: the plan starts again
        assert self._prompt_ids is not None and self._teacher_text is not None
        pids = self._prompt_ids[idx]
        teacher = teacher_bank(strategy).get(strategy.model, "previous")
        with torch.no_grad():
            if self._teacher_image is not None:
                u0 = self._teacher_image[idx.to(self._teacher_image.device)]
            else:
                u0 = teacher.encode_image(x.to(next(teacher.parameters()).dtype)).float()
                self.teacher_image_forwards += 1
            w0 = self._teacher_text[pids.to(self._teacher_text.device)]
            m0 = similarity_logits(u0, w0, teacher.logit_scale.float())
        with model.side_forward(), autocast_context(strategy):
            u = model.encode_image(x)
            if self._student_text is not None:
                w = self._student_text[pids.to(self._student_text.device)]
            else:
                unique, inverse = torch.unique(pids, return_inverse=True)
                w = model.encode_text([self._prompts[int(i)] for i in unique])[inverse.to(strategy.device)]
            m = similarity_logits(u.float(), w.float(), model.logit_scale.float())
        kd = contrastive_distillation(m, m0, self.params.kd_temperature)
        ita = image_text_alignment(m, duplicate_aware_targets(pids), self.params.ita_label_smoothing)
        return kd, ita

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        if not strategy.is_training:
            return
        kd, ita = self.synthetic_losses(strategy)
        term = self.kd_weight * kd + self.ita_weight * ita
        self.loss_terms.update({"gift_kd": float(kd.detach()), "gift_ita": float(ita.detach()), "gift": float(term.detach())})
        publish_synthetic_loss(strategy, "gift", term)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        add_synthetic_loss(strategy, "gift")

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        release_synthetic_terms(strategy)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self._batches is not None:
            self._batches.close()
        self._batches = None
        self._images = None
        self._teacher_image = None
        self._teacher_text = None
        self._student_text = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Nothing to restore: the plan is a function of the seed and the experience."""
        return {"experiences_prepared": int(self.experiences_prepared)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.experiences_prepared = int(state.get("experiences_prepared", 0))

