"""``cl-proxyfda bench``: micro-benchmarks reported as ratios measured in one process.

Absolute times depend on the machine and on its load; ratios of two things measured in
the same process, interleaved, are what carries over. Every section prints a markdown
table labelled with the machine (CPU model, cores, torch version, CUDA device).

Sections (``--sections``, default: all), one module each:

- ``steps`` (:mod:`.steps`): the training-step time of every registered strategy relative
  to naive fine-tuning, through the real runner (``build_run``; the step timer of
  :mod:`.step_timer`, median after warm-up), with the share of the step spent in frozen
  teacher image forwards; presets from the registry (:mod:`.presets`); FDA and Proxy-FDA
  also with the teacher features served from a per-experience table (``train.teacher_table``).
- ``eval`` (:mod:`.evaluation`): zero-shot evaluation of every test set with the
  text-embedding cache versus without it; evaluation after an experience versus one
  image forward pass.
- ``knn`` (:mod:`.knn`): neighbour search, torch top-k versus faiss
  (:class:`~cl_proxyfda.knn.FeatureBank`).
- ``awc`` (:mod:`.awc`): AWC's per-iteration importance (and penalty) cost relative to a
  naive step.
- ``generation`` (:mod:`.generation`): the tiny diffusers pipeline batched versus one
  image at a time, and the synthetic cache's hit path versus generation.
- ``gpu`` (:mod:`.gpu`, CUDA only): CLIP ViT-B/16 naive / Proxy-FDA / GIFT step times in
  fp32 and bf16, and an SD-1.5-sized UNet's images per second.

Timings of callables use ``torch.utils.benchmark.Timer`` (:mod:`.timing`); the report
and its markdown are :mod:`.report`; sizes and the shared context :mod:`.context`.

Python: ``run_bench(out=..., quick=True, sections=["knn"])`` returns the report (a dict,
also written as ``bench.json`` and ``bench.md`` when ``out`` is given).
"""
from __future__ import annotations

from cl_proxyfda.tools.bench.context import FULL, QUICK, SECTIONS, BenchContext, BenchSizes, parse_sections
from cl_proxyfda.tools.bench.driver import SECTION_FUNCTIONS, default_model, run_bench
from cl_proxyfda.tools.bench.gpu import SD15_UNET, unet_images_per_second
from cl_proxyfda.tools.bench.presets import OVERRIDES, Variant, strategy_presets
from cl_proxyfda.tools.bench.report import Section, Target, machine_info, machine_line
from cl_proxyfda.tools.bench.step_timer import StepEntry, StepResult, StepTimer, measure_steps
from cl_proxyfda.tools.bench.steps import fda_loss_seconds

__all__ = [
    "FULL", "OVERRIDES", "QUICK", "SD15_UNET", "SECTIONS", "SECTION_FUNCTIONS", "BenchContext",
    "BenchSizes", "Section", "StepEntry", "StepResult", "StepTimer", "Target", "Variant", "default_model",
    "fda_loss_seconds", "machine_info", "machine_line", "measure_steps", "parse_sections", "run_bench", "strategy_presets",
    "unet_images_per_second",
]
