"""ZSCL: zero-shot continual learning baseline (docs/methods.md section 4).

Three parts, each with its own weight:

- distillation of the *initial* (pre-trained) model's image-to-text and text-to-image
  logits on reference images and reference texts, temperature T = 2
  (:func:`cl_proxyfda.losses.zscl.zscl_distillation`);
- an L2 pull towards the start-of-experience weights;
- weight ensembling: a running average of the weights, updated every
  ``ensemble_every`` iterations and loaded into the model at the end of the experience.

Defaults follow the official code (github Thunderbeee/ZSCL, ``mtil/``; the training loop
is ``mtil/src/models/finetune.py``, its helpers ``mtil/src/models/helpers.py``, the
options ``mtil/src/args.py``, the recipes ``mtil/scripts/*.sh``):

- reference texts: *all* of them at every iteration. With ``--ref-sentences ImageNet``
  (``ZSCL_minus.sh``, ``table_a.sh``) they are ImageNet's 1,000 class names
  (``mtil/src/datasets/imagenet_classnames.py``, the list open_clip ships, two names
  repeated) in the template ``"a photo of a {}."`` (``mtil/src/datasets/imagenet.py``),
  repeats kept: 1,000 prompts (``unique_texts: false``). Here: ``texts: imagenet``, or the
  stream's base concepts in the demo world, or a class-name file;
- the student's logits are its L2-normalised reference-image features against the
  **frozen teacher's** normalised text embeddings, ``exp(logit_scale) * u w0^T``; the
  teacher's logits use the same text embeddings and its own image features. The teacher
  is the pre-trained model (``clip.load(args.model)`` when ``--ref-model`` is not given).
  Its text embeddings never change, so they are computed once per run (the official
  loop re-encodes them under ``no_grad`` at each iteration, to the same values); the
  student's text tower gets no gradient from this term (``student_text: teacher``);
- the loss (``helpers.distillation``): ``T^2 * softCE(s/T, softmax(t/T))``, a soft
  cross-entropy (not KL: the value differs by the teacher's entropy, the gradient is the
  same), mean over rows, T = 2 (``--T``); ``--image_loss`` distils the rows (one per
  image, softmax over texts), ``--text_loss`` the transposes (one row per text, softmax
  over the batch's images), each with weight 1 (both on in the recipes). The logit scale
  is the student's, which the official optimiser never updates (the pre-trained 100);
- reference images: ImageNet's train set with the eval transform, ``--batch-size`` (64)
  per iteration, shuffled, cycled. Here: the stream's ``reference`` set (base-world
  images in the demo) or any image folder (``reference_folder``, searched recursively),
  ``batch_size`` per iteration in seeded order (kept in memory after the first read when
  they fit ``cache_images_mb``; under ``torch.distributed`` each process takes its share of
  every batch). With ``cache_teacher`` the teacher's embeddings of the whole set are
  computed once per run and served by index (the teacher is fixed; an option of this
  library, off by default because a full pass over a large set such as ImageNet's costs
  more than the batches a run draws);
- L2 (``--l2 1``, ``helpers.l2_loss``): the sum of squared differences to the weights
  loaded at the start of the task;
- weight ensembling (``--we --avg_freq 100``, ``helpers.merge_we``): a running mean that
  starts from the start-of-task weights, saved and evaluated instead of the last weights.
  The official counter starts at 0, so its snapshots follow steps 1, 101, 201, ...; here
  they follow iterations ``ensemble_every``, ``2 * ensemble_every``, ... **[choice]**.

The published MTIL recipe (``mtil/scripts/ZSCL.sh`` and the README) uses
``--ref-sentences conceptual_captions``: every caption of Conceptual Captions'
validation file (``mtil/src/datasets/cc.py``), all at every iteration. To run that, list
the captions in a text file, one a line, with ``reference_classnames`` and
``template: "{}"``.

Options that depart from the official form: ``texts_per_batch`` draws a seeded subset of
the reference texts at each iteration, and ``student_text: student`` scores the student's
image features against the student's own text embeddings of those texts (with gradient
into its text tower when it trains; with a frozen text tower they are the teacher's).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor
from torch.utils.data import Dataset

from cl_proxyfda.errors import UserError
from cl_proxyfda.ledger import tensor_mb
from cl_proxyfda.generators.prompt_pool import BASE_TEMPLATE, apply_template, imagenet_base_concepts
from cl_proxyfda.losses.regularizers import l2_to_anchor
from cl_proxyfda.losses.zscl import WEIGHT_ENSEMBLE_EVERY, ZSCL_TEMPERATURE, WeightEnsemble, zscl_distillation
from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.anchors import trainable_named_parameters
from cl_proxyfda.side_data import SideBatches
from cl_proxyfda.strategies.base import CLPlugin, RunContext
from cl_proxyfda.synthetic import (
    TransformedImages,
    autocast_context,
    derived_seed,
    eval_transform,
)
from cl_proxyfda.teacher import teacher_bank, unwrap


class ZSCLParams(BaseModel):
    """Options of the ``zscl`` strategy."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    weight: float = Field(1.0, ge=0, description="weight of the reference-logit distillation")
    temperature: float = Field(ZSCL_TEMPERATURE, gt=0)
    image_to_text: bool = Field(True, description="distil the image-to-text logits (rows)")
    text_to_image: bool = Field(True, description="distil the text-to-image logits (columns)")
    l2_weight: float = Field(1.0, ge=0, description="weight of sum ||theta - theta_start||^2 (start-of-experience weights)")
    weight_ensemble: bool = Field(True, description="running average of the weights, loaded at the end of the experience")
    ensemble_every: int = Field(WEIGHT_ENSEMBLE_EVERY, ge=1, le=10_000_000, description="iterations between two snapshots of the average")
    reference: Literal["stream", "folder"] = Field("stream", description="stream: the stream's reference images; folder: reference_folder")
    reference_folder: str | None = Field(None, description="image folder (searched recursively) with reference: folder")
    reference_classnames: str | None = Field(None, description="text file, one class name a line: the reference texts")
    texts: Literal["auto", "classnames", "base_concepts", "imagenet"] = Field(
        "auto", description="auto: reference_classnames if given, else the stream's base concepts, else ImageNet's classes"
    )
    template: str = Field(BASE_TEMPLATE, description="template of the reference texts")
    batch_size: int = Field(64, ge=1, le=65536, description="reference images per iteration")
    cache_images_mb: float = Field(
        1024.0, ge=0, description="keep the transformed reference images in memory when they fit this many MB (0: read the files at every batch)"
    )
    cache_teacher: bool = Field(
        False,
        description="the pre-trained teacher's embeddings of the whole reference set, computed once per run and served by index "
        "(pays when a run draws more reference images than the set holds; false: the teacher encodes every batch)",
    )
    texts_per_batch: int | None = Field(
        None, ge=2, le=65536, description="reference texts drawn per iteration (default: all of them at every iteration, as in ZSCL's code)"
    )
    student_text: Literal["teacher", "student"] = Field(
        "teacher",
        description="text embeddings of the student's logits: teacher: the frozen teacher's (ZSCL's code); "
        "student: the student's own (trains its text tower through the distillation)",
    )
    unique_texts: bool = Field(False, description="drop repeated reference texts (ZSCL's code keeps ImageNet's 1,000 prompts, two repeated)")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="seed of the reference draws (default: the run's seed)")

    @model_validator(mode="after")
    def _consistent(self) -> "ZSCLParams":
        if self.reference == "folder" and not self.reference_folder:
            raise ValueError("reference_folder: required with reference: folder")
        if self.texts == "classnames" and not self.reference_classnames:
            raise ValueError("reference_classnames: required with texts: classnames")
        if not (self.image_to_text or self.text_to_image):
            raise ValueError("image_to_text: enable image_to_text, text_to_image or both")
        if "{}" not in self.template and "{c}" not in self.template:
            raise ValueError(f"template: {self.template!r} has no '{{}}' placeholder")
        return self


def read_classnames(path: str | Path) -> list[str]:
    """Class names of a text file: one a line, blank lines and ``#`` comments skipped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"zscl.reference_classnames: file {p} does not exist")
    names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise UserError(f"zscl.reference_classnames: {p} lists no class names")
    return names


def reference_images_of(params: ZSCLParams, stream: Any) -> Dataset:
    """The reference image set: the stream's, or an image folder's (labels unused)."""
    if params.reference == "stream":
        ref = getattr(stream, "reference", None)
        if ref is None or len(ref) == 0:
            raise UserError("zscl.reference: the stream has no reference images (use reference: folder with reference_folder)")
        return ref
    from cl_proxyfda.benchmarks.image_folder import ImageFileDataset, list_images

    folder = Path(str(params.reference_folder)).expanduser()
    if not folder.is_dir():
        raise UserError(f"zscl.reference_folder: folder {folder} does not exist")
    paths = list_images(folder)
    if not paths:
        raise UserError(f"zscl.reference_folder: no images under {folder}")
    return ImageFileDataset(paths, [0] * len(paths))


def reference_texts_of(params: ZSCLParams, stream: Any) -> list[str]:
    """The reference texts: class names (file, stream base concepts or ImageNet) in the template."""
    if params.texts == "classnames" or (params.texts == "auto" and params.reference_classnames):
        names = read_classnames(str(params.reference_classnames))
    elif params.texts == "base_concepts" or (params.texts == "auto" and getattr(stream, "base_concepts", None)):
        names = list(getattr(stream, "base_concepts", None) or [])
        if not names:
            raise UserError("zscl.texts: the stream has no base concepts (use classnames or imagenet)")
    else:
        names = imagenet_base_concepts()
    texts = [apply_template(params.template, n) for n in names]
    return list(dict.fromkeys(texts)) if params.unique_texts else texts


@STRATEGIES.register("zscl", help="ZSCL: distillation of the pre-trained model's reference logits, L2, weight ensembling")
class ZSCLPlugin(CLPlugin):
    """Reference-logit distillation from the pre-trained model, L2 to start weights, weight ensembling."""

    Params = ZSCLParams
    name = "zscl"
    params: ZSCLParams

    def __init__(self, params: ZSCLParams | None = None, /, *, run: RunContext | None = None, **kwargs: Any) -> None:
        super().__init__(params, run=run, **kwargs)
        ctx = self.context()
        params = self.params
        self.seed = params.seed if params.seed is not None else ctx.seed
        self.workers = ctx.workers
        self.images = reference_images_of(params, ctx.stream)
        self.texts = reference_texts_of(params, ctx.stream)
        self.anchor: dict[str, Tensor] | None = None
        self.ensemble: WeightEnsemble | None = None
        self.iteration = 0
        self._teacher_text: Tensor | None = None
        self._teacher_image: Tensor | None = None  # cache_teacher: one row per reference image
        self._batches: SideBatches | None = None
        self._text_rng: np.random.Generator | None = None
        self.teacher_text_forwards = 0
        self.teacher_image_forwards = 0
        self.table_mb = 0.0  # the teacher table of the reference set (cost ledger)

    def ledger(self) -> dict[str, float]:
        """Extra data for the run's cost ledger: the reference image set (and its teacher table)."""
        return {"reference_images": len(self.images), "teacher_table_mb": self.table_mb}

    @property
    def n_texts(self) -> int:
        """Reference texts per iteration: all of them unless ``texts_per_batch`` is set."""
        per = self.params.texts_per_batch
        return len(self.texts) if per is None else max(2, min(per, len(self.texts)))

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        if self._teacher_text is None:
            teacher = teacher_bank(strategy).get(strategy.model, "pretrained")
            with torch.no_grad():
                self._teacher_text = torch.cat(
                    [teacher.encode_text(self.texts[s : s + 256]).float() for s in range(0, len(self.texts), 256)]
                )
            self.teacher_text_forwards += 1

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        named = trainable_named_parameters(strategy)
        self.anchor = {n: p.detach().clone() for n, p in named}
        self.ensemble = WeightEnsemble(named, self.params.ensemble_every) if self.params.weight_ensemble else None
        self.iteration = 0
        index = strategy.experience_index
        data = TransformedImages(self.images, eval_transform(unwrap(strategy.model)))
        seed = derived_seed(self.seed, index, 11)
        self._batches = SideBatches(
            data, self.params.batch_size, seed, self.workers, period=int(strategy.total_steps), dist=self.context(strategy).dist,
            device=strategy.device, keep_mb=self.params.cache_images_mb,
        )
        self._text_rng = np.random.default_rng(derived_seed(self.seed, index, 12))
        if self.params.cache_teacher and self._teacher_image is None:  # the teacher never changes: once per run
            teacher = teacher_bank(strategy).get(strategy.model, "pretrained")
            self._teacher_image, forwards = self._batches.table(teacher, generator=torch.Generator())
            self.teacher_image_forwards += forwards
            self.table_mb = tensor_mb([self._teacher_image])

    def distillation_loss(self, strategy: Any) -> Tensor:
        """The reference-logit distillation on the next reference batch."""
        model = unwrap(strategy.model)
        teacher = teacher_bank(strategy).get(strategy.model, "pretrained")
        assert self._teacher_text is not None and self._text_rng is not None
        assert self._batches is not None
        x, idx = self._batches.next()  # after total_steps batches the plan starts again
        texts, teacher_text = self.texts, self._teacher_text
        if self.n_texts < len(self.texts):
            pick = np.sort(self._text_rng.choice(len(self.texts), size=self.n_texts, replace=False))
            texts = [self.texts[int(i)] for i in pick]
            teacher_text = self._teacher_text[torch.as_tensor(pick, device=self._teacher_text.device)]
        own_text = self.params.student_text == "student" and model.text_trainable
        with torch.no_grad():
            if self._teacher_image is not None:
                u0 = self._teacher_image[idx.to(self._teacher_image.device)]
            else:
                u0 = teacher.encode_image(x.to(next(teacher.parameters()).dtype)).float()
                self.teacher_image_forwards += 1
        with model.side_forward(), autocast_context(strategy):
            u = model.encode_image(x).float()
            w = model.encode_text(texts).float() if own_text else None
        return zscl_distillation(
            u, u0, teacher_text, model.logit_scale.float(), student_text=w,
            temperature=self.params.temperature, image_to_text=self.params.image_to_text, text_to_image=self.params.text_to_image,
        )

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.params.weight > 0:
            distill = self.distillation_loss(strategy)
            self.loss_terms["zscl_distill"] = float(distill.detach())
            strategy.loss = strategy.loss + self.params.weight * distill
        if self.params.l2_weight > 0:
            named = trainable_named_parameters(strategy)
            if self.anchor is None:
                self.anchor = {n: p.detach().clone() for n, p in named}
            l2 = l2_to_anchor(named, self.anchor)
            self.loss_terms["zscl_l2"] = float(l2.detach())
            strategy.loss = strategy.loss + self.params.l2_weight * l2

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.iteration += 1
        if self.ensemble is not None and self.ensemble.due(self.iteration):
            self.ensemble.update(trainable_named_parameters(strategy))

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self._batches is not None:
            self._batches.close()
        self._batches = None
        if self.ensemble is None:
            return
        params = dict(trainable_named_parameters(strategy))
        with torch.no_grad():
            for name, avg in self.ensemble.average.items():
                params[name].copy_(avg.to(params[name].dtype))
        unwrap(strategy.model).text_changed()

    def state_dict(self) -> dict[str, Any]:
        return {
            "anchor": self.anchor,
            "ensemble": None if self.ensemble is None else self.ensemble.state_dict(),
            "iteration": int(self.iteration),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        anchor = state.get("anchor")
        self.anchor = None if anchor is None else {n: t.detach().clone() for n, t in anchor.items()}
        self.iteration = int(state.get("iteration", 0))
        ens = state.get("ensemble")
        if ens is None:
            self.ensemble = None
        else:
            self.ensemble = WeightEnsemble({n: t for n, t in ens["average"].items()}, int(ens["every"]))
            self.ensemble.load_state_dict(ens)
