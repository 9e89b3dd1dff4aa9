"""The CLIP wrapper: open_clip model + zero-shot text heads per task.

``CLIPTaskModel`` is an Avalanche ``MultiTaskModule``: the task label of a batch picks
the class vocabulary, and the logits are ``exp(logit_scale) * cos(image, class)`` over
that task's classes.

Reading features (the one way; nothing outside this module touches the private state):

- ``model.capture_layers(names)``: record named image-tower features (``ln_pre``,
  ``block{i}``) in every later pass; ``model.captured_layers`` lists them.
- ``model.last_features()``: ``{"image_embeds", "layers", "task"}`` of the last task
  forward ``model(x, task_labels)``, with their graph (no second forward). Only a task
  forward replaces them: ``encode_image``/``encode_text`` on other inputs never do.
- ``with model.side_forward(): ...``: extra forwards on other data (synthetic or
  reference images; a task forward included) leave ``last_features()`` as it was.
- ``model.image_features(x)``: ``{"image_embeds", "layers"}`` of one image-tower pass
  over ``x`` (a frozen teacher's features), without replacing ``last_features()``.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import open_clip
import torch
import torch.nn.functional as F
from avalanche.models import MultiTaskModule
from torch import Tensor, nn

from cl_proxyfda.errors import UserError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
ASSET_DIR = Path(__file__).parent / "assets"

# Shipped checkpoints addressable by a short tag: ``pretrained: demo``.
SHIPPED_WEIGHTS = {"demo": ASSET_DIR / "demo_clip.safetensors"}

_registered = False


def register_model_configs() -> None:
    """Register the package's own small open_clip configs (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def list_model_names() -> list[str]:
    """Every open_clip architecture name, the package's tiny configs included."""
    register_model_configs()
    return open_clip.list_models()


def resolve_pretrained(pretrained: str | None) -> str | None:
    """Map a ``model.pretrained`` value to what open_clip takes.

    ``None``/``"none"`` gives random weights, a shipped tag (``demo``) the package's
    asset, an existing file path a local checkpoint, anything else an open_clip tag
    (downloaded on the user's machine, cached by open_clip).
    """
    if pretrained in (None, "", "none", "random"):
        return None
    if pretrained in SHIPPED_WEIGHTS:
        path = SHIPPED_WEIGHTS[pretrained]
        if not path.is_file():
            raise UserError(f"model.pretrained: shipped weights {path} are missing; run `cl-proxyfda pretrain-demo`")
        return str(path)
    return os.path.expanduser(pretrained)


def _is_file(path: str) -> bool:
    """``Path(path).is_file()``, False for paths the OS refuses (too long, bad bytes)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def create_clip(name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> tuple[nn.Module, Callable, Callable, Callable]:
    """Create an open_clip model with its train/eval transforms and tokenizer.

    ``name`` is an open_clip architecture (the package's tiny configs included) or a
    ``hf-hub:org/repo`` model. Hub weights are fetched first (or found in the cache) so
    that a failed download is one line naming the repository and file; a tag trained
    with QuickGELU (OpenAI's) builds the model with QuickGELU, as the weights need.
    """
    register_model_configs()
    from cl_proxyfda.hub import HF_HUB_PREFIX, fetch, open_clip_files, quiet_library_logs

    if not name.startswith(HF_HUB_PREFIX) and name not in open_clip.list_models():
        raise UserError(f"model.name: unknown open_clip model {name!r} (see `cl-proxyfda list`)")
    weights = resolve_pretrained(pretrained)
    tag_cfg = open_clip.get_pretrained_cfg(name, weights) if weights else {}
    if name.startswith(HF_HUB_PREFIX) and weights is not None:
        raise UserError(f"model.pretrained: a hf-hub: model brings its own weights; set pretrained to none (got {pretrained!r})")
    if weights is not None and not tag_cfg and not _is_file(weights):
        if os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise UserError(f"model.pretrained: checkpoint file {weights} does not exist")
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise UserError(f"model.pretrained: {weights!r} is neither a weights tag of {name} (tags: {tags}) nor a file")
    fetch(open_clip_files(name, weights))
    try:
        with quiet_library_logs():
            model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
                name, pretrained=weights, device=device, force_quick_gelu=bool(tag_cfg.get("quick_gelu", False))
            )
    except RuntimeError as exc:  # shape mismatches from a checkpoint of another model
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"model.pretrained: {weights} does not fit model {name}: {first}") from None
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess_train, preprocess_eval, tokenizer


def model_transforms(model: nn.Module) -> tuple[Callable, Callable]:
    """The train and eval transforms of the task model's CLIP, rebuilt from its image
    tower's preprocess config as open_clip builds them."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    clip = getattr(model, "clip", model)
    cfg = getattr(clip.visual, "preprocess_cfg", None)
    if cfg is None:
        raise UserError("model: the image tower has no preprocess_cfg to build its eval transform from")
    preprocess = PreprocessCfg(**cfg)
    return image_transform_v2(preprocess, is_train=True), image_transform_v2(preprocess, is_train=False)


def eval_transform(model: nn.Module) -> Callable:
    """The eval transform of the task model's CLIP (:func:`model_transforms`)."""
    return model_transforms(model)[1]


@dataclass
class TaskVocabulary:
    """Class names and prompt templates of one task (the task id indexes a list of these)."""

    name: str
    classnames: list[str]
    templates: list[str]

    def prompts(self) -> list[list[str]]:
        return [[t.format(c) for t in self.templates] for c in self.classnames]

    def training_prompts(self, mode: str = "first") -> list[list[str]]:
        """Prompts of the training heads: the first template only, or the ensemble."""
        if mode == "ensemble":
            return self.prompts()
        return [[self.templates[0].format(c)] for c in self.classnames]


TEXT_TEMPLATE_MODES = ("first", "ensemble")


@dataclass
class _TextCache:
    version: int = -1
    heads: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    union: dict[Any, Tensor] = field(default_factory=dict)  # task-agnostic heads (cl_proxyfda.union)


class _FeatureSink(dict):
    """Where capture hooks write during any image-tower pass; a deep copy (a frozen
    teacher) gets its own empty sink. A task forward keeps a snapshot of it."""

    def __deepcopy__(self, memo: dict) -> "_FeatureSink":
        return _FeatureSink()


def _capture_hook(module: nn.Module, _inputs: Any, output: Any) -> None:
    out = output[0] if isinstance(output, tuple) else output
    module._cl_sink[module._cl_capture_name] = out[:, 0] if out.ndim == 3 else out


def _block_list(clip: nn.Module) -> Sequence[nn.Module]:
    visual = clip.visual
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        return visual.transformer.resblocks
    raise UserError("model: named-layer features need a ViT image tower with transformer.resblocks")


class CLIPTaskModel(MultiTaskModule):
    """open_clip CLIP with zero-shot text heads per task, usable as an Avalanche model.

    Args:
        clip: an open_clip ``CLIP``/``CustomTextCLIP`` model.
        tokenizer: the matching open_clip tokenizer.
        tasks: the vocabulary of every task, indexed by task label.
        train_towers: which towers receive gradients: ``image``, ``text`` or both.
        freeze_logit_scale: keep the temperature fixed (the usual choice).
        text_templates: prompts of the training heads: ``first`` (the task's first
            template, one prompt per class, as ZSCL's and GIFT's code train) or
            ``ensemble`` (every template). Evaluation always uses the ensemble.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Callable,
        tasks: Sequence[TaskVocabulary] = (),
        train_towers: Iterable[str] = ("image",),
        freeze_logit_scale: bool = True,
        text_templates: str = "first",
    ) -> None:
        super().__init__()
        if text_templates not in TEXT_TEMPLATE_MODES:
            raise UserError(f"train.text_templates: must be first or ensemble (got {text_templates!r})")
        self.text_templates = text_templates
        self.clip = clip
        self.tokenizer = tokenizer
        self.tasks: list[TaskVocabulary] = list(tasks)
        self.train_towers = set(train_towers)
        self._cache = _TextCache()
        self._text_version = 0
        self._hooks: list[Any] = []
        self._layer_names: list[str] = []
        self._sink = _FeatureSink()
        self._last: dict[str, Any] = {}  # features of the last task forward (last_features)
        self.text_encode_calls = 0  # how often class heads were computed (tests, bench)
        self.prompts_encoded = 0  # how many prompts went through the text tower (tests, bench)
        self.head_prompts_encoded = 0  # of those, how many for class heads
        self.prompt_learner: nn.Module | None = None  # CoOp context (cl_proxyfda.prompt_learner)
        self.set_trainable(self.train_towers, freeze_logit_scale)

    # ------------------------------------------------------------------ set-up
    def set_trainable(self, towers: Iterable[str], freeze_logit_scale: bool = True) -> None:
        """Enable gradients for the chosen towers only."""
        towers = set(towers)
        unknown = towers - {"image", "text"}
        if unknown:
            raise UserError(f"model.train_towers: unknown tower(s) {sorted(unknown)} (use image, text)")
        self.train_towers = towers
        if self.prompt_learner is not None:  # prompt tuning: the context is the only trainable tensor
            self.clip.requires_grad_(False)
            self.train_towers = set()
            self.text_changed()
            return
        from cl_proxyfda.adapters import freeze_all_but_adapters, has_adapters

        if has_adapters(self.clip):  # adapters are the only trainable parameters
            freeze_all_but_adapters(self.clip)
            self.text_changed()
            return
        for pname, p in self.clip.named_parameters():
            if pname == "logit_scale" or pname == "logit_bias":
                p.requires_grad_(not freeze_logit_scale)
            elif pname.startswith("visual."):
                p.requires_grad_("image" in towers)
            else:
                p.requires_grad_("text" in towers)
        self.text_changed()

    def set_tasks(self, tasks: Sequence[TaskVocabulary]) -> None:
        self.tasks = list(tasks)
        self.text_changed()

    @property
    def text_trainable(self) -> bool:
        return "text" in self.train_towers

    @property
    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.exp()

    def text_changed(self) -> None:
        """Invalidate cached class heads (call after the text tower's weights change)."""
        self._text_version += 1

    # ---------------------------------------------------------------- features
    @property
    def captured_layers(self) -> tuple[str, ...]:
        """Names of the image-tower layers recorded in every pass (:meth:`capture_layers`)."""
        return tuple(self._layer_names)

    def capture_layers(self, names: Iterable[str]) -> None:
        """Record named image-tower features in every later pass (``layers`` of
        :meth:`last_features` and :meth:`image_features`); names already recorded stay.

        Names: ``ln_pre`` (after the pre-norm), ``block{i}`` (output of block i, 1-based).
        The class token of each is kept, L2-normalised by the consumer if wanted.
        """
        names = list(dict.fromkeys(list(self._layer_names) + list(names)))
        if names == self._layer_names:
            return  # nothing new to record
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._layer_names = names
        blocks = _block_list(self.clip)
        for lname in names:
            if lname == "ln_pre":
                module = self.clip.visual.ln_pre
            elif lname.startswith("block") and lname[5:].isdigit() and 1 <= int(lname[5:]) <= len(blocks):
                module = blocks[int(lname[5:]) - 1]
            else:
                raise UserError(f"unknown feature layer {lname!r} (use ln_pre or block1..block{len(blocks)})")
            module._cl_sink = self._sink
            module._cl_capture_name = lname
            self._hooks.append(module.register_forward_hook(_capture_hook))

    def __getstate__(self) -> dict[str, Any]:
        # Copies (frozen teachers, LwF's previous model) never carry the autograd graph
        # of the last forward.
        state = self.__dict__.copy()
        state["_last"] = {}
        return state

    def last_features(self) -> dict[str, Any]:
        """Features of the last task forward ``model(x, task_labels)``, with their graph:
        ``image_embeds`` (B, D, L2-normalised), ``layers`` (name -> (B, D) class token of
        each captured layer) and ``task`` (the task label, single-task batches).

        Empty before the first forward. Forwards inside :meth:`side_forward`, and passes
        that are not task forwards (``encode_image``, :meth:`image_features`), leave them.
        """
        if not self._last:
            return {}
        return {**self._last, "layers": dict(self._last.get("layers", {}))}

    @contextlib.contextmanager
    def side_forward(self) -> Iterator[None]:
        """Extra forwards of this model on other data (synthetic or reference images,
        another task's batch) that must not replace :meth:`last_features`; nestable."""
        saved = self._last
        try:
            yield
        finally:
            self._last = saved

    def image_features(self, x: Tensor, normalize: bool = True) -> dict[str, Any]:
        """One image-tower pass over ``x``: ``image_embeds`` and the captured ``layers`` of
        that pass (how a frozen teacher's features are read); :meth:`last_features` is
        kept."""
        self._sink.clear()
        embeds = self.encode_image(x, normalize)
        return {"image_embeds": embeds, "layers": dict(self._sink)}

    def adaptation(self, experience: Any) -> None:
        """Avalanche's hook: remember trained task labels (heads come from text)."""
        if self.training:
            self.known_train_tasks_labels = self.known_train_tasks_labels.union(set(experience.task_labels))

    def encode_image(self, x: Tensor, normalize: bool = True) -> Tensor:
        feats = self.clip.encode_image(x)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> Tensor:
        device = self.clip.logit_scale.device
        texts = list(texts)
        tokens = self.tokenizer(texts).to(device)
        self.prompts_encoded += len(texts)
        feats = self.clip.encode_text(tokens)
        return F.normalize(feats, dim=-1) if normalize else feats

    def _compute_head(self, task_id: int, mode: str = "ensemble") -> Tensor:
        vocab = self.tasks[task_id]
        prompts = vocab.training_prompts(mode)
        flat = [p for group in prompts for p in group]
        emb = self.encode_text(flat).view(len(prompts), len(prompts[0]), -1)
        self.text_encode_calls += 1
        self.head_prompts_encoded += len(flat)
        return F.normalize(emb.mean(dim=1), dim=-1)

    def class_embeddings(self, task_id: int) -> Tensor:
        """Normalised class embeddings of a task.

        In training mode with gradients enabled the heads come from the training
        prompts (``text_templates``: the first template, or the ensemble), recomputed
        with gradients at every call when the text tower trains. Otherwise (evaluation,
        ``no_grad``) the template ensemble. Heads without gradients are cached while
        the text tower is unchanged.
        """
        if task_id < 0 or task_id >= len(self.tasks):
            raise IndexError(f"task label {task_id} has no vocabulary ({len(self.tasks)} tasks known)")
        if self.prompt_learner is not None:  # learned prompts (cached by the learner itself)
            return self.prompt_learner.class_embeddings(task_id)
        training = self.training and torch.is_grad_enabled()
        mode = self.text_templates if training else "ensemble"
        if training and self.text_trainable:
            return self._compute_head(task_id, mode)
        if len(self.tasks[task_id].templates) == 1:
            mode = "ensemble"  # one template: the same head either way
        if self._cache.version != self._text_version:
            self._cache = _TextCache(version=self._text_version)
        head = self._cache.heads.get((task_id, mode))
        if head is None:
            with torch.no_grad():
                head = self._compute_head(task_id, mode)
            self._cache.heads[(task_id, mode)] = head
        return head

    def union_embeddings(self, union: Any, templates: str = "task") -> Tensor:
        """Normalised embeddings of the classes of a ``cl_proxyfda.union.UnionVocabulary``.

        ``task``: each class's row of the head of the first task naming it (its template
        ensemble, or the learned prompts). ``single``: one ``"a photo of a {}."`` prompt
        per class (RAIL's union head). Cached while the text tower is unchanged.
        """
        from cl_proxyfda.union import SINGLE_TEMPLATE, union_head_from_task_heads

        if templates not in ("task", "single"):
            raise ValueError(f"unknown union templates {templates!r} (use task, single)")
        if self._cache.version != self._text_version:
            self._cache = _TextCache(version=self._text_version)
        key = (templates, union.classnames, union.source)
        head = self._cache.union.get(key)
        if head is not None and self.prompt_learner is None:
            return head
        with torch.no_grad():
            if templates == "task":
                tasks = sorted({t for t, _ in union.source})
                head = union_head_from_task_heads(union, {t: self.class_embeddings(t) for t in tasks})
            else:
                head = self.encode_text([SINGLE_TEMPLATE.format(c) for c in union.classnames])
                self.text_encode_calls += 1
        self._cache.union[key] = head
        return head

    # ----------------------------------------------------------------- forward
    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        self._sink.clear()
        image = self.encode_image(x)
        self._last = {"image_embeds": image, "task": int(task_label), "layers": dict(self._sink)}
        return self.logit_scale * image @ self.class_embeddings(int(task_label)).t()

    def forward_all_tasks(self, x: Tensor) -> dict[int, Tensor]:
        """Logits for every trained task (Avalanche's LwF); keeps ``last_features()``."""
        with self.side_forward():
            return {t: self.forward_single_task(x, t) for t in sorted(self.known_train_tasks_labels)}

    def forward(self, x: Tensor, task_labels: Tensor | int | None = None) -> Tensor:  # type: ignore[override]
        if task_labels is None:
            return self.forward_all_tasks(x)  # type: ignore[return-value]
        if isinstance(task_labels, int):
            return self.forward_single_task(x, task_labels)
        unique = torch.unique(task_labels)
        if len(unique) == 1:
            return self.forward_single_task(x, int(unique.item()))
        # Mixed-task batch: per-task logits padded to the widest head with -inf; the
        # features of each task's rows go back to their places.
        width = max(len(self.tasks[int(t)].classnames) for t in unique)
        out = x.new_full((x.shape[0], width), float("-inf"))
        embeds: Tensor | None = None
        layers: dict[str, Tensor] = {}
        for t in unique:
            mask = task_labels == t
            logits = self.forward_single_task(x[mask], int(t.item()))
            out[mask, : logits.shape[1]] = logits
            if embeds is None:
                embeds = x.new_zeros((x.shape[0], self._last["image_embeds"].shape[1]))
            embeds[mask] = self._last["image_embeds"]
            for name, value in self._last["layers"].items():
                if name not in layers:
                    layers[name] = value.new_zeros((x.shape[0], *value.shape[1:]))
                layers[name][mask] = value
        self._last = {"image_embeds": embeds, "layers": layers}
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_task_model(
    name: str,
    pretrained: str | None,
    tasks: Sequence[TaskVocabulary] = (),
    train_towers: Iterable[str] = ("image",),
    freeze_logit_scale: bool = True,
    device: str | torch.device = "cpu",
    text_templates: str = "first",
) -> tuple[CLIPTaskModel, Callable, Callable]:
    """Create the task model and its train/eval transforms in one call."""
    clip, pre_train, pre_eval, tokenizer = create_clip(name, pretrained, device=device)
    model = CLIPTaskModel(clip, tokenizer, tasks, train_towers, freeze_logit_scale, text_templates)
    return model, pre_train, pre_eval
