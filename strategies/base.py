"""The base of the project's Avalanche plugins: the typed plugin contract.

A plugin class declares its options as a pydantic ``Params`` type and is registered on
the class (``@STRATEGIES.register("ldifs")``). It is built either

* from a run file, once its arguments are parsed into ``Params``:
  ``LDIFSPlugin.from_params(params, run)``, where ``run`` is the frozen
  :class:`RunContext` the runner builds (plugins never see the run configuration); or
* from Python, with keyword arguments validated by the same ``Params``:
  ``LDIFSPlugin(weight=10.0, layers="embed")`` (a bad value raises pydantic's message).

One entry may stand for several plugins: the runner adds every plugin of
``Plugin.build_plugins(params, run)`` (one, unless a recipe such as ``infusing``
returns its parts), and each part checkpoints its own state.

Every option reaches its point of use as ``self.params.x``. What a plugin needs from
the run (seed, batch sizes, workers) it reads from ``self.context(strategy)``: the
runner's context, or defaults taken from the strategy it joined (seed 0, the
strategy's ``train_mb_size``) on a bare Avalanche ``SupervisedTemplate``.

A plugin is thin: it gathers features at the right callback and adds ``weight * loss``
to ``strategy.loss`` in ``before_backward``. State a plugin must keep across
experiences (anchors, importances, learnable temperatures, its own optimizer) is
returned by ``state_dict`` as tensors and plain Python values, so that the run's
checkpoint can be loaded with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from avalanche.core import SupervisedPlugin
from pydantic import BaseModel, ConfigDict

from cl_proxyfda.distributed import DistContext, current


@dataclass(frozen=True)
class RunContext:
    """What a plugin may know about the run it is built for (built once by the runner).

    ``stream`` is the built stream (its tasks' data sets, reference images, base
    concepts); ``stream_name`` / ``stream_args`` are its run-file entry (the synthetic
    cache key). The defaults are those of a bare Avalanche strategy.
    """

    task_names: tuple[str, ...] = ()
    classnames: tuple[tuple[str, ...], ...] = ()
    stream: Any = None
    stream_name: str = "stream"
    stream_args: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    workers: int = 0
    train_batch_size: int = 32
    eval_batch_size: int = 256
    augment: bool = True
    output_dir: str = "runs"
    progress: bool = True
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def num_experiences(self) -> int:
        return len(self.task_names)

    @property
    def dist(self) -> DistContext:
        """This process's rank and the world size (side data takes its share by them; no local rank)."""
        return DistContext(rank=self.rank, world=self.world)

    @classmethod
    def of_strategy(cls, strategy: Any) -> "RunContext":
        """Defaults for a plugin on a strategy the runner did not build (the rank and world
        of an initialised process group, if any)."""
        train = int(getattr(strategy, "train_mb_size", None) or cls.train_batch_size)
        group = current()
        return cls(
            train_batch_size=train,
            eval_batch_size=int(getattr(strategy, "eval_mb_size", None) or train),
            rank=group.rank,
            world=group.world,
            device=str(getattr(strategy, "device", "cpu")),
        )


class NoParams(BaseModel):
    """A plugin without options."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Configurable:
    """Typed construction shared by every plugin (mixed into Avalanche's plugins too).

    ``Plugin(params)`` takes a parsed ``Params``; ``Plugin(**kwargs)`` validates the
    keywords with ``Params`` (pydantic's ``ValidationError`` on a bad value). ``run`` is
    the runner's context, ``None`` on a strategy built by hand.
    """

    Params: ClassVar[type[BaseModel]] = NoParams
    params: BaseModel
    run: RunContext | None

    def _configure(self, params: BaseModel | None, run: RunContext | None, kwargs: dict[str, Any]) -> None:
        if params is None:
            params = self.Params(**kwargs)
        elif not isinstance(params, BaseModel):
            raise TypeError(f"{type(self).__name__}: pass options as keyword arguments or a {self.Params.__name__}")
        elif kwargs:
            raise TypeError(f"{type(self).__name__}: give either a {self.Params.__name__} or keyword arguments, not both")
        self.params = params
        self.run = run

    @classmethod
    def from_params(cls, params: BaseModel, run: RunContext | None = None) -> Any:
        """Build from parsed ``Params`` and the run's context."""
        return cls(params, run=run)

    @classmethod
    def build_plugins(cls, params: BaseModel, run: RunContext | None = None) -> list[Any]:
        """The plugins one run-file entry stands for: this one plugin. A recipe entry
        (Infusing) overrides it to return its parts; the runner adds them all."""
        return [cls.from_params(params, run)]

    def context(self, strategy: Any = None) -> RunContext:
        """The run's context, or defaults taken from ``strategy`` (seed 0, its batch size)."""
        if self.run is not None:
            return self.run
        return RunContext.of_strategy(strategy) if strategy is not None else RunContext()


class CLPlugin(Configurable, SupervisedPlugin):
    """A plugin whose state survives checkpoints.

    ``name`` is the registry name. ``needs_layers`` lists student layers the plugin reads
    (the runner asks the model to capture them). ``loss_terms`` holds the last value of
    each loss term the plugin added (floats), for logging and NaN reports.
    """

    name: str = "plugin"
    needs_layers: tuple[str, ...] = ()

    def __init__(self, params: BaseModel | None = None, /, *, run: RunContext | None = None, **kwargs: Any) -> None:
        super().__init__()
        self._configure(params, run, kwargs)
        self.loss_terms: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"plugin {self.name} got state it does not know: {sorted(state)}")
