"""ZSCL's losses and weight ensembling (docs/methods.md section 4), as pure functions.

ZSCL distils the *initial* model's image-to-text and text-to-image logits on reference
images and reference texts (e.g. ImageNet images and "a photo of a {c}." for all its
classes) into the model being trained, at temperature T = 2. As in the official code
(github Thunderbeee/ZSCL, ``mtil/src/models/finetune.py`` and ``distillation`` in
``mtil/src/models/helpers.py``), both the student's and the teacher's logits use the
frozen teacher's text embeddings, and each direction is a soft cross-entropy
``T^2 * softCE(s/T, softmax(t/T))`` averaged over rows. Its other two parts are an
L2 pull towards the start-of-experience weights
(:func:`cl_proxyfda.losses.regularizers.l2_to_anchor`) and weight ensembling: a running
average of the weights, updated every ``every`` iterations (:class:`WeightEnsemble`).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from cl_proxyfda.losses.gift import distillation, similarity_logits

ZSCL_TEMPERATURE = 2.0
WEIGHT_ENSEMBLE_EVERY = 100


def zscl_distillation(
    student_image: Tensor,
    teacher_image: Tensor,
    teacher_text: Tensor,
    logit_scale: Tensor | float,
    student_text: Tensor | None = None,
    temperature: float = ZSCL_TEMPERATURE,
    image_to_text: bool = True,
    text_to_image: bool = True,
) -> Tensor:
    """Distil the reference logits of the initial model into the student.

    Reference images give ``student_image``/``teacher_image`` embeddings (N x D);
    reference texts give ``teacher_text`` (K x D) and, optionally, ``student_text``
    (K x D; ``None``: the teacher's text embeddings for both, as in ZSCL's code).
    Logits are ``tau * u w^T`` (N x K) on L2-normalised embeddings; the image-to-text
    term distils the N rows (softmax over texts), the text-to-image term the K rows of
    the transposes (softmax over images), each ``T^2 * softCE(s/T, softmax(t/T))`` with
    the mean over rows; the two terms are summed with weight 1.
    """
    if not (image_to_text or text_to_image):
        raise ValueError("zscl_distillation: enable image_to_text, text_to_image or both")
    s_text = teacher_text if student_text is None else student_text
    student = similarity_logits(student_image, s_text, logit_scale)
    with torch.no_grad():
        teacher = similarity_logits(teacher_image, teacher_text, logit_scale)
    loss = student.new_zeros((), dtype=torch.float32)
    if image_to_text:
        loss = loss + distillation(student, teacher, temperature)
    if text_to_image:
        loss = loss + distillation(student.t(), teacher.t(), temperature)
    return loss


def running_average_(average: Mapping[str, Tensor], current: Mapping[str, Tensor], count: int) -> None:
    """In place: ``average = (average * count + current) / (count + 1)`` for floating tensors.

    ``count`` is the number of snapshots already in ``average``. Non-floating tensors
    (integer buffers) take the current value.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    for name, avg in average.items():
        cur = current[name].detach().to(device=avg.device)
        if torch.is_floating_point(avg):
            avg.mul_(count / (count + 1)).add_(cur.to(avg.dtype), alpha=1.0 / (count + 1))
        else:
            avg.copy_(cur)


class WeightEnsemble:
    """The running average of weight snapshots (ZSCL's weight ensembling).

    Start it from the weights at the start of the experience (one snapshot); call
    :meth:`update` every ``every`` iterations with the current weights; :attr:`average`
    holds the mean of all snapshots, to load into the model at the end of the experience.
    """

    def __init__(self, named_tensors: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor], every: int = WEIGHT_ENSEMBLE_EVERY) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        self.average: dict[str, Tensor] = {n: t.detach().clone() for n, t in items}
        self.count = 1
        self.every = every

    def due(self, iteration: int) -> bool:
        """Whether iteration ``iteration`` (counted from 1 within the experience) is an update step."""
        return iteration > 0 and iteration % self.every == 0

    def update(self, current: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> None:
        cur = dict(current.items() if isinstance(current, Mapping) else current)
        missing = sorted(set(self.average) - set(cur))
        if missing:
            raise KeyError(f"WeightEnsemble.update: missing tensors {missing[:5]}")
        running_average_(self.average, cur, self.count)
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average, "count": self.count, "every": self.every}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.average = {n: t.detach().clone() for n, t in state["average"].items()}
        self.count = int(state["count"])
        self.every = int(state["every"])
