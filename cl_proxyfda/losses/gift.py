"""GIFT's synthetic-replay losses (docs/methods.md section 2), as pure functions of tensors.

On a synthetic batch of B image-prompt pairs, the student's similarity matrix
``M = tau * u w^T`` (B x B) is

- distilled towards the frozen teacher's ``M0`` in both directions
  (:func:`contrastive_distillation`, temperature ``T``, scaled by ``T^2``), and
- aligned with the hard image-text matching of the batch (:func:`image_text_alignment`),
  where duplicate prompts share the target mass (:func:`duplicate_aware_targets`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

KD_TEMPERATURE = 2.0
ITA_LABEL_SMOOTHING = 0.2


def similarity_logits(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float, normalize: bool = True) -> Tensor:
    """``tau * u w^T``: image-to-text logits (rows: images, columns: texts).

    ``logit_scale`` is tau itself (e.g. ``exp(model.logit_scale)``, 100 for OpenAI CLIP),
    not its logarithm. With ``normalize`` the embeddings are L2-normalised first.
    """
    if normalize:
        image_embeds = F.normalize(image_embeds, dim=-1)
        text_embeds = F.normalize(text_embeds, dim=-1)
    return logit_scale * image_embeds @ text_embeds.t()


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy of ``logits`` (N x C) against probability targets, mean over rows."""
    if logits.shape != target_probs.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(target_probs.shape)} differ")
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float = KD_TEMPERATURE) -> Tensor:
    """Row-wise knowledge distillation: ``T^2 * softCE(s/T, softmax(t/T))``.

    The teacher's logits are detached. This is the one-direction term shared by GIFT's
    contrastive KD and ZSCL.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    target = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return temperature**2 * soft_cross_entropy(student_logits.float() / temperature, target)


def contrastive_distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float = KD_TEMPERATURE) -> Tensor:
    """GIFT's contrastive KD on B x B similarity matrices, both directions.

    ``L_KD = T^2 * [softCE(M/T, softmax(M0/T)) + softCE(M^T/T, softmax(M0^T/T))]``:
    the image-to-text rows and the text-to-image rows (columns of ``M``).
    """
    return distillation(student_logits, teacher_logits, temperature) + distillation(
        student_logits.t(), teacher_logits.t(), temperature
    )


def duplicate_aware_targets(keys: Sequence[str] | Tensor) -> Tensor:
    """``A[i, j] = [key_i == key_j] / count_i``: matching targets with shared duplicates.

    ``keys`` are the prompts of the batch (strings) or integer ids of them. Each row sums
    to 1; the matrix is symmetric (equal keys have equal counts).
    """
    if isinstance(keys, Tensor):
        ids = keys.reshape(-1).long()
    else:
        index: dict[str, int] = {}
        ids = torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("duplicate_aware_targets got an empty batch")
    same = (ids[:, None] == ids[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def image_text_alignment(logits: Tensor, targets: Tensor, label_smoothing: float = ITA_LABEL_SMOOTHING) -> Tensor:
    """GIFT's ITA: hard-target CLIP loss on the student's ``M``, both directions.

    ``CE(M, A) + CE(M^T, A^T)``, each a mean over rows, with label smoothing
    (``A' = (1 - ls) A + ls / B``, as ``torch.nn.functional.cross_entropy`` does for
    probability targets). ``targets`` comes from :func:`duplicate_aware_targets`.
    """
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must be the same 2-D shape")
    logits = logits.float()
    targets = targets.to(logits.device, logits.dtype)
    image_to_text = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    text_to_image = F.cross_entropy(logits.t(), targets.t(), label_smoothing=label_smoothing)
    return image_to_text + text_to_image
