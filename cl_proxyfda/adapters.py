"""Parameter-efficient adapters for open_clip towers: VeFA, LoRFA and the LoRA baseline.

Feature-space adapters (docs/methods.md section 5) transform the *input* of a frozen linear
map instead of adding a weight delta:

- **VeFA**  ``h = W (s * x) + b``, a trainable vector ``s`` (size d_in, init 1).
- **LoRFA** ``h = W (x + (alpha/r) B A x) + b``, ``A`` (r x d_in) random, ``B`` (d_in x r)
  zero, so the layer is unchanged at initialisation.
- **LoRA**  ``h = (W + (alpha/r) B A) x + b``, ``B`` (d_out x r) zero: the weight-side
  baseline.

Since ``W (s * x) = (W diag(s)) x`` and ``W (x + BAx) = W (I + BA) x``, each adapter is a
``torch.nn.utils.parametrize`` parametrisation of the weight tensor: the module keeps
reading ``weight`` (or the fused ``in_proj_weight`` of ``nn.MultiheadAttention``, which
``F.multi_head_attention_forward`` reads directly) and gets ``W_eff = W M`` (feature
side) or ``W + delta`` (LoRA). For the fused q/k/v projection, each third of the rows has
its own adapter. The effective weight of a feature-space adapter is ``W M``, so its
column space stays inside that of the pre-trained ``W``; LoRA's need not.

Cost: the effective weight is recomputed at every access of the tensor (no caching):
O(d_out d_in) for VeFA and O(d_out d_in r) for LoRFA/LoRA per adapted tensor and
forward, small next to the layer's own O(tokens d_out d_in) matmul at these sizes. Wrap
a forward in ``torch.nn.utils.parametrize.cached()`` to compute each weight once per
forward if it matters.

``merge_adapters`` folds the adapters into the weights and removes the
parametrisations, leaving an ordinary open_clip model whose ``state_dict`` loads into a
fresh ``open_clip.create_model`` of the same architecture. An injected model saves and
loads through ``state_dict`` too (into a model injected with the same config), and it
can be deep-copied (frozen teachers).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn
from torch.nn.utils import parametrize

from cl_proxyfda.errors import UserError

AdapterType = Literal["vefa", "lorfa", "lora"]
TargetName = Literal["q", "k", "v", "o", "fc1", "fc2"]
TowerName = Literal["image", "text"]

ALL_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "fc1", "fc2")
"""Adaptable linear maps of a transformer block: the three thirds of the fused attention
input projection (``attn.in_proj_weight``), the attention output projection
(``attn.out_proj``) and the MLP's ``c_fc`` (fc1) and ``c_proj`` (fc2)."""


class AdapterConfig(BaseModel):
    """Which adapter, where, and how large (``model.adapter`` in a run config).

    Args:
        type: ``vefa`` (input scale vector), ``lorfa`` (input-side low rank) or
            ``lora`` (weight-side low rank, the baseline).
        rank: r of LoRFA/LoRA (unused by VeFA).
        alpha: LoRFA/LoRA scaling numerator; the update is multiplied by alpha / rank.
            ``None`` means alpha = rank (scaling 1).
        targets: linear maps to adapt in every block (see ``ALL_TARGETS``).
        towers: ``image`` (default) and/or ``text``.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: AdapterType
    rank: int = Field(8, ge=1, le=65536)
    alpha: float | None = Field(None, gt=0)
    targets: list[TargetName] = Field(default_factory=lambda: list(ALL_TARGETS))
    towers: list[TowerName] = Field(default_factory=lambda: ["image"])

    @field_validator("targets", "towers")
    @classmethod
    def _non_empty_unique(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one entry")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate entries in {value}")
        return value

    @property
    def scaling(self) -> float:
        """alpha / rank (1 with the default alpha)."""
        return (self.alpha if self.alpha is not None else float(self.rank)) / self.rank


# --------------------------------------------------------------------- adapters
class VeFAScale(nn.Module):
    """``W -> W diag(s)``: scales the layer's input features; ``s`` starts at 1."""

    def __init__(self, d_in: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d_in, dtype=dtype, device=device))

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.scale


def _random_down(rank: int, d_in: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """``A`` (rank x d_in) with nn.Linear's default init (uniform, bound 1/sqrt(d_in))."""
    a = torch.empty(rank, d_in, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return nn.Parameter(a)


class LoRFAFactors(nn.Module):
    """``W -> W (I + scaling * B A)``: a low-rank transform of the input; ``B`` starts at 0."""

    def __init__(self, d_in: int, rank: int, scaling: float, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.scaling = scaling
        self.A = _random_down(rank, d_in, dtype, device)
        self.B = nn.Parameter(torch.zeros(d_in, rank, dtype=dtype, device=device))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.scaling * (weight @ self.B) @ self.A


class LoRADelta(nn.Module):
    """``W -> W + scaling * B A`` (LoRA); ``B`` (d_out x rank) starts at 0."""

    def __init__(self, d_out: int, d_in: int, rank: int, scaling: float, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.scaling = scaling
        self.A = _random_down(rank, d_in, dtype, device)
        self.B = nn.Parameter(torch.zeros(d_out, rank, dtype=dtype, device=device))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.scaling * self.B @ self.A


class WeightAdapter(nn.Module):
    """Parametrisation of one weight tensor: one adapter per block of rows.

    ``rows`` maps a target name to its ``(start, stop)`` rows of the weight (the whole
    weight for an ordinary linear layer, one third each for q/k/v of a fused in_proj);
    rows of no target pass through unchanged.
    """

    def __init__(self, rows: dict[str, tuple[int, int]], adapters: dict[str, nn.Module]) -> None:
        super().__init__()
        self.rows = dict(sorted(rows.items(), key=lambda item: item[1][0]))
        self.adapters = nn.ModuleDict(adapters)

    def forward(self, weight: Tensor) -> Tensor:
        pieces: list[Tensor] = []
        cursor = 0
        for name, (start, stop) in self.rows.items():
            if start > cursor:
                pieces.append(weight[cursor:start])
            pieces.append(self.adapters[name](weight[start:stop]))
            cursor = stop
        if cursor < weight.shape[0]:
            pieces.append(weight[cursor:])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def _make_adapter(cfg: AdapterConfig, d_out: int, d_in: int, like: Tensor) -> nn.Module:
    kw = {"dtype": like.dtype, "device": like.device}
    if cfg.type == "vefa":
        return VeFAScale(d_in, **kw)
    if cfg.type == "lorfa":
        return LoRFAFactors(d_in, cfg.rank, cfg.scaling, **kw)
    return LoRADelta(d_out, d_in, cfg.rank, cfg.scaling, **kw)


# -------------------------------------------------------------- model plumbing
def _clip_of(model: nn.Module) -> nn.Module:
    """The open_clip model itself, also when given a ``CLIPTaskModel`` (``.clip``)."""
    inner = getattr(model, "clip", None)
    return inner if isinstance(inner, nn.Module) else model


def _tower_blocks(clip: nn.Module, tower: str) -> nn.ModuleList:
    if tower == "image":
        transformer = getattr(getattr(clip, "visual", None), "transformer", None)
    else:  # CLIP keeps the text transformer at the top, CustomTextCLIP under .text
        transformer = getattr(clip, "transformer", None)
        if transformer is None:
            transformer = getattr(getattr(clip, "text", None), "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise UserError(f"model.adapter: the {tower} tower has no open_clip transformer blocks (transformer.resblocks) to adapt")
    return blocks


def _block_tensors(block: nn.Module, targets: list[str], where: str) -> list[tuple[nn.Module, str, dict[str, tuple[int, int]]]]:
    """(module, tensor name, rows per target) of every tensor to parametrise in a block."""
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
        raise UserError(f"model.adapter: {where}.attn must be nn.MultiheadAttention with a fused in_proj_weight, got {type(attn).__name__}")
    if not (isinstance(getattr(mlp, "c_fc", None), nn.Linear) and isinstance(getattr(mlp, "c_proj", None), nn.Linear)):
        raise UserError(f"model.adapter: {where}.mlp must have nn.Linear c_fc and c_proj")
    d = attn.embed_dim
    thirds = {"q": (0, d), "k": (d, 2 * d), "v": (2 * d, 3 * d)}
    found: list[tuple[nn.Module, str, dict[str, tuple[int, int]]]] = []
    qkv = {t: thirds[t] for t in ("q", "k", "v") if t in targets}
    if qkv:
        found.append((attn, "in_proj_weight", qkv))
    for target, module in (("o", attn.out_proj), ("fc1", mlp.c_fc), ("fc2", mlp.c_proj)):
        if target in targets:
            found.append((module, "weight", {target: (0, module.weight.shape[0])}))
    return found


def _adapted_tensors(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, tensor name) of every tensor carrying a ``WeightAdapter``."""
    found = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            if any(isinstance(p, WeightAdapter) for p in plist):
                found.append((module, name))
    return found


def has_adapters(model: nn.Module) -> bool:
    """Whether adapters are injected anywhere in ``model``."""
    return bool(_adapted_tensors(model))


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter parameter of ``model`` (trainable or not), in module order."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, WeightAdapter):
            params.extend(module.parameters())
    return params


def adapter_parameter_count(model: nn.Module) -> int:
    """Number of adapter weights in ``model`` (0 without adapters)."""
    return sum(p.numel() for p in adapter_parameters(model))


def freeze_all_but_adapters(model: nn.Module) -> list[nn.Parameter]:
    """Set ``requires_grad`` on the adapter parameters only; returns them."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = adapter_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> list[nn.Parameter]:
    """Add ``cfg``'s adapters to an open_clip model and freeze everything else.

    ``model`` is an open_clip ``CLIP``/``CustomTextCLIP`` with ViT towers, or a
    ``CLIPTaskModel`` (its ``.clip`` is adapted; all its parameters are frozen). Random
    factors are drawn from torch's global generator (seed it for reproducibility).
    Returns the trainable adapter parameters, e.g. for the optimizer.
    """
    clip = _clip_of(model)
    if has_adapters(clip):
        raise UserError("model.adapter: the model already has adapters; merge_adapters first")
    plan = []
    for tower in cfg.towers:
        for i, block in enumerate(_tower_blocks(clip, tower)):
            plan.extend(_block_tensors(block, list(cfg.targets), f"{tower} block {i}"))
    for p in model.parameters():
        p.requires_grad_(False)
    for module, tensor_name, rows in plan:
        weight = getattr(module, tensor_name)
        adapters = {t: _make_adapter(cfg, stop - start, weight.shape[1], weight) for t, (start, stop) in rows.items()}
        parametrize.register_parametrization(module, tensor_name, WeightAdapter(rows, adapters))
    return freeze_all_but_adapters(model)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and remove the parametrisations (in place).

    Afterwards the modules are plain open_clip modules again (their original classes),
    the parameters keep their identity (an optimizer's references stay valid) and their
    ``requires_grad`` flags (frozen after ``inject_adapters``). Returns ``model``.
    """
    for module, tensor_name in _adapted_tensors(model):
        plist = module.parametrizations[tensor_name]
        if len(plist) != 1:
            raise UserError(f"model.adapter: {type(module).__name__}.{tensor_name} carries other parametrisations besides the adapter; cannot merge")
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return model
