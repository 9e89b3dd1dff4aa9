"""``cl-proxyfda prefetch``: download everything a run file needs, then run offline.

What a run can need from the network, and where it goes:

- open_clip weights (a ``model.pretrained`` tag or a ``hf-hub:`` model): the hub cache
  (``HF_HOME`` / ``HF_HUB_CACHE``), or open_clip's URL cache for URL-only tags;
- GIFT's diffusers pipeline (``generator.model`` of a ``gift`` strategy): the hub cache;
- MTIL datasets stored in torchvision's format: torchvision downloads those it can into
  ``stream.root`` (the others are placed there by hand, see the README);
- class names and templates: they ship with the installed packages (clip-benchmark,
  open_clip), nothing to fetch.

The typical cluster flow: ``cl-proxyfda prefetch RUN.yaml`` on a login node with
internet, then ``HF_HUB_OFFLINE=1 cl-proxyfda run RUN.yaml`` on compute nodes that share
the same ``HF_HOME`` and data root.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cl_proxyfda.config import RunConfig
from cl_proxyfda.errors import UserError
from cl_proxyfda.hub import HubFiles, fetch, open_clip_files, pipeline_files


@dataclass
class Need:
    """One thing a run needs: a label, and how to get it (None: nothing to download)."""

    label: str
    get: Callable[[], str] | None = None
    note: str = ""
    files: HubFiles | None = None


@dataclass
class Outcome:
    need: Need
    ok: bool
    message: str


def _hub_need(label: str, files: HubFiles | None, local_note: str) -> Need:
    if files is None:
        return Need(label, note=local_note)

    def get() -> str:
        return f"{files.describe()} -> {fetch(files)}"

    return Need(label, get, files=files)


def model_need(cfg: RunConfig) -> Need:
    from cl_proxyfda.models import resolve_pretrained

    weights = resolve_pretrained(cfg.model.pretrained)
    files = open_clip_files(cfg.model.name, weights)
    if weights is None:
        note = "random weights" if files is None else ""
    else:
        note = f"local file {weights}"
    return _hub_need(f"model {cfg.model.name} ({cfg.model.pretrained or 'none'})", files, note)


def _pipeline_needs(cfg: RunConfig) -> list[Need]:
    from cl_proxyfda.generators.diffusers_backend import DiffusersParams
    needs = []
    for i, entry in enumerate(cfg.strategies):
        if entry.name != "gift":
            continue
        choice = entry.params.generator
        if choice.name != "diffusers":
            needs.append(Need(f"strategies[{i}] gift generator {choice.name}", note="built in, nothing to download"))
            continue
        model = DiffusersParams(**choice.args).model
        needs.append(_hub_need(f"strategies[{i}] gift pipeline {model}", pipeline_files(model), f"local folder {model}"))
    return needs


def _dataset_needs(cfg: RunConfig) -> list[Need]:
    if cfg.stream.name not in ("mtil", "xtail"):
        return [Need(f"stream {cfg.stream.name}", note="local data, nothing to download")]
    from cl_proxyfda.benchmarks import mtil, xtail

    if cfg.stream.name == "xtail":  # MTIL's datasets without CIFAR100
        params = xtail.XTAILStreamParams(**cfg.stream.args)
        names = xtail.xtail_task_names(params.order, params.tasks)
    else:
        params = mtil.MTILStreamParams(**cfg.stream.args)
        names = mtil.mtil_task_names(params.order, params.tasks)
    root = Path(params.root).expanduser()
    if params.format != "torchvision":
        return [Need(f"stream {cfg.stream.name} ({params.format})", note=f"image folders under {root}, nothing to download")]

    def getter(name: str) -> Callable[[], str]:
        def get() -> str:
            root.mkdir(parents=True, exist_ok=True)
            try:
                data = mtil.TORCHVISION_LOADERS[name](root, True, params.protocol)
            except Exception as exc:  # noqa: BLE001 - torchvision raises many kinds; one line each
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"torchvision could not download {name} into {root}: {text}; place it there by hand (see the README)") from None
            return f"{len(data.train)} train / {len(data.test)} test images in {root}"

        return get

    needs = [Need(f"dataset {name}", getter(name)) for name in names]
    if params.control is not None:
        needs.append(Need("control set ImageNet", note=f"local folder {params.control} (ImageNet cannot be downloaded automatically)"))
    return needs


def needs_of(cfg: RunConfig) -> list[Need]:
    """Everything ``cfg`` needs that may come from the network, in the order it is fetched."""
    from cl_proxyfda.registry import load_builtin_components

    load_builtin_components()
    metadata = Need("class names and templates", note="shipped with clip-benchmark and open_clip")
    return [model_need(cfg), *_pipeline_needs(cfg), *_dataset_needs(cfg), metadata]


def prefetch(cfg: RunConfig, progress: bool = True) -> list[Outcome]:
    """Fetch every need of ``cfg`` (continuing past failures); one outcome each."""
    from tqdm.auto import tqdm

    needs = needs_of(cfg)
    outcomes = []
    bar = tqdm(needs, desc="prefetch", unit="item", disable=not progress, leave=False)
    for need in bar:
        bar.set_postfix_str(need.label)
        if need.get is None:
            outcomes.append(Outcome(need, True, need.note))
            continue
        try:
            outcomes.append(Outcome(need, True, need.get()))
        except UserError as exc:
            outcomes.append(Outcome(need, False, str(exc)))
    bar.close()
    return outcomes
