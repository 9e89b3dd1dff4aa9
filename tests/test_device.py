"""cl_proxyfda.device.resolve_device: the one device resolver (runs, base-to-new,
gpu-check, the diffusers generator)."""
from __future__ import annotations

import pytest
import torch

from cl_proxyfda.device import autocast_to, resolve_device
from cl_proxyfda.errors import UserError


def test_auto_is_cuda_when_present_else_cpu():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_needs_a_cuda_device():
    if torch.cuda.is_available():
        assert resolve_device("cuda:0", "generator.device") == torch.device("cuda", 0)
    else:
        for name in ("cuda", "cuda:1"):
            with pytest.raises(UserError) as info:
                resolve_device(name, "generator.device")
            assert str(info.value) == "generator.device: cuda requested but no CUDA device is available"


def test_unknown_names_are_one_line_naming_the_key():
    with pytest.raises(UserError) as info:
        resolve_device("tpu9", "--device")
    assert str(info.value) == "--device: unknown device 'tpu9'"
    with pytest.raises(UserError, match="^run.device: unknown device"):
        resolve_device("")


def test_autocast_to_lowers_matmuls_only_when_a_dtype_is_given():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast_to("cpu", torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with autocast_to(torch.device("cpu"), None):
        assert (a @ b).dtype == torch.float32
