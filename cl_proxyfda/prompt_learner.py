"""Few-shot prompt tuning (CoOp): learnable context vectors in a frozen CLIP text tower.

The hand-written prompt "a photo of a {class}." is replaced by ``[SOT] ctx_1 .. ctx_n
{class tokens} . [EOT] <padding>``, where ``ctx_1..ctx_n`` are learned word embeddings
(Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022). Both
encoders stay frozen; only the context trains. The token sequence goes through the
model's own text tower exactly as ``open_clip``'s ``encode_text`` does (positional
embedding, transformer with the causal ``attn_mask``, ``ln_final``, pooling at the EOT
position, ``text_projection``), so a context initialised to the word embeddings of a
phrase reproduces ``encode_text("<phrase> <class>.")``.

Options (``PromptLearnerConfig``, YAML ``model.prompt_learner: {...}``):

- ``n_ctx`` (default 16): number of context vectors. With a phrase ``init`` the phrase's
  token count replaces it (as CoOp does).
- ``class_specific`` (default false): one context shared by every class of every task
  (unified context, what CoOp's base-to-new and the continual stream use), or one
  context per class (CoOp's CSC variant; such a context exists only for the classes it
  was built with, so it cannot prompt unseen class names).
- ``init`` (default ``"random"``): ``random`` draws the context from N(0, 0.02^2);
  any other string is a phrase whose token embeddings initialise the context.

The learner's class embeddings are cached while the context is unchanged (the cache
key holds each context tensor's storage pointer and version counter, which every
in-place optimizer step or ``load_state_dict`` bumps); with gradients enabled and a
trainable context they are recomputed with gradients at every call.

Wiring into ``CLIPTaskModel``: ``attach_prompt_learner(task_model, learner)`` registers
the learner as ``task_model.prompt_learner`` (its context is then the model's only
trainable parameter and part of its ``state_dict``), freezes every CLIP weight, and the
model's ``class_embeddings(task_id)`` returns ``prompt_learner.class_embeddings(task_id)``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from cl_proxyfda.errors import UserError

PLACEHOLDER = "X"  # the word that marks context positions in the tokenised prompt
INIT_STD = 0.02


class PromptLearnerConfig(BaseModel):
    """``model.prompt_learner``: learnable prompt context (CoOp)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    n_ctx: int = Field(16, ge=1, le=1024, description="context vectors per prompt (a phrase init sets it to the phrase's token count)")
    class_specific: bool = Field(False, description="one context per class (CSC) instead of one shared context")
    init: str = Field("random", description="'random' (N(0, 0.02^2)) or a phrase such as 'a photo of a'")

    @field_validator("init")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("init must be 'random' or a non-empty phrase")
        return value.strip()


def _text_tower(clip: nn.Module) -> nn.Module:
    """The module holding the open_clip text tower's parts (``CLIP`` itself, or ``.text``)."""
    tower = clip if hasattr(clip, "token_embedding") else getattr(clip, "text", None)
    if tower is None or not hasattr(tower, "token_embedding") or not hasattr(tower, "positional_embedding"):
        raise UserError("model.prompt_learner: needs an open_clip text tower with token embeddings (not a Hugging Face text model)")
    if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
        raise UserError("model.prompt_learner: text towers with a class token or a padding mask (CoCa-style) are not supported")
    return tower


class PromptLearner(nn.Module):
    """Learnable prompt context for the class names of every task.

    Args:
        clip: an open_clip ``CLIP`` (or ``CustomTextCLIP`` with an open_clip text tower);
            it is used, not owned: it is not registered as a sub-module.
        tokenizer: the model's open_clip tokenizer (callable: list of str -> (N, L) ids).
        classnames_per_task: the class names of each task, indexed by task id.
        n_ctx: number of context vectors (replaced by the phrase length for a phrase init).
        class_specific: one context per class instead of one shared context.
        init: ``"random"`` or an initialisation phrase.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        classnames_per_task: Sequence[Sequence[str]],
        n_ctx: int = 16,
        class_specific: bool = False,
        init: str = "random",
    ) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
        object.__setattr__(self, "_clip", clip)  # a reference, not a sub-module
        self.tokenizer = tokenizer
        self.classnames_per_task = [list(names) for names in classnames_per_task]
        self.class_specific = class_specific
        self.init = init
        tower = _text_tower(clip)
        width = tower.token_embedding.weight.shape[1]
        device = tower.token_embedding.weight.device
        if init == "random":
            first = torch.empty(n_ctx, width).normal_(std=INIT_STD)
        else:
            first = self._phrase_embedding(init)
            n_ctx = first.shape[0]
        self.n_ctx = n_ctx
        self.width = width
        if class_specific:
            contexts = []
            for names in self.classnames_per_task:
                if init == "random":
                    contexts.append(torch.empty(len(names), n_ctx, width).normal_(std=INIT_STD))
                else:
                    contexts.append(first.unsqueeze(0).repeat(len(names), 1, 1))
            self.ctx_per_task = nn.ParameterList([nn.Parameter(c.to(device)) for c in contexts])
        else:
            self.ctx = nn.Parameter(first.to(device))
        for t, names in enumerate(self.classnames_per_task):
            self.register_buffer(f"tokens_{t}", self.tokenize(names, where=f"task {t}").to(device), persistent=False)
        self._cache: dict[int, Tensor] = {}
        self._cache_key: Any = None
        self.last_trained: dict[int, Tensor] = {}  # embeddings of the last call with gradients

    # ------------------------------------------------------------------ set-up
    @property
    def clip(self) -> nn.Module:
        return self._clip

    @property
    def num_tasks(self) -> int:
        return len(self.classnames_per_task)

    def _phrase_embedding(self, phrase: str) -> Tensor:
        tower = _text_tower(self.clip)
        tokens = self.tokenizer([phrase])[0]
        n = int(self._eot_positions(tokens.unsqueeze(0))[0]) - 1
        if n < 1:
            raise UserError(f"model.prompt_learner.init: phrase {phrase!r} has no tokens")
        ids = tokens[1 : 1 + n].to(tower.token_embedding.weight.device)
        with torch.no_grad():
            return tower.token_embedding(ids).detach().float().cpu().clone()

    def _eot_positions(self, tokens: Tensor) -> Tensor:
        """Index of the pooled (EOT) token of each tokenised prompt, as open_clip pools."""
        tower = _text_tower(self.clip)
        pool = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
        eos = getattr(tower, "text_eos_id", None) if hasattr(tower, "text_eos_id") else getattr(tower, "eos_id", None)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens).float().unsqueeze(-1)
        return text_global_pool(positions, tokens, pool, eos_token_id=eos).squeeze(-1).long()

    def tokenize(self, names: Sequence[str], where: str = "") -> Tensor:
        """Token ids of ``"X X .. X {name}."`` (n_ctx placeholders) for each name.

        Raises ``UserError`` when a prompt does not fit the text context length.
        """
        names = list(names)
        if not names:
            raise UserError(f"model.prompt_learner: {where or 'a task'} has no class names")
        placeholder = " ".join([PLACEHOLDER] * self.n_ctx)
        tokens = self.tokenizer([f"{placeholder} {name}." for name in names])
        name_tokens = self.tokenizer([f"{name}." for name in names])
        length = tokens.shape[1]
        eot_full = self._eot_positions(tokens)
        eot_name = self._eot_positions(name_tokens)
        for i, name in enumerate(names):
            if int(eot_name[i]) - 1 + self.n_ctx + 2 > length or int(eot_full[i]) != int(eot_name[i]) + self.n_ctx:
                raise UserError(
                    f"model.prompt_learner: the prompt for class {name!r} ({where}) needs "
                    f"{int(eot_name[i]) + 1 + self.n_ctx} tokens with n_ctx = {self.n_ctx}, the text context holds {length}"
                )
        placeholder_id = self.tokenizer([PLACEHOLDER])[0, 1]
        if not bool((tokens[:, 1 : 1 + self.n_ctx] == placeholder_id).all()):
            raise UserError("model.prompt_learner: the tokenizer does not keep the context placeholders as single tokens")
        return tokens

    def context(self, task_id: int) -> Tensor:
        """The context of every class of a task, (C, n_ctx, width)."""
        n_classes = len(self.classnames_per_task[task_id])
        if self.class_specific:
            return self.ctx_per_task[task_id]
        return self.ctx.unsqueeze(0).expand(n_classes, -1, -1)

    # ----------------------------------------------------------------- encoding
    def encode(self, tokens: Tensor, ctx: Tensor) -> Tensor:
        """Normalised text features of placeholder prompts with the given context.

        ``tokens``: (N, L) ids from :meth:`tokenize`; ``ctx``: (N, n_ctx, width).
        """
        tower = _text_tower(self.clip)
        cast = tower.transformer.get_cast_dtype() if hasattr(tower.transformer, "get_cast_dtype") else ctx.dtype
        with torch.no_grad():
            embedded = tower.token_embedding(tokens).to(cast)
        x = torch.cat([embedded[:, :1], ctx.to(cast), embedded[:, 1 + self.n_ctx :]], dim=1)
        x = x + tower.positional_embedding[: x.shape[1]].to(cast)
        x = tower.transformer(x, attn_mask=tower.attn_mask)
        x = tower.ln_final(x)
        pool = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
        eos = getattr(tower, "text_eos_id", None) if hasattr(tower, "text_eos_id") else getattr(tower, "eos_id", None)
        x = text_global_pool(x, tokens, pool, eos_token_id=eos)
        proj = tower.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)

    def _compute(self, task_id: int) -> Tensor:
        tokens = getattr(self, f"tokens_{task_id}")
        return self.encode(tokens, self.context(task_id))

    def _version_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters())

    def class_embeddings(self, task_id: int) -> Tensor:
        """Normalised class embeddings (C, D) of a task with the learned context."""
        if task_id < 0 or task_id >= self.num_tasks:
            raise IndexError(f"task label {task_id} has no prompt vocabulary ({self.num_tasks} tasks known)")
        trainable = any(p.requires_grad for p in self.parameters())
        if trainable and torch.is_grad_enabled():
            out = self._compute(task_id)
            self.last_trained = {task_id: out}
            return out
        key = self._version_key()
        if key != self._cache_key:
            self._cache = {}
            self._cache_key = key
        if task_id not in self._cache:
            with torch.no_grad():
                self._cache[task_id] = self._compute(task_id)
        return self._cache[task_id]

    def encode_names(self, names: Sequence[str]) -> Tensor:
        """Normalised embeddings of any class names with the shared context (with gradients)."""
        if self.class_specific:
            raise UserError("model.prompt_learner: a class-specific context cannot prompt class names it was not built with")
        device = self.ctx.device
        tokens = self.tokenize(names).to(device)
        return self.encode(tokens, self.ctx.unsqueeze(0).expand(len(tokens), -1, -1))

    def __getstate__(self) -> dict[str, Any]:
        # Copies (frozen teachers) start with an empty cache and never carry autograd graphs.
        state = self.__dict__.copy()
        state["_cache"], state["_cache_key"], state["last_trained"] = {}, None, {}
        return state


def build_prompt_learner(task_model: nn.Module, config: PromptLearnerConfig) -> PromptLearner:
    """A prompt learner for every task vocabulary of a ``CLIPTaskModel`` (control set included)."""
    return PromptLearner(
        task_model.clip,
        task_model.tokenizer,
        [vocab.classnames for vocab in task_model.tasks],
        n_ctx=config.n_ctx,
        class_specific=config.class_specific,
        init=config.init,
    )


def attach_prompt_learner(task_model: nn.Module, learner: PromptLearner | PromptLearnerConfig) -> PromptLearner:
    """Make ``task_model`` classify with learned prompts; freezes every CLIP weight.

    Registers the learner as ``task_model.prompt_learner`` (its context becomes the only
    trainable parameter and is saved with the model's ``state_dict``). The model's
    ``class_embeddings`` consults that attribute. Call it before the run takes its
    initial state (the pre-trained teacher copies the model, learner included).
    """
    if isinstance(learner, PromptLearnerConfig):
        learner = build_prompt_learner(task_model, learner)
    if learner.clip is not task_model.clip:
        raise ValueError("the prompt learner was built on another CLIP model")
    vocab = [list(v.classnames) for v in task_model.tasks]
    if vocab != learner.classnames_per_task:
        raise ValueError(f"the prompt learner's vocabularies ({learner.num_tasks} tasks) differ from the model's ({len(vocab)} tasks)")
    for p in task_model.clip.parameters():
        p.requires_grad_(False)
    task_model.train_towers = set()
    task_model.prompt_learner = learner.to(next(task_model.clip.parameters()).device)
    task_model.text_changed()
    return learner


def prompt_learner_of(model: nn.Module) -> PromptLearner:
    """The prompt learner attached to a (possibly DDP-wrapped) task model, or ``UserError``."""
    net = getattr(model, "module", model)
    learner = getattr(net, "prompt_learner", None)
    if not isinstance(learner, PromptLearner):
        raise UserError("this strategy needs a prompt learner: set model.prompt_learner in the config (e.g. {n_ctx: 16})")
    return learner
