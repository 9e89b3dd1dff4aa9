"""``cl-proxyfda validate``: every check ``run`` makes before training, every problem listed.

The run file is parsed (all schema problems at once); then, when it parses, the run is
built exactly as ``run`` builds it (stream data, model, weights, device, precision,
per-task keys, plugins) without training or writing anything. Weights are never
downloaded here: cached weights are loaded, weights that still need a download are
reported as such and the architecture is built with random weights instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cl_proxyfda.config import RunConfig, apply_overrides, config_problems
from cl_proxyfda.yaml_files import read_yaml
from cl_proxyfda.errors import UserError
from cl_proxyfda.hub import availability, cached_location
from cl_proxyfda.prefetch import model_need


@dataclass
class Validation:
    """What ``validate`` found: problems (one line each) and facts worth saying."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: RunConfig | None = None
    summary: str = ""


def weights_report(cfg: RunConfig) -> tuple[bool, bool, str]:
    """(usable, cached, line): are the run's weights here, downloadable, or out of reach?"""
    need = model_need(cfg)
    if need.files is None:
        return True, True, f"weights: {need.note}"
    usable, line = availability(need.files)
    cached = cached_location(need.files) is not None
    return usable, cached, (f"weights: {line}" if usable else f"{need.files.key}: {line}")


def validate_file(path: str | Path, overrides: list[str] | None = None) -> Validation:
    """Check a run file as ``run`` would, collecting every problem."""
    out = Validation()
    try:
        data = read_yaml(path)
        if overrides:
            data = apply_overrides(data, overrides)
    except UserError as exc:
        out.problems.append(str(exc))
        return out
    out.problems += [str(p) for p in config_problems(data)]
    if out.problems:
        return out
    cfg = RunConfig(**data)
    out.config = cfg
    usable, cached, line = weights_report(cfg)
    (out.notes if usable else out.problems).append(line)
    build_cfg = cfg if cached else cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": None})})
    if not cached:
        out.notes.append("model: built with random weights to check the architecture (the weights are not here yet)")
    from cl_proxyfda.runner import build_run

    try:
        run = build_run(build_cfg)
    except UserError as exc:
        out.problems.append(str(exc))
        return out
    names = ", ".join(f"{t.name} ({t.num_classes})" for t in run.stream.tasks)
    out.summary = f"model {cfg.model.name}, {len(run.stream.tasks)} tasks [{names}], strategies {[s.name for s in cfg.strategies]}, device {run.device}"
    return out
