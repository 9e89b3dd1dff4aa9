"""GIFT's prompt pool: what the text-to-image model is asked to draw (docs/methods.md section 2).

The pool holds every class name of a broad concept list written with a base template
("a photo of a {}.") plus the classes of every *previous* task written with that task's
first template. The current task's classes are never added here: the caller passes the
previous tasks only. Prompts are drawn uniformly with replacement, seeded.

Duplicates (the same prompt from two lists, e.g. ImageNet's "a photo of a pizza." and
Caltech101's, or a name listed twice) are kept by default, as GIFT's official code does
(``txt2img.py`` extends a list and draws with ``random.choice``): a prompt that occurs k
times is drawn k times as often. ``dedupe=True`` keeps the first occurrence only.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from cl_proxyfda.errors import UserError

BASE_TEMPLATE = "a photo of a {}."

Template = str | Callable[[str], str]


def apply_template(template: Template, classname: str) -> str:
    """Write ``classname`` into a template with a ``{}`` or ``{c}`` placeholder (or a callable)."""
    if callable(template):
        return template(classname)
    if "{c}" in template:
        return template.replace("{c}", classname)
    if "{}" in template:
        return template.replace("{}", classname)
    raise UserError(f"prompt template {template!r} has no '{{}}' placeholder")


def build_prompt_pool(
    base_concepts: Iterable[str],
    base_template: Template = BASE_TEMPLATE,
    previous_tasks: Sequence[tuple[Sequence[str], Template]] = (),
    dedupe: bool = False,
) -> list[str]:
    """The prompt pool: base concepts with ``base_template``, then previous tasks' classes.

    ``previous_tasks`` is a list of ``(classnames, first_template)`` for the tasks already
    trained (never the current one). Duplicates are kept (official GIFT code) unless
    ``dedupe``, which keeps the first occurrence of each prompt.
    """
    pool: list[str] = []
    seen: set[str] = set()

    def add(prompt: str) -> None:
        if not dedupe or prompt not in seen:
            seen.add(prompt)
            pool.append(prompt)

    for concept in base_concepts:
        add(apply_template(base_template, concept))
    for classnames, template in previous_tasks:
        for name in classnames:
            add(apply_template(template, name))
    if not pool:
        raise UserError("the prompt pool is empty: give base concepts or previous tasks")
    return pool


def sample_prompts(pool: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` prompts drawn uniformly with replacement from ``pool`` (seeded, reproducible)."""
    if not pool:
        raise UserError("cannot sample prompts from an empty pool")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    idx = np.random.default_rng(seed).integers(0, len(pool), size=n)
    return [pool[i] for i in idx]


def imagenet_base_concepts() -> list[str]:
    """ImageNet's 1000 class names as kept by open_clip (the base concepts for real CLIP)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)
