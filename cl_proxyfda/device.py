"""Device resolution: the one place that turns a configured device name into a
``torch.device`` (runs, base-to-new, the GPU check, the diffusers generator), and the one
autocast context (training, evaluation, the plugins' extra forwards, the bench)."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from cl_proxyfda.errors import UserError

__all__ = ["autocast_to", "resolve_device"]


def resolve_device(name: str | torch.device, key: str = "run.device") -> torch.device:
    """``auto`` is CUDA when present, else the CPU; anything else is read by torch
    (``cpu``, ``cuda``, ``cuda:1``). A name torch does not know, or a CUDA device on a
    machine without CUDA, is a :class:`UserError` naming ``key``."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{key}: unknown device {str(name)!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}: cuda requested but no CUDA device is available")
    return device


def autocast_to(device: torch.device | str, dtype: torch.dtype | None) -> ContextManager:
    """Autocast to ``dtype`` (bf16 / fp16) on ``device``'s type, or nothing when ``dtype``
    is None (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
