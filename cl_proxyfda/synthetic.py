"""GIFT's synthetic set of each experience: prompt plan, disk cache and loading.

Shared by the ``gift`` plugin (``strategies/gift.py``) and ``cl-proxyfda generate``, so
that both use the same plan and the same cache folder:

- :func:`experience_prompt_pool`: base concepts with the base template plus the classes
  of every *previous* task with that task's first template (docs/methods.md section 2);
- :func:`plan_experience`: ``N`` prompts drawn uniformly with replacement and one seed
  per image, both derived from ``(seed, experience)`` only, and the cache folder
  ``<cache root>/<generator>-<hash of its config>/<stream>/<order>/experience_<i>``;
- :func:`ensure_plan` / :func:`load_plan`: generate what is missing (idempotent,
  resumable, sharded by rank) and read the pairs back.

Also here: :func:`autocast_context`, and (re-exported from their homes,
:mod:`cl_proxyfda.models` and :mod:`cl_proxyfda.benchmarks.samplers`)
:func:`eval_transform` and :func:`seeded_batches` (the index plan of
:class:`cl_proxyfda.side_data.SideBatches`), which the side-data plugins (GIFT, ZSCL,
Infusing) share.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cl_proxyfda.benchmarks.samplers import seeded_batches
from cl_proxyfda.device import autocast_to
from cl_proxyfda.errors import UserError
from cl_proxyfda.generators.cache import SyntheticCache, SyntheticDataset, cache_folder, generator_id
from cl_proxyfda.generators.prompt_pool import BASE_TEMPLATE, apply_template, build_prompt_pool, imagenet_base_concepts, sample_prompts
from cl_proxyfda.models import eval_transform  # noqa: F401  (re-exported: the plugins import it from here)

BaseConcepts = Literal["auto", "stream", "imagenet"] | list[str]
DEFAULT_CACHE_SUBDIR = "synthetic"
"""Default cache root: ``<run.output_dir>/synthetic``, shared by the runs of that folder."""


# ------------------------------------------------------------------ prompts
def resolve_base_concepts(option: BaseConcepts, stream: Any) -> list[str]:
    """The broad concept list of the prompt pool.

    ``stream``: the stream's ``base_concepts`` (the demo world's, or ImageNet's class
    names when the MTIL stream has a control set); ``imagenet``: ImageNet's 1000 class
    names (open_clip's metadata); ``auto`` **[choice]**: the stream's when it has any,
    else ImageNet's; a list: those names.
    """
    if isinstance(option, list):
        if not option:
            raise UserError("gift.base_concepts: the list is empty")
        return [str(c) for c in option]
    stream_concepts = list(getattr(stream, "base_concepts", None) or [])
    if option == "stream":
        if not stream_concepts:
            raise UserError("gift.base_concepts: 'stream' asked but the stream has no base concepts (use auto, imagenet or a list)")
        return stream_concepts
    if option == "imagenet":
        return imagenet_base_concepts()
    if option == "auto":
        return stream_concepts or imagenet_base_concepts()
    raise UserError(f"gift.base_concepts: unknown option {option!r} (auto, stream, imagenet or a list)")


def previous_tasks(stream: Any, experience: int) -> list[tuple[list[str], str]]:
    """``(classnames, first template)`` of every task before ``experience``."""
    return [(list(t.classnames), t.templates[0]) for t in stream.tasks[:experience]]


def experience_prompt_pool(
    stream: Any,
    experience: int,
    base_concepts: Sequence[str],
    base_template: str = BASE_TEMPLATE,
    exclude_current_classes: bool = False,
    dedupe: bool = False,
) -> list[str]:
    """The prompt pool of ``experience`` (0-based): never built from the current task.

    With ``exclude_current_classes`` **[choice, default off as in the paper]**, prompts
    that write one of the current task's class names (base concepts or earlier tasks'
    classes equal to it, case-insensitive) are dropped too. Duplicate prompts are kept
    (official GIFT code) unless ``dedupe``.
    """
    if not 0 <= experience < len(stream.tasks):
        raise UserError(f"experience {experience + 1} is outside the stream's {len(stream.tasks)} tasks")
    base = list(base_concepts)
    previous = previous_tasks(stream, experience)
    if exclude_current_classes:
        current = {c.casefold() for c in stream.tasks[experience].classnames}
        base = [c for c in base if c.casefold() not in current]
        previous = [([c for c in names if c.casefold() not in current], tpl) for names, tpl in previous]
    return build_prompt_pool(base, base_template, previous, dedupe=dedupe)


def current_task_prompts(stream: Any, experience: int) -> set[str]:
    """Every prompt of the current task's classes with any of its templates (for checks)."""
    task = stream.tasks[experience]
    return {apply_template(t, c) for c in task.classnames for t in task.templates}


# --------------------------------------------------------------------- plan
def derived_seed(*parts: int) -> int:
    """A 31-bit seed derived from integers (numpy SeedSequence), stable across runs."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def image_seeds(seed: int, experience: int, n: int) -> list[int]:
    """One seed per planned image of ``experience``."""
    rng = np.random.default_rng(derived_seed(seed, experience, 1))
    return [int(s) for s in rng.integers(0, 2**31 - 1, size=n)]


def generator_folder_name(generator: Any) -> str:
    """``<backend name>-<10 hex of its config id>``: one cache family per generator config."""
    digest = hashlib.sha256(generator_id(generator).encode("utf-8")).hexdigest()[:10]
    name = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in str(generator.name)) or "generator"
    return f"{name}-{digest}"


def cache_root(cache_dir: str | None, output_dir: str | Path) -> Path:
    """``cache_dir`` when given, else ``<output_dir>/synthetic`` (shared by the runs there)."""
    return Path(cache_dir).expanduser() if cache_dir else Path(output_dir) / DEFAULT_CACHE_SUBDIR


def stream_key(stream_name: str, stream_args: dict[str, Any]) -> tuple[str, str]:
    """(stream, order) naming the cache folders: ``order`` is the stream's order or ``default``."""
    order = stream_args.get("order") or "default"
    return str(stream_name), str(order)


@dataclass(frozen=True)
class SyntheticPlan:
    """What to draw for one experience and where it is cached."""

    experience: int
    task: str
    prompts: list[str]
    seeds: list[int]
    folder: Path
    pool_size: int

    @property
    def size(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that decides the synthetic sets of a run (from the gift options)."""

    images_per_experience: int
    seed: int
    base_concepts: Any
    base_template: str
    exclude_current_classes: bool
    root: Path
    generator_name: str
    generator_args: dict[str, Any] = field(default_factory=dict)
    dedupe: bool = False

    def build_generator(self, device: str | torch.device | None = None) -> Any:
        """The generator backend (heavy models load on first use only)."""
        from cl_proxyfda.registry import GENERATORS, load_builtin_components

        load_builtin_components()
        return GENERATORS.build(self.generator_name, dict(self.generator_args), device=device)


def plan_experience(spec: SyntheticSpec, stream: Any, key: tuple[str, str], experience: int, generator: Any) -> SyntheticPlan:
    """The plan of ``experience`` (0-based): prompts and seeds depend on ``(seed, experience)``."""
    concepts = resolve_base_concepts(spec.base_concepts, stream)
    pool = experience_prompt_pool(stream, experience, concepts, spec.base_template, spec.exclude_current_classes, spec.dedupe)
    prompts = sample_prompts(pool, spec.images_per_experience, derived_seed(spec.seed, experience, 0))
    seeds = image_seeds(spec.seed, experience, spec.images_per_experience)
    folder = cache_folder(spec.root / generator_folder_name(generator), key[0], key[1], experience)
    return SyntheticPlan(experience, stream.tasks[experience].name, prompts, seeds, folder, len(pool))


def distributed_shard() -> tuple[int, int]:
    """(rank, world) of the torchrun process group, (0, 1) in a single process."""
    from cl_proxyfda.distributed import current

    ctx = current()
    return ctx.rank, ctx.world


def ensure_plan(plan: SyntheticPlan, generator: Any, shard: tuple[int, int] = (0, 1), progress: bool = True) -> dict[str, int]:
    """Generate this shard's missing images of ``plan``; returns the cache's counts."""
    cache = SyntheticCache(plan.folder)
    cache.ensure(plan.prompts, plan.seeds, generator, shard=shard, progress=progress)
    return dict(cache.stats)


def load_plan(plan: SyntheticPlan) -> SyntheticDataset:
    """The cached ``(PIL image, prompt)`` pairs of ``plan`` (dropped images left out)."""
    data = SyntheticCache(plan.folder).load(plan.prompts, plan.seeds)
    if len(data) == 0:
        raise UserError(f"synthetic cache {plan.folder}: every planned image was dropped (near-black); nothing to train on")
    return data


def prepare_experience(
    spec: SyntheticSpec,
    stream: Any,
    key: tuple[str, str],
    experience: int,
    device: str | torch.device | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> tuple[SyntheticPlan, dict[str, int]]:
    """Plan ``experience`` and make sure its images are cached (this rank's share).

    Under torch.distributed every rank generates its share, then all wait for each other.
    The generator is dropped afterwards (its pipeline's memory is released).
    """
    generator = spec.build_generator(device)
    plan = plan_experience(spec, stream, key, experience, generator)
    rank_world = shard if shard is not None else distributed_shard()
    stats = ensure_plan(plan, generator, rank_world, progress)
    del generator
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if shard is None and rank_world[1] > 1:
        from cl_proxyfda.distributed import barrier

        barrier()
    return plan, stats


# ------------------------------------------------------------ shared helpers
class TransformedImages(Dataset):
    """``(transform(image), index)`` for datasets yielding ``(PIL image, anything)``."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.base[i][0]
        return self.transform(image), i


class BatchPlan(torch.utils.data.Sampler):
    """A finite batch sampler over :func:`seeded_batches` (``iterations`` batches)."""

    def __init__(self, n_items: int, batch_size: int, iterations: int, seed: int | Sequence[int]) -> None:
        self.n_items, self.batch_size, self.iterations, self.seed = n_items, batch_size, iterations, seed

    def __len__(self) -> int:
        return self.iterations

    def __iter__(self) -> Iterator[list[int]]:
        batches = seeded_batches(self.n_items, self.batch_size, self.seed)
        for _ in range(self.iterations):
            yield next(batches)


def autocast_context(strategy: Any) -> contextlib.AbstractContextManager:
    """The strategy's autocast (bf16/fp16) for extra forwards, or nothing."""
    return autocast_to(strategy.device, getattr(strategy, "autocast_dtype", None))
