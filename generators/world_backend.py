"""The demo world as a text-to-image backend (GIFT's generator in the demo).

``WorldRenderer`` reads a prompt in the world's vocabulary and draws a matching image:
attribute words anywhere in the prompt fix the attributes (shape, colour, texture,
size, position, count word, "on a ... background"), style words pick a style shift
("outline", "line drawing", "sketch": contours only; "noisy", "grainy": pixel noise),
and everything the prompt leaves open is drawn from the base world with the image's
seed. Prompts about a number or digit ('a photo of the number: "3".', "a handwritten
3.") draw the digit with a font at 8x8, upscaled and coloured like the digits task: a
typed stand-in for handwriting, as a text-to-image model would give. A prompt without
any recognisable word raises ``UserError`` naming it.

The same prompt and seed give the same image.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, Field

from cl_proxyfda.benchmarks import demo_world as world
from cl_proxyfda.benchmarks.demo_stream import colour_digits
from cl_proxyfda.errors import UserError
from cl_proxyfda.registry import GENERATORS

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_OUTLINE_WORDS = ("outline", "outlines", "line drawing", "sketch", "contour")
_NOISE_WORDS = ("noisy", "grainy", "noise")
_DIGIT_CUES = ("number", "digit", "numeral", "handwritten")


def _phrase_table() -> dict[str, tuple[str, Any]]:
    """Every phrase the parser knows -> (attribute, value)."""
    table: dict[str, tuple[str, Any]] = {}
    for s in world.SHAPES:
        table[s] = ("shape", s)
        table[world.SHAPE_PLURALS[s]] = ("shape", s)
    for c in world.COLOURS:
        table[c] = ("colour", c)
    for t in world.TEXTURES:
        table[t] = ("texture", t)
    for z in world.SIZES:
        table[z] = ("size", z)
    for p in world.POSITIONS:
        table[p] = ("position", p)
    table["centre"] = ("position", "center")
    for n, word in zip(world.COUNTS, world.COUNT_WORDS):
        table[word] = ("count", n)
    for w in _OUTLINE_WORDS:
        table[w] = ("style", "outline")
    for w in _NOISE_WORDS:
        table[w] = ("style", "noise")
    return table


_TABLE = _phrase_table()
_PHRASES = re.compile(r"\b(" + "|".join(re.escape(p) for p in sorted(_TABLE, key=len, reverse=True)) + r")\b")
_BACKGROUND = re.compile(r"\bon an? (" + "|".join(re.escape(b) for b in sorted(world.BACKGROUNDS, key=len, reverse=True)) + r") background\b")
_DIGIT = re.compile(r"(?<![\w.])([0-9])(?![\w])|\b(" + "|".join(_NUMBER_WORDS) + r")\b")


@dataclass
class WorldPrompt:
    """What a prompt asks for: fixed attributes, style shifts, or a digit."""

    attributes: dict[str, Any] = field(default_factory=dict)
    outline: bool = False
    noise: bool = False
    digit: int | None = None


def parse_prompt(prompt: str) -> WorldPrompt:
    """Read the world's attribute words from a prompt (``UserError`` when there are none)."""
    text = prompt.lower().replace("grey", "gray")
    parsed = WorldPrompt()
    if any(re.search(rf"\b{cue}\b", text) for cue in _DIGIT_CUES):
        match = _DIGIT.search(text)
        if match:
            parsed.digit = int(match.group(1)) if match.group(1) else _NUMBER_WORDS.index(match.group(2))
            return parsed
    bg = _BACKGROUND.search(text)
    if bg:
        parsed.attributes["background"] = bg.group(1)
        text = text[: bg.start()] + " " + text[bg.end() :]
    for match in _PHRASES.finditer(text):
        attribute, value = _TABLE[match.group(1)]
        if attribute == "style":
            parsed.outline |= value == "outline"
            parsed.noise |= value == "noise"
        else:
            parsed.attributes.setdefault(attribute, value)  # the first mention wins
    if not parsed.attributes and not parsed.outline and not parsed.noise:
        raise UserError(
            f"world renderer: cannot parse prompt {prompt!r}: it names no shape, colour, texture, size, "
            "position, count, background, style or digit of the demo world"
        )
    return parsed


def render_digit(digit: int, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """A typed digit drawn at 16x16, reduced to 8x8 (the scale of the handwritten digits),
    then upscaled and coloured as the digits task does: uint8 (image_size, image_size, 3)."""
    canvas = Image.new("L", (16, 16), 0)
    font = ImageFont.load_default(size=int(rng.integers(12, 16)))
    dx, dy = rng.integers(-1, 2, size=2)
    ImageDraw.Draw(canvas).text((8 + int(dx), 8 + int(dy)), str(digit), fill=255, font=font, anchor="mm", stroke_width=int(rng.integers(0, 2)), stroke_fill=255)
    glyph = np.asarray(canvas.resize((8, 8), Image.BOX), dtype=np.float32) / 255.0
    return colour_digits(glyph[None], rng, image_size)[0]


class WorldRenderer:
    """Prompts + seeds in, demo-world images out (the ``ImageGenerator`` protocol).

    Args:
        image_size: side of the images in pixels.
        noise_std: pixel noise of prompts that ask for a noisy/grainy image.
    """

    name = "world"

    def __init__(self, image_size: int = 32, noise_std: float = 30.0) -> None:
        if image_size < 8:
            raise UserError(f"generator.image_size: {image_size} is too small (>= 8)")
        self.image_size = int(image_size)
        self.noise_std = float(noise_std)

    @property
    def config_id(self) -> str:
        """What decides the images (the synthetic cache's key)."""
        return json.dumps({"backend": self.name, "image_size": self.image_size, "noise_std": self.noise_std}, sort_keys=True)

    def render_one(self, prompt: str, seed: int) -> np.ndarray:
        """The image of one prompt as uint8 (H, W, 3)."""
        parsed = parse_prompt(prompt)
        rng = np.random.default_rng(int(seed))
        if parsed.digit is not None:
            return render_digit(parsed.digit, rng, self.image_size)
        attrs = world.sample_attributes(1, rng, **parsed.attributes)
        return world.render(attrs, self.image_size, outline=parsed.outline, noise_std=self.noise_std if parsed.noise else 0.0)[0]

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        """One RGB image per prompt, each from its own seed."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        return [Image.fromarray(self.render_one(str(p), int(s))) for p, s in zip(prompts, seeds)]


class WorldRendererParams(BaseModel):
    """YAML arguments of the ``world`` generator."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    image_size: int = Field(32, ge=8, le=512, description="image side in pixels (the demo model takes 32)")
    noise_std: float = Field(30.0, ge=0, description="pixel noise of prompts asking for a noisy/grainy image")


@GENERATORS.register("world", WorldRendererParams, help="the demo world's procedural renderer (offline text-to-image for the demo)")
def build_world_renderer(params: WorldRendererParams, **_context: Any) -> WorldRenderer:
    """The registry's factory."""
    return WorldRenderer(image_size=params.image_size, noise_std=params.noise_std)
