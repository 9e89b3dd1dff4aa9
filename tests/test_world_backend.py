"""The demo world as a text-to-image backend: prompt parsing, rendering, registry."""
from __future__ import annotations

import numpy as np
import pytest

from cl_proxyfda.benchmarks import demo_world as world
from cl_proxyfda.benchmarks.demo_stream import CONTROL_TEMPLATES, DEMO_TASKS
from cl_proxyfda.errors import UserError
from cl_proxyfda.generators.base import ImageGenerator
from cl_proxyfda.generators.prompt_pool import BASE_TEMPLATE, build_prompt_pool
from cl_proxyfda.generators.world_backend import WorldRenderer, WorldRendererParams, parse_prompt
from cl_proxyfda.registry import GENERATORS, load_builtin_components

# The attribute each task's class names stand for, and how a class name maps to the value.
TASK_ATTRIBUTE = {
    "outline-colours": ("colour", str),
    "counting": ("count", lambda c: world.COUNT_WORDS.index(c) + 1),
    "shades": ("colour", str),
    "novel-textures": ("texture", str),
    "position": ("position", str),
}


@pytest.mark.parametrize("spec", DEMO_TASKS, ids=lambda s: s.name)
def test_every_template_of_every_task_parses_to_its_class(spec):
    for template in spec.templates:
        for cname in spec.classnames:
            parsed = parse_prompt(template.format(cname))
            if spec.name == "digits":
                assert parsed.digit == int(cname)
            else:
                attribute, value = TASK_ATTRIBUTE[spec.name]
                assert parsed.attributes[attribute] == value(cname), template.format(cname)
                assert parsed.outline == (spec.name == "outline-colours")


def test_base_templates_and_base_concepts_parse():
    for concept in world.base_concepts():
        parsed = parse_prompt(BASE_TEMPLATE.format(concept))
        colour, texture, shape = parsed.attributes["colour"], parsed.attributes["texture"], parsed.attributes["shape"]
        assert f"{colour} {texture} {shape}" == concept
    for shape in world.SHAPES:
        assert parse_prompt(CONTROL_TEMPLATES[0].format(shape)).attributes == {"shape": shape}
    attrs = world.sample_attributes(40, np.random.default_rng(0), count=[1, 2, 3, 4], colour=list(world.COLOURS))
    for i in range(len(attrs)):
        for t, (_fmt, named) in enumerate(world.CAPTION_TEMPLATES):
            parsed = parse_prompt(world.caption_of(attrs, i, t))
            for name in named:
                assert parsed.attributes[name] == attrs.names(name)[i]
            assert parsed.attributes.get("count", 1) == attrs.count[i]
    assert parse_prompt("a picture of a red solid ring on a light gray background.").attributes["background"] == "light gray"


def test_unparseable_prompt_raises_a_user_error_naming_it():
    with pytest.raises(UserError, match="cannot parse prompt 'a photo of a cat.'"):
        WorldRenderer().generate(["a photo of a red circle.", "a photo of a cat."], [0, 1])
    with pytest.raises(UserError):
        parse_prompt("")


def test_images_follow_the_prompt_and_the_seed():
    gen = WorldRenderer(image_size=32)
    assert isinstance(gen, ImageGenerator) and gen.name == "world"
    prompts = ["a photo of a red solid circle.", "a photo of a blue solid square.", "a photo of three objects.", 'a photo of the number: "7".']
    imgs = gen.generate(prompts, [1, 2, 3, 4])
    assert [im.size for im in imgs] == [(32, 32)] * 4 and all(im.mode == "RGB" for im in imgs)
    again = gen.generate(prompts, [1, 2, 3, 4])
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(imgs, again))
    other = gen.generate(prompts, [11, 12, 13, 14])
    assert all(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(imgs, other))
    red = np.asarray(imgs[0]).reshape(-1, 3).astype(int)
    assert (np.abs(red - np.array(world.COLOURS["red"])).max(axis=1) <= 15).sum() > 20  # red pixels drawn
    # The same seed with the prompt's attributes is the world's own rendering.
    attrs = world.sample_attributes(1, np.random.default_rng(2), colour="blue", texture="solid", shape="square")
    assert np.array_equal(np.asarray(imgs[1]), world.render(attrs, 32)[0])


def test_digit_prompts_draw_different_digits():
    gen = WorldRenderer(image_size=32)
    # Same seed (same colours and jitter), different digit: different ink.
    imgs = [np.asarray(im) for im in gen.generate([f'a photo of the number: "{d}".' for d in range(10)], [5] * 10)]
    for i in range(10):
        for j in range(i):
            assert (imgs[i] != imgs[j]).any()


def test_gift_prompt_pool_of_the_demo_stream_renders_completely():
    pool = build_prompt_pool(world.base_concepts(), previous_tasks=[(list(s.classnames), s.templates[0]) for s in DEMO_TASKS])
    assert len(pool) == 256 + sum(len(s.classnames) for s in DEMO_TASKS)
    imgs = WorldRenderer().generate(pool, list(range(len(pool))))
    assert len(imgs) == len(pool)


def test_registered_as_world_generator():
    load_builtin_components()
    gen = GENERATORS.build("world", {"image_size": 48})
    assert isinstance(gen, WorldRenderer) and gen.image_size == 48
    assert gen.generate(["a large green star."], [0])[0].size == (48, 48)
    assert "48" in gen.config_id
    with pytest.raises(Exception):
        WorldRendererParams(size=32)
