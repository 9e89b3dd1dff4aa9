"""Device resolution: the one place that turns a configured device name into a
``torch.device`` (runs, base-to-new, the GPU check, the diffusers generator)."""
from __future__ import annotations

import torch

from cl_proxyfda.errors import UserError

__all__ = ["resolve_device"]


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
