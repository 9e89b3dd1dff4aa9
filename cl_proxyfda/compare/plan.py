"""The comparison file's schema, its variants and grids, and the plan: one validated
:class:`~cl_proxyfda.config.RunConfig` per variant x seed (see :mod:`cl_proxyfda.compare`).
Planning writes nothing."""
from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cl_proxyfda.config import RunConfig, apply_overrides, first_error, parse_config, set_path
from cl_proxyfda.yaml_files import read_yaml
from cl_proxyfda.errors import ConfigError

__all__ = [
    "ComparisonFile",
    "VariantSpec",
    "PlannedRun",
    "VariantPlan",
    "ComparisonPlan",
    "load_comparison",
    "plan_comparison",
    "grid_points",
    "folder_name",
]


# ------------------------------------------------------------------------- schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)


def _check_plain_name(v: str) -> str:
    if not v or "/" in v or "\\" in v or v in (".", "..") or v != v.strip():
        raise ValueError(f"must be a plain folder name (got {v!r})")
    return v


class VariantSpec(_Strict):
    """One entry of ``variants``: a strategy list and changes to the base."""

    name: str
    strategies: Optional[list[dict[str, Any]]] = Field(None, description="default: the base's strategies")
    train: Optional[dict[str, Any]] = Field(None, description="partial train section merged into the base")
    model: Optional[dict[str, Any]] = Field(None, description="partial model section merged into the base")
    overrides: list[str] = Field(default_factory=list, alias="set", description="key.path=value overrides")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="key.path -> values; one variant per point")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return _check_plain_name(v)

    @field_validator("strategies")
    @classmethod
    def _named_strategies(cls, v: Optional[list[dict[str, Any]]]) -> Optional[list[dict[str, Any]]]:
        if v is not None:
            if not v:
                raise ValueError("list at least one strategy (use naive for plain fine-tuning)")
            for i, item in enumerate(v):
                if "name" not in item:
                    raise ValueError(f"item {i} has no 'name'")
        return v

    @field_validator("grid")
    @classmethod
    def _grid_lists(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not [p for p in key.split(".") if p]:
                raise ValueError("empty key path")
            if not values:
                raise ValueError(f"{key!r} has no values")
        return v


class ComparisonFile(_Strict):
    """The top level of a comparison file."""

    name: Optional[str] = Field(None, description="comparison name (default: the file's stem)")
    description: Optional[str] = None
    output_dir: str = Field("runs", description="OUT = output_dir/name unless --out is given")
    base_config: Optional[str] = Field(None, description="run file, relative to the comparison file")
    base: Optional[dict[str, Any]] = Field(None, description="run config; merged over base_config")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    variants: list[VariantSpec] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _check_plain_name(v)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat: {v}")
        return v


# -------------------------------------------------------------------------- plans
@dataclass
class PlannedRun:
    """One variant x seed: a validated run config and its folder."""

    variant: str
    seed: int
    config: RunConfig
    out_dir: Path


@dataclass
class VariantPlan:
    """One variant after grid expansion."""

    name: str
    spec_name: str
    spec_index: int
    grid: dict[str, Any]
    folder: str
    runs: list[PlannedRun]


@dataclass
class ComparisonPlan:
    """Everything a comparison will run, validated; writes nothing."""

    name: str
    description: Optional[str]
    out_dir: Path
    seeds: list[int]
    variants: list[VariantPlan]
    source: dict[str, Any]

    @property
    def runs(self) -> list[PlannedRun]:
        return [r for v in self.variants for r in v.runs]


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in: mappings recursively, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[tuple[dict[str, Any], str]]:
    """The Cartesian product of a grid: ``(key -> value, "label=value,...")`` per point.

    Points follow the keys' order, the last key varying fastest. A value is labelled by
    the last component of its key path, or the full path when two keys end alike.
    """
    if not grid:
        return [({}, "")]
    keys = list(grid)
    short = [[p for p in k.split(".") if p][-1] for k in keys]
    labels = [s if short.count(s) == 1 else k for s, k in zip(short, keys)]
    points = []
    for values in itertools.product(*(grid[k] for k in keys)):
        label = ",".join(f"{lab}={_format_value(v)}" for lab, v in zip(labels, values))
        points.append((dict(zip(keys, values)), label))
    return points


def folder_name(name: str) -> str:
    """A file-system-safe folder name for a variant (``[``, ``]``, ``=``, ``,`` kept)."""
    return re.sub(r"[^\w\-.=,\[\]+]+", "_", name).strip("_.") or "variant"


def load_comparison(
    source: str | Path | Mapping[str, Any], overrides: Sequence[str] | None = None
) -> tuple[ComparisonFile, dict[str, Any], str, dict[str, Any]]:
    """Read and validate a comparison file (or mapping).

    Returns the validated file, the resolved base run mapping (``base_config`` with
    ``base`` merged over it), the comparison name and the raw (overridden) mapping.
    """
    if isinstance(source, Mapping):
        raw: dict[str, Any] = copy.deepcopy(dict(source))
        folder, stem = Path.cwd(), "comparison"
    else:
        path = Path(source)
        raw = read_yaml(path)
        folder, stem = path.resolve().parent, path.stem
    if overrides:
        raw = apply_overrides(raw, list(overrides))
    try:
        spec = ComparisonFile(**raw)
    except ValidationError as exc:
        raise first_error(exc) from None
    except TypeError as exc:
        raise ConfigError("", f"invalid keys: {exc}") from None
    if spec.base is None and spec.base_config is None:
        raise ConfigError("base", "give a base run config (base: {...}) or base_config: path/to/run.yaml")
    base: dict[str, Any] = {}
    if spec.base_config is not None:
        base_path = Path(spec.base_config).expanduser()
        if not base_path.is_absolute():
            base_path = folder / base_path
        try:
            base = read_yaml(base_path)
        except ConfigError as exc:
            raise ConfigError("base_config", exc.problem) from None
    if spec.base is not None:
        base = _deep_merge(base, spec.base)
    name = spec.name or _check_name_or_error(stem)
    return spec, base, name, raw


def _check_name_or_error(stem: str) -> str:
    try:
        return _check_plain_name(folder_name(stem))
    except ValueError as exc:
        raise ConfigError("name", str(exc)) from None


def _variant_mapping(base: dict[str, Any], spec: VariantSpec, index: int) -> dict[str, Any]:
    data = copy.deepcopy(base)
    if spec.strategies is not None:
        data["strategies"] = copy.deepcopy(spec.strategies)
    for section in ("train", "model"):
        update = getattr(spec, section)
        if update:
            current = data.get(section)
            data[section] = _deep_merge(current if isinstance(current, dict) else {}, update)
    for j, item in enumerate(spec.overrides):
        try:
            data = apply_overrides(data, [item])
        except ConfigError as exc:
            raise ConfigError(f"variants[{index}].set[{j}]", exc.problem) from None
    return data


def _parse_run(data: dict[str, Any], prefix: str, note: str = "") -> RunConfig:
    try:
        return parse_config(data)
    except ConfigError as exc:
        path = f"{prefix}.{exc.path}" if exc.path else prefix
        raise ConfigError(path, exc.problem + note) from None


def plan_comparison(
    source: str | Path | Mapping[str, Any],
    out_dir: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    only: Sequence[str] | None = None,
) -> ComparisonPlan:
    """Expand and validate every variant x seed of a comparison; writes nothing.

    ``only`` keeps the variants with these names (a grid variant is kept by its base
    name or its full name); the others are validated but not planned.
    """
    spec, base, name, raw = load_comparison(source, overrides)
    _parse_run(base, "base")  # the base must be a valid run by itself
    out = Path(out_dir) if out_dir is not None else Path(spec.output_dir) / name
    variants: list[VariantPlan] = []
    seen_names: dict[str, str] = {}
    seen_folders: dict[str, str] = {}
    for i, vspec in enumerate(spec.variants):
        mapping = _variant_mapping(base, vspec, i)
        for values, label in grid_points(vspec.grid):
            vname = f"{vspec.name}[{label}]" if label else vspec.name
            where = f"variants[{i}]"
            if vname in seen_names:
                raise ConfigError(f"{where}.name", f"variant {vname!r} appears twice (also {seen_names[vname]})")
            folder = folder_name(vname)
            if folder in seen_folders:
                raise ConfigError(f"{where}.name", f"variants {vname!r} and {seen_folders[folder]!r} share the folder name {folder!r}")
            seen_names[vname], seen_folders[folder] = where, vname
            data = copy.deepcopy(mapping)
            for key, value in values.items():
                try:
                    set_path(data, key, value)
                except ConfigError as exc:
                    raise ConfigError(f"{where}.grid", f"{exc.path}: {exc.problem}") from None
            note = f" (variant {vname!r})" if label else ""
            runs = []
            for seed in spec.seeds:
                run_data = copy.deepcopy(data)
                run_section = run_data.get("run") if isinstance(run_data.get("run"), dict) else {}
                run_data["run"] = {**run_section, "seed": seed, "name": f"{folder}-seed{seed}"}
                log_section = run_data.get("logging") if isinstance(run_data.get("logging"), dict) else {}
                wandb_section = log_section.get("wandb") if isinstance(log_section.get("wandb"), dict) else {}
                if wandb_section.get("group") is None:
                    run_data["logging"] = {**log_section, "wandb": {**wandb_section, "group": name}}
                cfg = _parse_run(run_data, where, note)
                runs.append(PlannedRun(vname, seed, cfg, out / "variants" / folder / f"seed{seed}"))
            variants.append(VariantPlan(vname, vspec.name, i, dict(values), folder, runs))
    if only:
        known = {v.name for v in variants} | {v.spec_name for v in variants}
        unknown = [o for o in only if o not in known]
        if unknown:
            raise ConfigError("--only", f"unknown variant(s) {unknown} (known: {', '.join(sorted(known))})")
        variants = [v for v in variants if v.name in only or v.spec_name in only]
    return ComparisonPlan(name, spec.description, out, list(spec.seeds), variants, raw)
