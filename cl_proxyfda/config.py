"""The run configuration: YAML (read by :mod:`cl_proxyfda.yaml_files`) validated against a typed schema.

Every error is one line naming the key path, e.g. ``train.lr: must be > 0 (got -1)``.
Strategy and stream arguments are validated against the schema their registry entry
declares, so ``strategies[1].k`` errors name the plugin's own keys. Strategies are parsed
once, into their plugin's typed ``Params`` (``cfg.strategies[i].params``).
"""
from __future__ import annotations

import copy
import math
import re
import sys
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from cl_proxyfda.adapters import AdapterConfig
from cl_proxyfda.errors import ConfigError
from cl_proxyfda.prompt_learner import PromptLearnerConfig
from cl_proxyfda.registry import STRATEGIES, STREAMS, load_builtin_components
from cl_proxyfda.yaml_files import load_yaml_text, read_yaml


# Bounds shared by the schema (and the strategies' Params): seeds fit numpy's 32-bit
# seeding, batch sizes and step counts stay far below what a machine can hold.
MAX_SEED = 2**32 - 1
MAX_BATCH = 65536
MAX_STEPS = 10_000_000
NAME_MAX_BYTES = 255  # one path component on Linux / macOS file systems


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN and +-inf are refused in every float field
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


def check_folder_name(v: str) -> str:
    """A plain folder name: not empty, no path separator, not . or .., at most 255 bytes."""
    if not v or "/" in v or "\\" in v or "\0" in v or v in (".", ".."):
        raise ValueError(f"must be a plain folder name (got {v!r})")
    if len(v.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES:
        raise ValueError(f"must be at most {NAME_MAX_BYTES} bytes long as a folder name (got {len(v)} characters)")
    return v


class RunSection(_Strict):
    name: str = "run"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    output_dir: str = Field("runs", min_length=1)
    teacher_half: bool = Field(False, description="keep frozen teachers in half precision on CUDA")
    threads: Optional[int] = Field(None, gt=0, le=4096, description="CPU threads for torch (default: torch's choice)")

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        return check_folder_name(v)

    @field_validator("output_dir")
    @classmethod
    def _no_nul(cls, v: str) -> str:
        if "\0" in v:
            raise ValueError("must not contain a NUL character")
        return v


class ModelSection(_Strict):
    name: str
    pretrained: Optional[str] = None
    train_towers: list[Literal["image", "text"]] = ["image"]
    freeze_logit_scale: bool = True
    adapter: Optional[AdapterConfig] = None
    prompt_learner: Optional[PromptLearnerConfig] = Field(
        None, description="CoOp prompt context; freezes both towers (train_towers is then ignored)"
    )

    @field_validator("train_towers")
    @classmethod
    def _some_tower(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one tower (image, text)")
        return v


class TrainSection(_Strict):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-5, gt=0)
    lr_per_task: dict[str, float] = Field(default_factory=dict, description="task name -> lr override")
    weight_decay: float = Field(0.0, ge=0)
    iterations: Optional[int] = Field(None, gt=0, le=MAX_STEPS, description="optimizer steps per experience (default 100)")
    epochs: Optional[int] = Field(None, gt=0, le=100_000, description="alternative to iterations")
    batch_size: int = Field(32, gt=0, le=MAX_BATCH)
    warmup: int = Field(0, ge=0, le=MAX_STEPS, description="linear warm-up steps, then the schedule")
    schedule: Literal["cosine", "constant"] = "cosine"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: Optional[float] = Field(None, gt=0)
    workers: int = Field(0, ge=0, le=256)
    sampler: Literal["auto", "random", "class_balanced"] = Field(
        "auto", description="auto: class_balanced (m = batch_size / images_per_class) when fda/proxy_fda is in the run, else random"
    )
    classes_per_batch: Optional[int] = Field(None, gt=0, le=MAX_BATCH, description="class_balanced sampler: m (default batch_size / images_per_class)")
    images_per_class: int = Field(4, gt=0, le=MAX_BATCH, description="class_balanced sampler: n")
    hard_class_mining: bool = True
    mining_temperature: float = Field(0.5, gt=0, description="hard mining softness, in standard deviations of a class's similarities")
    augment: bool = Field(True, description="use the model's training augmentation (false: the eval transform)")
    teacher_table: bool = Field(
        False,
        description="serve the frozen references' final image embeddings of training images from a table computed once per "
        "experience instead of a teacher forward per batch (needs augment: false)",
    )
    text_templates: Literal["first", "ensemble"] = Field(
        "first", description="training heads from each task's first template (as ZSCL/GIFT train) or every template; evaluation uses every template"
    )

    @model_validator(mode="after")
    def _table_needs_eval_transform(self) -> "TrainSection":
        if self.teacher_table and self.augment:
            raise ValueError(
                "teacher_table: needs train.augment: false (the table holds features of the eval-transformed images; "
                "with augmentation every batch's teacher features differ)"
            )
        return self

    @field_validator("lr_per_task")
    @classmethod
    def _positive_lrs(cls, v: dict[str, float]) -> dict[str, float]:
        for task, lr in v.items():
            if not lr > 0:
                raise ValueError(f"lr for task {task!r} must be > 0 (got {lr})")
        return v


class EvalSection(_Strict):
    control: bool = True
    batch_size: int = Field(256, gt=0, le=MAX_BATCH)
    retrieval: bool = Field(False, description="image-to-image retrieval mAP@k and Recall@1 per task as extra matrices")
    retrieval_k: int = Field(20, gt=0, le=1_000_000, description="cut-off k of mAP@k")
    control_probe: Literal["none", "linear", "knn"] = Field(
        "none", description="probe accuracy of frozen image features of the control set at every row (linear: logistic regression; knn: cosine k-NN)"
    )
    probe_tasks: bool = Field(False, description="also probe every task's test set (an extra matrix named <probe>_probe)")
    probe_k: int = Field(20, gt=0, le=65536, description="neighbours of the knn probe")
    task_agnostic: Optional[bool] = Field(
        None,
        description="X-TAIL: also classify every test image over the union of all tasks' class names, no task label (default: true for the xtail stream, else false)",
    )
    task_agnostic_templates: Optional[Literal["task", "single"]] = Field(
        None,
        description="union head: task = each class's template ensemble of the first task naming it; single = 'a photo of a {}.' as RAIL (default: single for xtail, else task)",
    )


class WandbSection(_Strict):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "cl-proxyfda"
    entity: Optional[str] = None
    group: Optional[str] = None


class LoggingSection(_Strict):
    wandb: WandbSection = WandbSection()
    plots: bool = True
    progress: bool = True
    train_every: int = Field(
        10, ge=1, le=MAX_STEPS, description="training steps per write of train_log.csv and W&B's train/* (one host sync per write)"
    )


# Keys that configs once accepted: a file that still sets one gets this one-line reason.
REMOVED_KEYS: dict[tuple[str, str], str] = {
    ("eval", "every_experience"): "was removed: it was never read, and evaluation runs after every experience always; delete the key",
}


def removed_key(data: Any) -> ConfigError | None:
    """The first key of :data:`REMOVED_KEYS` that a raw run mapping still sets."""
    for (section, key), why in REMOVED_KEYS.items():
        node = data.get(section) if isinstance(data, dict) else None
        if isinstance(node, dict) and key in node:
            return ConfigError(f"{section}.{key}", why)
    return None


class CheckpointSection(_Strict):
    enabled: bool = True
    keep_last: int = Field(2, gt=0, le=10_000)


FDA_FAMILY = ("fda", "proxy_fda")  # plugins that build a kNN graph on each batch
XTAIL_STREAM = "xtail"  # its runs evaluate task-agnostically by default (cl_proxyfda.union)


class NamedComponent(BaseModel):
    """``{name: ..., other keys}``: the other keys are the component's arguments."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StrategyEntry(BaseModel):
    """One ``strategies`` item, ``{name: ..., **args}`` in YAML: the registry name and
    the arguments parsed into the plugin's ``Params`` (errors name ``strategies[i].key``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    name: str
    params: BaseModel

    @model_validator(mode="wrap")
    @classmethod
    def _parse(cls, data: Any, handler: Any) -> "StrategyEntry":
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):  # the message of any {name: ..., args} component
            raise ValidationError.from_exception_data(
                cls.__name__, [{"type": "model_type", "loc": (), "input": data, "ctx": {"class_name": "NamedComponent"}}]
            )
        if not isinstance(data.get("name"), str):
            name = {"name": data["name"]} if "name" in data else {}
            return handler({**name, "params": _Strict()})  # "required key is missing" / not a string
        load_builtin_components()
        args = {k: v for k, v in data.items() if k != "name"}
        try:
            schema = STRATEGIES.get(data["name"]).params
        except KeyError as exc:
            raise ValidationError.from_exception_data(
                cls.__name__, [{"type": "value_error", "loc": ("name",), "input": data, "ctx": {"error": ValueError(exc.args[0])}}]
            ) from None
        try:
            params = schema.model_validate(args)
        except ValidationError as exc:  # the first problem of an entry, as for every component
            err = exc.errors()[0]
            first = {k: err[k] for k in ("type", "loc", "input", "ctx") if k in err}
            raise ValidationError.from_exception_data(cls.__name__, [first]) from None  # type: ignore[list-item]
        return cls.of(data["name"], params)

    @classmethod
    def of(cls, name: str, params: BaseModel | None = None) -> "StrategyEntry":
        """An entry from parsed params (default: the plugin's defaults)."""
        load_builtin_components()
        return cls.model_construct(name=name, params=params if params is not None else STRATEGIES.get(name).params())

    @property
    def args(self) -> dict[str, Any]:
        """The arguments the run file gave (defaults left out)."""
        return self.params.model_dump(exclude_unset=True)

    @property
    def plugin(self) -> Any:
        """The registered plugin class."""
        return STRATEGIES.get(self.name).factory

    @model_serializer(mode="plain")
    def _flat(self, info: Any) -> dict[str, Any]:
        return {"name": self.name, **self.params.model_dump(mode=info.mode)}


class RunConfig(_Strict):
    run: RunSection = RunSection()
    model: ModelSection
    stream: NamedComponent
    train: TrainSection = TrainSection()
    strategies: list[StrategyEntry] = Field(default_factory=lambda: [StrategyEntry.of("naive")])
    eval: EvalSection = EvalSection()
    logging: LoggingSection = LoggingSection()
    checkpoint: CheckpointSection = CheckpointSection()

    @model_validator(mode="after")
    def _resolve_task_agnostic(self) -> "RunConfig":
        """``eval.task_agnostic`` / ``task_agnostic_templates`` left out: the X-TAIL stream's
        protocol (on, RAIL's single template) for ``stream: xtail``, else off / task."""
        xtail = self.stream.name == XTAIL_STREAM
        if self.eval.task_agnostic is None:
            self.eval.task_agnostic = xtail
        if self.eval.task_agnostic_templates is None:
            self.eval.task_agnostic_templates = "single" if xtail else "task"
        return self

    def sampler_layout(self) -> tuple[str, int, int]:
        """(sampler, m classes, n images per class) that the run uses.

        ``auto`` is the class-balanced, hard-mined sampler whenever an FDA-family plugin
        (``fda``, ``proxy_fda``) is in the run and ``batch_size`` splits into at least two
        classes of ``images_per_class`` (the kNN graph needs neighbourhoods in the batch),
        else random batches.
        """
        t = self.train
        n = t.images_per_class
        kind = t.sampler
        if kind == "auto":
            fda = any(s.name in FDA_FAMILY for s in self.strategies)
            kind = "class_balanced" if fda and t.batch_size % n == 0 and t.batch_size // n >= 2 else "random"
        m = t.classes_per_batch if t.classes_per_batch is not None else max(1, t.batch_size // n)
        return kind, m, n

    def to_dict(self) -> dict[str, Any]:
        """The resolved config: every section, stream and strategy with defaults filled in."""
        load_builtin_components()
        data = self.model_dump(mode="json")  # strategies dump their typed params
        data["stream"] = {"name": self.stream.name, **stream_params(self.stream).model_dump(mode="json")}
        return data


# ----------------------------------------------------------------- error text
def _loc_to_path(loc: tuple[Any, ...], prefix: str = "") -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path


# pydantic's loc parts that name a validator or a union member, not a key
_TAG_LOC = re.compile(r"^(function-.*|literal_error|float|int|str|bool|none|(literal|list|dict|tuple|union)\[.*\])$")


def shorten(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (error lines stay one short line)."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return f"<a number of more than {sys.get_int_max_str_digits()} digits>"
    return text if len(text) <= limit else f"{text[: limit - 20]}...{text[-12:]} ({len(text)} characters)"


def format_error(err: Any, prefix: str = "") -> ConfigError:
    """One pydantic error as a ``key.path: problem`` line."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _TAG_LOC.match(p)))
    path = _loc_to_path(loc, prefix)
    kind = err["type"]
    if kind == "extra_forbidden":
        return ConfigError(path, "unknown key")
    if kind == "missing":
        return ConfigError(path, "required key is missing")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    given = err.get("input")
    # validators that quote the value themselves already say "(got ...)"
    if kind not in ("model_type", "dict_type") and not isinstance(given, (dict, list)) and "(got " not in msg:
        msg = f"{msg} (got {shorten(given)})"
    return ConfigError(path, msg.replace("\n", " "))


def first_error(exc: ValidationError, prefix: str = "") -> ConfigError:
    return format_error(exc.errors()[0], prefix)


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key.path`` in ``data`` (list items by index) to a copy of ``value``, creating
    missing sections. Raises :class:`ConfigError` ``(key, problem)`` for a path that does
    not fit ``data``; callers put their own key path in front of the problem."""
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(key, "empty key path")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(key, f"no list item {part!r}")
            if last:
                node[int(part)] = copy.deepcopy(value)
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(key, f"{parts[i - 1]!r} is not a section")
        if last:
            node[part] = copy.deepcopy(value)
        else:
            if part not in node or node[part] is None:
                node[part] = [] if parts[i + 1].isdigit() else {}
            node = node[part]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars/lists)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", f"expected key.path=value, got {item!r}")
        key, raw = item.split("=", 1)
        if not [p for p in key.strip().split(".") if p]:
            raise ConfigError("--set", f"empty key in {item!r}")
        try:
            value = load_yaml_text(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError):
            raise ConfigError(key, f"--set value {raw!r} is not valid YAML") from None
        try:
            set_path(data, key, value)
        except ConfigError as exc:
            raise ConfigError(key, f"--set: {exc.problem}") from None
    return data


def _validate_stream(comp: NamedComponent) -> None:
    """Validate the stream's arguments against its registry entry."""
    try:
        entry = STREAMS.get(comp.name)
    except KeyError as exc:
        raise ConfigError("stream.name", str(exc.args[0])) from None
    try:
        entry.params(**comp.args)
    except ValidationError as exc:
        raise first_error(exc, "stream") from None
    except TypeError as exc:
        raise ConfigError("stream", str(exc)) from None


def _check_strategy(entry: StrategyEntry, path: str, cfg: "RunConfig") -> None:
    """A plugin's constraints against the rest of the run: its params may define
    ``check_run(cfg)``, raising ``ValueError("key: problem")`` (key empty: the entry)."""
    check = getattr(entry.params, "check_run", None)
    if callable(check):
        try:
            check(cfg)
        except ValueError as exc:
            key, _, problem = str(exc).partition(": ")
            raise ConfigError(f"{path}.{key}" if key else path, problem) from None


def check_numbers(data: Any, path: str = "") -> None:
    """Every number anywhere in ``data`` is finite and fits in 64 bits (a net under the
    schema's own bounds, also for arguments that components take as free-form keys)."""
    if isinstance(data, dict):
        for key, value in data.items():
            check_numbers(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            check_numbers(value, f"{path}[{i}]")
    elif isinstance(data, bool):
        return
    elif isinstance(data, int) and not -(2**63) <= data < 2**63:
        raise ConfigError(path, f"{shorten(data)} is out of range (numbers must fit in 64 bits)")
    elif isinstance(data, float) and not math.isfinite(data):
        raise ConfigError(path, f"must be a finite number (got {data})")


def parse_config(data: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping into a RunConfig, components included."""
    problems = config_problems(data)
    if problems:
        raise problems[0]
    return RunConfig(**data)


def config_problems(data: dict[str, Any]) -> list[ConfigError]:
    """Every problem of a raw run mapping, one ``ConfigError`` each (empty: valid).

    Section errors come first; components and cross-checks are checked only when the
    sections parse (they need them).
    """
    load_builtin_components()
    removed = removed_key(data)
    if removed is not None:
        return [removed]
    try:
        check_numbers(data)
        cfg = RunConfig(**data)
    except ConfigError as exc:
        return [exc]
    except ValidationError as exc:
        return [format_error(err) for err in exc.errors()]
    except TypeError as exc:  # keys that are not strings
        return [ConfigError("", f"invalid section keys: {exc}")]
    problems = []
    checks = [lambda: _validate_stream(cfg.stream)] + [
        lambda e=e, i=i: _check_strategy(e, f"strategies[{i}]", cfg) for i, e in enumerate(cfg.strategies)
    ]
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            problems.append(exc)
    try:
        _check_sections(cfg)
    except ConfigError as exc:
        problems.append(exc)
    return problems


def _check_sections(cfg: RunConfig) -> None:
    """Constraints between sections."""
    if not cfg.strategies:
        raise ConfigError("strategies", "list at least one strategy (use naive for plain fine-tuning)")
    adapter = cfg.model.adapter
    if adapter is not None and "text" in adapter.towers and "text" not in cfg.model.train_towers:
        raise ConfigError("model.adapter.towers", "text-tower adapters need 'text' in model.train_towers")
    if cfg.model.prompt_learner is not None and adapter is not None:
        raise ConfigError("model.prompt_learner", "prompt tuning trains the context only; remove model.adapter")
    if cfg.eval.task_agnostic and cfg.model.prompt_learner is not None and cfg.eval.task_agnostic_templates == "single":
        raise ConfigError("eval.task_agnostic_templates", "single ignores the learned prompts of model.prompt_learner; use task")
    if cfg.train.iterations is not None and cfg.train.epochs is not None:
        raise ConfigError("train.epochs", "set either iterations or epochs, not both")
    if cfg.eval.probe_tasks and cfg.eval.control_probe == "none":
        raise ConfigError("eval.probe_tasks", "needs eval.control_probe linear or knn (the probe to use)")
    kind, m, n = cfg.sampler_layout()
    if kind == "class_balanced":
        per_batch = m * n
        if per_batch != cfg.train.batch_size:
            raise ConfigError(
                "train.batch_size",
                f"class_balanced sampler needs batch_size = classes_per_batch x images_per_class = {per_batch} (got {cfg.train.batch_size})",
            )


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run file."""
    data = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return parse_config(data)


def stream_params(comp: NamedComponent) -> BaseModel:
    return STREAMS.get(comp.name).params(**comp.args)
