"""The run configuration: YAML (safe_load only) validated against a typed schema.

Every error is one line naming the key path, e.g. ``train.lr: must be > 0 (got -1)``.
Strategy and stream arguments are validated against the schema their registry entry
declares, so ``strategies[1].k`` errors name the plugin's own keys.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cl_proxyfda.adapters import AdapterConfig
from cl_proxyfda.errors import ConfigError
from cl_proxyfda.prompt_learner import PromptLearnerConfig
from cl_proxyfda.registry import STRATEGIES, STREAMS, load_builtin_components


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RunSection(_Strict):
    name: str = "run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    output_dir: str = "runs"
    teacher_half: bool = Field(False, description="keep frozen teachers in half precision on CUDA")
    threads: Optional[int] = Field(None, gt=0, description="CPU threads for torch (default: torch's choice)")

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v or v in (".", ".."):
            raise ValueError(f"must be a plain folder name (got {v!r})")
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
    iterations: Optional[int] = Field(None, gt=0, description="optimizer steps per experience (default 100)")
    epochs: Optional[int] = Field(None, gt=0, description="alternative to iterations")
    batch_size: int = Field(32, gt=0)
    warmup: int = Field(0, ge=0, description="linear warm-up steps, then the schedule")
    schedule: Literal["cosine", "constant"] = "cosine"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: Optional[float] = Field(None, gt=0)
    workers: int = Field(0, ge=0)
    sampler: Literal["random", "class_balanced"] = "random"
    classes_per_batch: int = Field(16, gt=0, description="class_balanced sampler: m")
    images_per_class: int = Field(4, gt=0, description="class_balanced sampler: n")
    hard_class_mining: bool = True
    augment: bool = Field(True, description="use the model's training augmentation (false: the eval transform)")
    text_templates: Literal["first", "ensemble"] = Field(
        "first", description="training heads from each task's first template (as ZSCL/GIFT train) or every template; evaluation uses every template"
    )

    @field_validator("lr_per_task")
    @classmethod
    def _positive_lrs(cls, v: dict[str, float]) -> dict[str, float]:
        for task, lr in v.items():
            if lr <= 0:
                raise ValueError(f"lr for task {task!r} must be > 0 (got {lr})")
        return v


class EvalSection(_Strict):
    control: bool = True
    batch_size: int = Field(256, gt=0)
    every_experience: bool = True
    retrieval: bool = Field(False, description="image-to-image retrieval mAP@k and Recall@1 per task as extra matrices")
    retrieval_k: int = Field(20, gt=0, description="cut-off k of mAP@k")


class WandbSection(_Strict):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "cl-proxyfda"
    entity: Optional[str] = None
    group: Optional[str] = None


class LoggingSection(_Strict):
    wandb: WandbSection = WandbSection()
    plots: bool = True
    progress: bool = True


class CheckpointSection(_Strict):
    enabled: bool = True
    keep_last: int = Field(2, gt=0)


class NamedComponent(BaseModel):
    """``{name: ..., other keys}``: the other keys are the component's arguments."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunConfig(_Strict):
    run: RunSection = RunSection()
    model: ModelSection
    stream: NamedComponent
    train: TrainSection = TrainSection()
    strategies: list[NamedComponent] = Field(default_factory=lambda: [NamedComponent(name="naive")])
    eval: EvalSection = EvalSection()
    logging: LoggingSection = LoggingSection()
    checkpoint: CheckpointSection = CheckpointSection()

    def to_dict(self) -> dict[str, Any]:
        """The resolved config: every section, stream and strategy with defaults filled in."""
        load_builtin_components()
        data = self.model_dump(mode="json")
        data["stream"] = {"name": self.stream.name, **STREAMS.get(self.stream.name).params(**self.stream.args).model_dump(mode="json")}
        data["strategies"] = [
            {"name": s.name, **STRATEGIES.get(s.name).params(**s.args).model_dump(mode="json")} for s in self.strategies
        ]
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


def first_error(exc: ValidationError, prefix: str = "") -> ConfigError:
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in ("literal_error",))))
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
    if kind not in ("model_type", "dict_type") and not isinstance(given, (dict, list)):
        msg = f"{msg} (got {given!r})"
    return ConfigError(path, msg.replace("\n", " "))


# ------------------------------------------------------------------- loading
def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``; errors name the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError("", f"config file {p} does not exist")
    if p.is_dir():
        raise ConfigError("", f"config file {p} is a folder")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"config file {p} is not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError("", f"config file {p} is not valid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError("", f"config file {p} is empty")
    if not isinstance(data, dict):
        raise ConfigError("", f"config file {p} must hold a mapping of sections, not {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars/lists)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", f"expected key.path=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError("--set", f"empty key in {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(key, f"--set value {raw!r} is not valid YAML") from None
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(key, f"--set: no list item {part!r}")
                node = node[int(part)]
                continue
            if part not in node or node[part] is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(key, f"--set: {part!r} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(key, f"--set: no list item {last!r}")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def _validate_component(kind_registry: Any, comp: NamedComponent, path: str, cfg: "RunConfig | None" = None) -> None:
    """Validate a component's arguments; params may define ``check_run(cfg)`` for
    constraints against the rest of the run (it raises ``ValueError("key: problem")``)."""
    try:
        entry = kind_registry.get(comp.name)
    except KeyError as exc:
        raise ConfigError(f"{path}.name", str(exc.args[0])) from None
    try:
        params = entry.params(**comp.args)
    except ValidationError as exc:
        raise first_error(exc, path) from None
    except TypeError as exc:
        raise ConfigError(path, str(exc)) from None
    check = getattr(params, "check_run", None)
    if cfg is not None and callable(check):
        try:
            check(cfg)
        except ValueError as exc:
            key, _, problem = str(exc).partition(": ")
            raise ConfigError(f"{path}.{key}", problem) from None


def parse_config(data: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping into a RunConfig, components included."""
    load_builtin_components()
    try:
        cfg = RunConfig(**data)
    except ValidationError as exc:
        raise first_error(exc) from None
    except TypeError as exc:  # keys that are not strings
        raise ConfigError("", f"invalid section keys: {exc}") from None
    _validate_component(STREAMS, cfg.stream, "stream", cfg)
    if not cfg.strategies:
        raise ConfigError("strategies", "list at least one strategy (use naive for plain fine-tuning)")
    for i, comp in enumerate(cfg.strategies):
        _validate_component(STRATEGIES, comp, f"strategies[{i}]", cfg)
    adapter = cfg.model.adapter
    if adapter is not None and "text" in adapter.towers and "text" not in cfg.model.train_towers:
        raise ConfigError("model.adapter.towers", "text-tower adapters need 'text' in model.train_towers")
    if cfg.model.prompt_learner is not None and adapter is not None:
        raise ConfigError("model.prompt_learner", "prompt tuning trains the context only; remove model.adapter")
    if cfg.train.iterations is not None and cfg.train.epochs is not None:
        raise ConfigError("train.epochs", "set either iterations or epochs, not both")
    if cfg.train.sampler == "class_balanced":
        per_batch = cfg.train.classes_per_batch * cfg.train.images_per_class
        if per_batch != cfg.train.batch_size:
            raise ConfigError(
                "train.batch_size",
                f"class_balanced sampler needs batch_size = classes_per_batch x images_per_class = {per_batch} (got {cfg.train.batch_size})",
            )
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run file."""
    data = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return parse_config(data)


def strategy_params(comp: NamedComponent) -> BaseModel:
    return STRATEGIES.get(comp.name).params(**comp.args)


def stream_params(comp: NamedComponent) -> BaseModel:
    return STREAMS.get(comp.name).params(**comp.args)
