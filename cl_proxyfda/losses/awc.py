"""Adaptive weight consolidation (AWC, docs/methods.md section 3), as pure functions.

An importance-weighted L2 pull towards the anchor ``theta_prev`` (the parameters at the
start of the experience)::

    F_n   = g_n^2 / (mean(g_n^2) + eps)          per parameter tensor n, detached
    L_AWC = lambda * sum_n sum(F_n * (theta_n - theta_prev_n)^2)

where ``g = grad(L_KD + L_ITA)`` at the current parameters. Tensors without a gradient
(or with an all-zero one) and ``logit_scale`` get a tiny constant importance instead.
Every other tensor's ``F`` averages to 1, so the penalty's total budget equals plain L2
with the same lambda; AWC only redistributes it across the elements of each tensor.

:class:`ImportanceTracker` holds the importance between iterations: ``adaptive`` (the
default) re-estimates it at every iteration; ``static`` averages it over the first
``static_iterations`` updates and then freezes it, which gives an EWC-like penalty.

:func:`awc_penalty` builds the penalty in autograd (the reference); the plugin uses
:func:`awc_penalty_and_grad`, its value and analytic gradient with multi-tensor ops.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

AWC_EPS = 1e-20
"""Added to ``mean(g^2)`` (tiny: squared gradients of 1e-8 are still normalised to mean 1)."""
TINY_IMPORTANCE = 1e-6
"""Importance of tensors without a usable gradient and of ``logit_scale``."""
CONSTANT_IMPORTANCE_NAMES = ("logit_scale",)
"""Parameter names (last dotted component) that always get ``TINY_IMPORTANCE``."""
AWC_MODES = ("adaptive", "static")


def _is_constant_name(name: str, constant_names: Iterable[str]) -> bool:
    return name.split(".")[-1] in tuple(constant_names)


def normalized_squared_gradient(grad: Tensor | None, like: Tensor, eps: float = AWC_EPS, tiny: float = TINY_IMPORTANCE) -> Tensor:
    """``g^2 / (mean(g^2) + eps)`` in float32, detached; ``tiny`` everywhere if no usable ``g``.

    A missing gradient, an all-zero one or one with non-finite values gives the constant
    ``tiny`` (never NaN).
    """
    return importance_from_grads({"g": grad}, {"g": like}, eps, tiny, constant_names=())["g"]


@functools.lru_cache(maxsize=64)
def _segment_counts(numels: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """The tensors' element counts on ``device`` (long, float32), made once per layout (no
    host-to-device copy per iteration)."""
    counts = torch.tensor(numels, dtype=torch.long, device=device)
    return counts, counts.float()


def importance_from_grads(
    grads: Mapping[str, Tensor | None],
    params: Mapping[str, Tensor],
    eps: float = AWC_EPS,
    tiny: float = TINY_IMPORTANCE,
    constant_names: Iterable[str] = CONSTANT_IMPORTANCE_NAMES,
) -> dict[str, Tensor]:
    """Per-tensor normalised squared gradients for every tensor of ``params``.

    ``grads`` maps names to gradients (``None`` or absent: no gradient), e.g. the output of
    ``torch.autograd.grad(..., allow_unused=True)`` zipped with the names.

    Computed for all tensors at once (one flat float32 buffer, a few whole-buffer ops
    whatever the number of tensors): the results are views of that buffer, shaped like
    the parameters. On CUDA nothing is read back to the host; on the CPU the per-tensor
    denominators are (a free read there) and each part is divided in place.
    """
    constant_names = tuple(constant_names)
    names = list(params)
    if not names:
        return {}
    flats: list[Tensor] = []
    numels: list[int] = []
    for name in names:
        p = params[name]
        grad = None if _is_constant_name(name, constant_names) else grads.get(name)
        numels.append(p.numel())
        flats.append(p.new_zeros(p.numel(), dtype=torch.float32) if grad is None else grad.detach().reshape(-1).float())
    sq = torch.cat(flats).square_()
    counts, counts_f = _segment_counts(tuple(numels), sq.device)
    parts = sq.split(numels)
    # sum(g^2) per tensor: one fused multi-tensor reduction on CUDA (tree sums); on CPU
    # _foreach_norm sums sequentially (1e-3 relative error at 2M elements), Tensor.sum does not
    sums = torch._foreach_norm(list(parts), 1) if sq.is_cuda else [part.sum() for part in parts]
    means = torch.stack(sums) / counts_f
    usable = torch.isfinite(means) & (means > 0)  # else (no, zero or non-finite gradient): tiny
    denom = torch.where(usable, means + eps, torch.ones_like(means))
    if sq.is_cuda:  # spread the per-tensor values over the buffer on the device
        total = sq.numel()
        out = torch.where(usable.repeat_interleave(counts, output_size=total), sq.div_(denom.repeat_interleave(counts, output_size=total)), tiny)
        parts = out.split(numels)
    else:  # reading 2 x n_tensors values is free on the CPU; spreading them costs 0.5 ms at 32 tensors
        torch._foreach_div_(list(parts), denom.tolist())  # the same float32 quotients, in place
        for part, ok in zip(parts, usable.tolist()):
            if not ok:
                part.fill_(tiny)
    return {name: v.view(params[name].shape) for name, v in zip(names, parts)}


def importance_from_parameters(
    named_params: Iterable[tuple[str, Tensor]],
    eps: float = AWC_EPS,
    tiny: float = TINY_IMPORTANCE,
    constant_names: Iterable[str] = CONSTANT_IMPORTANCE_NAMES,
) -> dict[str, Tensor]:
    """:func:`importance_from_grads` reading each parameter's ``.grad`` (after a backward)."""
    named = dict(named_params)
    return importance_from_grads({n: p.grad for n, p in named.items()}, named, eps, tiny, constant_names)


def snapshot(named_params: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """Detached copies of the parameters: the anchor ``theta_prev``."""
    return {name: p.detach().clone() for name, p in named_params}


def awc_penalty(
    named_params: Iterable[tuple[str, Tensor]],
    anchor: Mapping[str, Tensor],
    importance: Mapping[str, Tensor],
    weight: float = 1.0,
) -> Tensor:
    """``weight * sum_n sum(F_n * (theta_n - anchor_n)^2)`` over the given parameters.

    Every parameter given must have an anchor and an importance (KeyError otherwise).
    """
    total: Tensor | None = None
    for name, p in named_params:
        if name not in anchor or name not in importance:
            missing = "anchor" if name not in anchor else "importance"
            raise KeyError(f"awc_penalty: parameter {name!r} has no {missing}")
        diff = p - anchor[name].to(device=p.device, dtype=p.dtype)
        term = (importance[name].to(device=p.device) * diff.float().pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("awc_penalty got no parameters")
    return weight * total


def awc_penalty_and_grad(
    named_params: Iterable[tuple[str, Tensor]],
    anchor: Mapping[str, Tensor],
    importance: Mapping[str, Tensor],
    weight: float = 1.0,
) -> tuple[Tensor, list[Tensor]]:
    """:func:`awc_penalty`'s value and its gradient, without autograd: the gradient is
    analytic, ``2 * weight * F_n * (theta_n - anchor_n)`` for every parameter given.

    Returns the value (a detached float32 scalar) and the gradients (float32, in the
    order of ``named_params``), computed with multi-tensor ops (no per-tensor graph nodes,
    no host synchronisation). Same errors as :func:`awc_penalty`.
    """
    named = list(named_params)
    if not named:
        raise ValueError("awc_penalty got no parameters")
    params, anchors, imps = [], [], []
    for name, p in named:
        if name not in anchor or name not in importance:
            missing = "anchor" if name not in anchor else "importance"
            raise KeyError(f"awc_penalty: parameter {name!r} has no {missing}")
        a, f = anchor[name], importance[name]
        params.append(p.detach())
        anchors.append(a if a.device == p.device and a.dtype == p.dtype else a.to(device=p.device, dtype=p.dtype))
        imps.append(f if f.device == p.device else f.to(device=p.device))
    diff = torch._foreach_sub(params, anchors)
    if any(d.dtype != torch.float32 for d in diff):
        diff = [d.float() for d in diff]
    grads = torch._foreach_mul(diff, imps)  # F (theta - anchor)
    value = weight * torch.cat([t.reshape(-1) for t in torch._foreach_mul(grads, diff)]).sum()
    torch._foreach_mul_(grads, 2.0 * weight)
    return value, grads


class ImportanceTracker:
    """The importance AWC uses from one iteration to the next.

    ``mode="adaptive"`` (default, GIFT): every :meth:`update` replaces the importance.
    ``mode="static"``: the first ``static_iterations`` updates are averaged (running
    mean); after that the importance is frozen, :attr:`needs_gradients` turns False and
    further updates are ignored. Call :meth:`reset` at the start of an experience.
    """

    def __init__(self, mode: str = "adaptive", static_iterations: int = 100) -> None:
        if mode not in AWC_MODES:
            raise ValueError(f"AWC mode must be one of {AWC_MODES}, got {mode!r}")
        if static_iterations < 1:
            raise ValueError(f"static_iterations must be >= 1, got {static_iterations}")
        self.mode = mode
        self.static_iterations = static_iterations
        self.count = 0
        self.importance: dict[str, Tensor] | None = None

    @property
    def frozen(self) -> bool:
        return self.mode == "static" and self.count >= self.static_iterations

    @property
    def needs_gradients(self) -> bool:
        """Whether the next iteration must provide fresh gradients."""
        return not self.frozen

    def reset(self) -> None:
        self.count = 0
        self.importance = None

    def update(self, importance: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Feed this iteration's importance; return the one to use now."""
        if self.frozen:
            assert self.importance is not None
            return self.importance
        fresh = {n: v.detach() for n, v in importance.items()}
        if self.mode == "adaptive" or self.importance is None:
            self.importance = fresh
        else:
            if set(fresh) != set(self.importance):
                raise KeyError("ImportanceTracker.update: the parameter names changed between iterations")
            c = self.count
            names = list(fresh)
            mean = torch._foreach_mul([self.importance[n] for n in names], c)  # (mean * c + fresh) / (c + 1)
            torch._foreach_add_(mean, [fresh[n] for n in names])
            torch._foreach_div_(mean, c + 1)
            self.importance = dict(zip(names, mean))
        self.count += 1
        return self.importance

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "static_iterations": self.static_iterations, "count": self.count, "importance": self.importance}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"ImportanceTracker state is for mode {state['mode']!r}, not {self.mode!r}")
        self.static_iterations = int(state["static_iterations"])
        self.count = int(state["count"])
        imp = state["importance"]
        self.importance = None if imp is None else {n: v.detach().clone() for n, v in imp.items()}
