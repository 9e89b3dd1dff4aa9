"""Strategy presets of the steps section, read from the registry.

Every registered strategy is timed once with its Params defaults (``{"name": name}``),
except where :data:`OVERRIDES` (a small table keyed by registry name) gives the bench's
own rows: extra variants, arguments over the defaults, strategies a method needs beside
it. Strategies that need side data get it from the bench's stream
(:func:`side_data_args`), and ``coop`` its prompt learner (:data:`MODEL_NEEDS`). A name
in these tables that is not registered, or an argument its Params reject, is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from pydantic import ValidationError

from cl_proxyfda.registry import STRATEGIES, Registry, load_builtin_components
from cl_proxyfda.tools.bench.context import BenchContext, context_length
from cl_proxyfda.tools.bench.step_timer import StepEntry


@dataclass(frozen=True)
class Variant:
    """One row of the steps table for a registered strategy."""

    label: str | None = None  # None: the registry name; ``{n_ctx}`` and other model-extra fields are filled in
    args: Mapping[str, Any] = field(default_factory=dict)  # over the strategy's Params defaults
    cached_teacher: bool = False  # the pretrained teacher's embeddings served from a table (train.teacher_table)
    after: tuple[str, ...] = ()  # registered strategies listed before it in the run (it needs them)


OVERRIDES: dict[str, tuple[Variant, ...]] = {
    "naive": (Variant(), Variant("naive (second run: noise check)")),
    "ldifs": (Variant("ldifs (layers auto)"), Variant("ldifs layers=embed", {"layers": "embed"})),
    "fda": (Variant(), Variant("fda, teacher from cache", cached_teacher=True)),
    "proxy_fda": (Variant(), Variant("proxy_fda, teacher from cache", cached_teacher=True)),
    "awc": (Variant("gift + awc", after=("gift",)),),  # AWC reads GIFT's synthetic loss
    "coop": (Variant("coop (prompt learner, n_ctx {n_ctx})"),),
    "prompt_fda": (Variant("coop + prompt_fda", after=("coop",)),),  # regularises CoOp's learned prompts
    "infusing": (Variant(args={"select": {"every": 10_000}}),),  # no model selection inside the timed iterations
    "infusing_select": (Variant(args={"every": 10_000}),),
}
"""The bench's own rows, keyed by registry name; every other registered strategy is one
row, labelled with its name, run with its Params defaults."""


def _prompt_learner(ctx: BenchContext) -> dict[str, Any]:
    return {"prompt_learner": {"n_ctx": 16 if context_length(ctx.model) >= 64 else 4}}


MODEL_NEEDS: dict[str, Callable[[BenchContext], dict[str, Any]]] = {"coop": _prompt_learner}
"""Model-section settings a strategy needs (keyed by registry name), for every row it is in."""


def side_data_args(ctx: BenchContext, batch_size: int) -> dict[str, dict[str, Any]]:
    """Arguments of the strategies that read side data, from the bench's stream: GIFT's
    generator (the demo world, else a tiny diffusers pipeline), ZSCL's and Infusing's
    reference images (the stream's, else the image folders the bench wrote)."""
    stream = ctx.stream_config()
    demo = stream["name"] == "demo"
    if demo:
        generator: dict[str, Any] = {"name": "world", "image_size": 32}
    else:
        from cl_proxyfda.generators.diffusers_backend import build_tiny_pipeline

        pipe = ctx.tmp / "tiny_pipeline"
        if not pipe.is_dir():
            build_tiny_pipeline(pipe)
        generator = {"name": "diffusers", "model": str(pipe), "steps": 2, "progress": False, "dtype": "fp32"}
    gift: dict[str, Any] = {"generator": generator, "images_per_experience": ctx.sizes.synthetic_images,
                            "synthetic_batch_size": batch_size, "cache_dir": str(ctx.tmp / "synthetic")}
    zscl: dict[str, Any] = {"batch_size": batch_size}
    generic: dict[str, Any] = {"source": "reference"}
    if not demo:
        gift["base_concepts"] = ["red circle", "blue square", "green star"]
        zscl.update(reference="folder", reference_folder=stream["root"])
        generic = {"source": "folder", "root": stream["root"]}
    return {"gift": gift, "zscl": zscl, "infusing": {"generic": generic}, "infusing_generic": generic}


def _check_registered(names: Iterable[str], registry: Registry[Any], table: str) -> None:
    for name in names:
        if name not in registry:
            raise RuntimeError(f"bench presets: {table} names {name!r}, which is not a registered strategy "
                               f"(registered: {', '.join(registry.names())})")


def check_overrides(overrides: Mapping[str, tuple[Variant, ...]], registry: Registry[Any] = STRATEGIES,
                    model_needs: Mapping[str, Any] = MODEL_NEEDS) -> None:
    """Every name of ``overrides`` (keys and ``after``) and of ``model_needs`` is registered
    and every variant's arguments are valid for that strategy's Params; else a
    RuntimeError naming it."""
    _check_registered(overrides, registry, "OVERRIDES")
    _check_registered(model_needs, registry, "MODEL_NEEDS")
    for name, variants in overrides.items():
        for variant in variants:
            _check_registered(variant.after, registry, f"OVERRIDES[{name!r}].after")
            try:
                registry.get(name).params.model_validate(dict(variant.args))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise RuntimeError(f"bench presets: OVERRIDES[{name!r}] {variant.label or name}: {where}: {first['msg']}") from None


def strategy_presets(ctx: BenchContext, batch_size: int, overrides: Mapping[str, tuple[Variant, ...]] | None = None,
                     registry: Registry[Any] | None = None,
                     model_needs: Mapping[str, Callable[[BenchContext], dict[str, Any]]] | None = None) -> list[StepEntry]:
    """One or more rows for every registered strategy (registry order, naive first); the
    tables default to :data:`OVERRIDES`, :data:`MODEL_NEEDS` and ``STRATEGIES``."""
    if registry is None:
        load_builtin_components()
        registry = STRATEGIES
    overrides = OVERRIDES if overrides is None else overrides
    model_needs = MODEL_NEEDS if model_needs is None else model_needs
    check_overrides(overrides, registry, model_needs)
    if "naive" not in registry:
        raise RuntimeError("bench presets: the naive strategy (the baseline) is not registered")
    data = {name: args for name, args in side_data_args(ctx, batch_size).items() if name in registry}
    entries: list[StepEntry] = []
    for name in registry.names():
        for variant in overrides.get(name, (Variant(),)):
            names = [*variant.after, name]
            strategies = [{"name": n, **data.get(n, {})} for n in variant.after]
            strategies.append({"name": name, **data.get(name, {}), **variant.args})
            model: dict[str, Any] = {}
            for n in names:
                if n in model_needs:
                    model.update(model_needs[n](ctx))
            fields = {k: v for section in model.values() for k, v in section.items()}
            label = (variant.label or name).format(**fields)
            entries.append(StepEntry(label, strategies, cached_teacher=variant.cached_teacher, model=model))
    entries.sort(key=lambda e: e.label != "naive")  # the baseline first
    return entries
