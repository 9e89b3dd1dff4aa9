"""The run configuration: YAML (safe_load only) validated against a typed schema.

Every error is one line naming the key path, e.g. ``train.lr: must be > 0 (got -1)``.
Strategy and stream arguments are validated against the schema their registry entry
declares, so ``strategies[1].k`` errors name the plugin's own keys.
"""
from __future__ import annotations

import copy
import math
import re
import sys
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cl_proxyfda.adapters import AdapterConfig
from cl_proxyfda.errors import ConfigError
from cl_proxyfda.prompt_learner import PromptLearnerConfig
from cl_proxyfda.registry import STRATEGIES, STREAMS, load_builtin_components


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
    text_templates: Literal["first", "ensemble"] = Field(
        "first", description="training heads from each task's first template (as ZSCL/GIFT train) or every template; evaluation uses every template"
    )

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
    every_experience: bool = True
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


class RunConfig(_Strict):
    run: RunSection = RunSection()
    model: ModelSection
    stream: NamedComponent
    train: TrainSection = TrainSection()
    strategies: list[NamedComponent] = Field(default_factory=lambda: [NamedComponent(name="naive")])
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


# ------------------------------------------------------------------- loading
MAX_YAML_VALUES = 100_000  # values of a document once its aliases are expanded


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice (the second would silently win)."""

    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line}")
        self.key, self.line = key, line


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    Keys brought in by a merge (``<<: *defaults``) may be overridden, as YAML intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if duplicate:
                    raise DuplicateKeyError(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


def yaml_size(data: Any, limit: int = MAX_YAML_VALUES) -> int:
    """Number of values in ``data`` with aliases expanded; ``ValueError`` when an alias
    refers to itself or the expansion passes ``limit`` (a "billion laughs" document)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ValueError("an alias refers to the mapping or list that contains it")
        active.add(key)
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                raise ValueError(f"aliases expand it to more than {limit:,} values")
        active.discard(key)
        sizes[key] = total
        return total

    return size(data)


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` that also refuses duplicate keys and exploding aliases."""
    try:
        loader = StrictSafeLoader(text)  # a SafeLoader: no Python object tags
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits
        raise yaml.YAMLError(f"a value cannot be read ({str(exc).split(':')[0]})") from None
    try:
        yaml_size(data)
    except RecursionError:
        raise yaml.YAMLError("the document nests too deeply") from None
    except ValueError as exc:
        raise yaml.YAMLError(str(exc)) from None
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a safe loader; errors name the file (and the line)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError("", f"config file {p} does not exist")
    if p.is_dir():
        raise ConfigError("", f"config file {p} is a folder")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"config file {p} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError("", f"config file {p} cannot be read: {exc.strerror or exc}") from None
    try:
        data = load_yaml_text(text)
    except DuplicateKeyError as exc:
        raise ConfigError("", f"config file {p}: duplicate key {exc.key!r} at line {exc.line}") from None
    except RecursionError:
        raise ConfigError("", f"config file {p} is not valid YAML: it nests too deeply") from None
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
    for kind, comp, path in [(STREAMS, cfg.stream, "stream")] + [(STRATEGIES, c, f"strategies[{i}]") for i, c in enumerate(cfg.strategies)]:
        try:
            _validate_component(kind, comp, path, cfg)
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


def strategy_params(comp: NamedComponent) -> BaseModel:
    return STRATEGIES.get(comp.name).params(**comp.args)


def stream_params(comp: NamedComponent) -> BaseModel:
    return STREAMS.get(comp.name).params(**comp.args)
