"""Infusing (Ypsilantis et al., 2025): vision-only fine-tuning with a regulariser mix.

The recipe of docs/methods.md section 6 as four plugins that work alone or together,
one module each:

- ``CosineHeadPlugin`` (``infusing_head``, :mod:`.head`): the downstream loss is the
  cross-entropy of a bias-free cosine classifier (scale 16) on the L2-normalised image
  embedding, one head per task, replacing the zero-shot text-head cross-entropy of the
  strategy (muted through the strategy's criterion gate, :mod:`cl_proxyfda.criterion_gate`).
  The head is initialised from the frozen text embeddings of the class prompts
  (``init: text``, the default here for task-incremental use) or at random (``init:
  random``, the paper). It trains in its own AdamW parameter group (lr 1e-3, weight decay
  1e-6) next to the backbone group (``train.lr``, ``train.weight_decay``).
- ``GenericDistillPlugin`` (``infusing_generic``, :mod:`.generic`): batches alternate
  between the downstream set and a generic image set, one source per batch (``mode:
  alternate``, iteration k is generic when ``(k + 1) % generic_every == 0``; 2 = strict
  alternation). On a generic iteration the plugin swaps the mini-batch for a generic
  batch before the forward, mutes the strategy's criterion for that batch, and the loss
  is ``lambda_d * mean_i mean_d (e_i - t_i)^2`` against pre-trained embeddings ``t``
  computed once per run with the eval transform (no teacher forward while training).
  ``lambda_d: auto`` is ``1000 * D / 768``. ``mode: joint`` (not the paper) adds one
  generic batch to every downstream iteration instead, losses summed.
- ``MeanL2Plugin`` (``infusing_l2``, :mod:`.l2`): ``lambda_w * sum over trainable tensors
  of mean((theta - theta_0)^2)`` on every batch, lambda_w 1e4.
- ``BestCheckpointPlugin`` (``infusing_select``, :mod:`.select`): model selection. A
  seeded, class-stratified validation split is carved from each task's training data
  (and kept out of training); every ``every`` steps (and after the last) the score
  ``(downstream val accuracy + generic val score) / 2`` is computed by the project's
  evaluator, the best weights (trainable tensors and cosine heads) are kept in memory
  (CPU) and restored at the end of the experience. Downstream accuracy uses the cosine
  head when one trains, else the zero-shot text head; the generic score is leave-one-out
  k-NN accuracy (:func:`cl_proxyfda.knn.knn_accuracy`) on the generic validation split
  (``generic_score: knn``) or ``100 * mean cos(e, t)`` to the stored pre-trained
  embeddings (``alignment``, needs no labels); ``auto`` (default) takes knn when the
  generic validation images carry two or more labels. Without a generic plugin the score
  is the downstream accuracy alone. The task's classes are the same in training and
  validation (the paper's disjoint validation classes are not possible for a
  classification task).

The run-file entry ``infusing`` (:mod:`.recipe`) is not a plugin: it stands for the
parts with the paper's defaults (``Infusing.build_plugins``), in the order vision-only
check, generic, head, L2, selection; the runner adds each of them to the strategy and
each checkpoints its own state. From Python::

    from cl_proxyfda.strategies.infusing import (
        BestCheckpointPlugin, CosineHeadPlugin, GenericDistillPlugin, MeanL2Plugin, folder_images, infusing_plugins,
    )
    plugins = infusing_plugins(
        head=CosineHeadPlugin(), generic=GenericDistillPlugin(generic=folder_images("generic/")),
        l2=MeanL2Plugin(weight=1e4), select=BestCheckpointPlugin(every=50),
    )
    strategy = CLStrategy(..., plugins=plugins)   # or Infusing(generic={...}).plugins()

Each part follows the plugin contract (:mod:`cl_proxyfda.strategies.base`): options as
keywords or a ``Params``, run facts (seed, batch sizes, workers, augment) from
``self.context(strategy)``; the Python-only objects (the generic set, the head's test
sets, the selection's ``scorer``) are keyword-only arguments, by default taken from the
run's stream.

A hand-built Avalanche template needs the criterion gate for the head and for
alternating generic batches: ``class MyStrategy(GatedCriterion, SupervisedTemplate)``
(:class:`cl_proxyfda.criterion_gate.GatedCriterion`; ``CLStrategy`` has it).

The runner's accuracy matrix stays zero-shot text-head accuracy for every task; the
cosine-head test accuracy of each trained task is kept in ``CosineHeadPlugin.diagnostics``
(the run's diagnostics, ``head_accuracy/<task>``).

Counting: ``train.iterations`` counts optimizer steps of both sources; with strict
alternation half of them are downstream steps. The downstream batch drawn by the
loader at a generic iteration is dropped (the downstream sampler stays seeded).
"""
from __future__ import annotations

from cl_proxyfda.registry import STRATEGIES
from cl_proxyfda.strategies.infusing.data import IndexedImages, folder_images, generic_dataset, stratified_split, task_id_of
from cl_proxyfda.strategies.infusing.generic import GenericDistillPlugin, GenericParams
from cl_proxyfda.strategies.infusing.head import CosineHeadPlugin, HeadParams
from cl_proxyfda.strategies.infusing.l2 import L2Params, MeanL2Plugin
from cl_proxyfda.strategies.infusing.recipe import Infusing, InfusingParams, VisionOnlyPlugin, infusing_plugins
from cl_proxyfda.strategies.infusing.select import BestCheckpointPlugin, SelectParams, find_plugin
from cl_proxyfda.strategies.infusing.source import GENERIC_BATCH, SOURCES, batch_source

STRATEGIES.register("infusing_head", help="Infusing: cosine-classifier head (scale 16) replacing the text-head loss")(CosineHeadPlugin)
STRATEGIES.register("infusing_generic", help="Infusing: alternating generic batches with embedding distillation")(GenericDistillPlugin)
STRATEGIES.register("infusing_l2", help="Infusing: per-tensor mean L2 to the pre-trained weights")(MeanL2Plugin)
STRATEGIES.register("infusing_select", help="Infusing: keep the best iterate by downstream + generic validation")(BestCheckpointPlugin)
STRATEGIES.register("infusing", help="Infusing: vision-only fine-tuning (head + generic distillation + L2 + selection)")(Infusing)

__all__ = [
    "GENERIC_BATCH",
    "SOURCES",
    "BestCheckpointPlugin",
    "CosineHeadPlugin",
    "GenericDistillPlugin",
    "GenericParams",
    "HeadParams",
    "IndexedImages",
    "Infusing",
    "InfusingParams",
    "L2Params",
    "MeanL2Plugin",
    "SelectParams",
    "VisionOnlyPlugin",
    "batch_source",
    "find_plugin",
    "folder_images",
    "generic_dataset",
    "infusing_plugins",
    "stratified_split",
    "task_id_of",
]
