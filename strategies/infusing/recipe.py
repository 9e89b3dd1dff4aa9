"""The whole Infusing recipe as one run-file entry (``infusing``) that stands for its parts."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cl_proxyfda.errors import UserError
from cl_proxyfda.strategies.base import CLPlugin, Configurable, RunContext
from cl_proxyfda.strategies.infusing.generic import GenericDistillPlugin, GenericParams
from cl_proxyfda.strategies.infusing.head import CosineHeadPlugin, HeadParams
from cl_proxyfda.strategies.infusing.l2 import L2Params, MeanL2Plugin
from cl_proxyfda.strategies.infusing.select import BestCheckpointPlugin, SelectParams
from cl_proxyfda.teacher import unwrap


class InfusingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    head: HeadParams | None = Field(default_factory=HeadParams, description="null: keep the zero-shot text-head loss")
    generic: GenericParams | None = Field(default_factory=GenericParams, description="null: no generic batches")
    l2: L2Params | None = Field(default_factory=L2Params, description="null: no weight regulariser")
    select: SelectParams | None = Field(default_factory=SelectParams, description="null: keep the last iterate")
    vision_only: bool = Field(True, description="refuse a trainable text tower")


class VisionOnlyPlugin(CLPlugin):
    """Refuses a trainable text tower when training starts (the recipe's ``vision_only``)."""

    name = "infusing_vision_only"

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        if getattr(unwrap(strategy.model), "text_trainable", False):
            raise UserError("infusing: the recipe fine-tunes the image tower only; set model.train_towers: [image] (or vision_only: false)")


def infusing_plugins(
    head: CosineHeadPlugin | None = None,
    generic: GenericDistillPlugin | None = None,
    l2: MeanL2Plugin | None = None,
    select: BestCheckpointPlugin | None = None,
    vision_only: bool = True,
    run: RunContext | None = None,
) -> list[CLPlugin]:
    """The recipe's plugins in their order: the vision-only check, then generic, head, L2
    and selection (parts given as ``None`` are left out). Add them all to the strategy.
    ``run``: the runner's context, for the vision-only check (the parts carry their own)."""
    check: list[CLPlugin] = [VisionOnlyPlugin(run=run)] if vision_only else []
    return [*check, *(p for p in (generic, head, l2, select) if p is not None)]


class Infusing(Configurable):
    """The Infusing recipe: not a plugin itself but the list of its parts.

    ``Infusing(generic={"source": "folder", "root": "generic/"}).plugins()`` (keywords
    validated by :class:`InfusingParams`) or :func:`infusing_plugins` with parts built by
    hand; the runner adds ``Infusing.build_plugins(params, run)``.
    """

    Params = InfusingParams
    name = "infusing"

    def __init__(self, params: InfusingParams | None = None, /, *, run: RunContext | None = None, **kwargs: Any) -> None:
        self._configure(params, run, kwargs)

    def plugins(self) -> list[CLPlugin]:
        """The parts, built from the params and the run's context."""
        p, run = self.params, self.run
        assert isinstance(p, InfusingParams)
        return infusing_plugins(
            head=CosineHeadPlugin.from_params(p.head, run) if p.head is not None else None,
            generic=GenericDistillPlugin.from_params(p.generic, run) if p.generic is not None else None,
            l2=MeanL2Plugin.from_params(p.l2, run) if p.l2 is not None else None,
            select=BestCheckpointPlugin.from_params(p.select, run) if p.select is not None else None,
            vision_only=p.vision_only,
            run=run,
        )

    @classmethod
    def build_plugins(cls, params: BaseModel, run: RunContext | None = None) -> list[Any]:
        return cls.from_params(params, run).plugins()
