"""The interface every text-to-image backend implements.

A backend turns prompts and per-image seeds into RGB images. The same seed and prompt
give the same image. Backends are registered in ``cl_proxyfda.registry.GENERATORS``.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from PIL import Image


@runtime_checkable
class ImageGenerator(Protocol):
    """Prompts + seeds in, PIL images out (one per prompt)."""

    name: str

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        ...
