"""The demo world renderer (determinism, attribute coverage, captions) and the demo stream."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from cl_proxyfda.benchmarks import demo_world as world
from cl_proxyfda.benchmarks.demo_stream import DEMO_TASK_NAMES, DemoStreamParams, build_demo_stream, digit_split, load_digit_glyphs
from cl_proxyfda.benchmarks.stream import StreamData, Task
from cl_proxyfda.registry import STREAMS, load_builtin_components


def _object_pixels(img: np.ndarray, attrs: world.WorldAttributes, i: int) -> np.ndarray:
    """Pixels of image i that differ from its background."""
    bg = np.array(world.BACKGROUNDS[world.vocabulary("background")[attrs.background[i]]])
    return img[np.abs(img.astype(int) - bg).sum(axis=-1) > 0]


# -- renderer ------------------------------------------------------------------------
def test_vocabularies_are_large_enough():
    assert len(world.SHAPES) >= 8 and len(world.BASE_COLOURS) >= 8 and len(world.BASE_TEXTURES) >= 4
    assert set(world.BASE_COLOURS) <= set(world.COLOURS) and set(world.SHADE_COLOURS) <= set(world.COLOURS)
    assert not set(world.NOVEL_TEXTURES) & set(world.BASE_TEXTURES)
    assert world.COUNTS == (1, 2, 3, 4) and len(world.POSITIONS) == 5


def test_same_seed_same_images_other_seed_other_images():
    a = world.render(world.sample_attributes(64, np.random.default_rng(7), count=[1, 2, 3, 4]), 32, noise_std=10)
    b = world.render(world.sample_attributes(64, np.random.default_rng(7), count=[1, 2, 3, 4]), 32, noise_std=10)
    c = world.render(world.sample_attributes(64, np.random.default_rng(8), count=[1, 2, 3, 4]), 32, noise_std=10)
    assert a.dtype == np.uint8 and a.shape == (64, 32, 32, 3)
    assert np.array_equal(a, b)
    assert (a != c).any(axis=(1, 2, 3)).all()  # every single image differs


def test_image_size_is_configurable_and_keeps_the_layout():
    attrs = world.sample_attributes(8, np.random.default_rng(0), position="left", size="small")
    small, big = world.render(attrs, 32), world.render(attrs, 96)
    assert big.shape == (8, 96, 96, 3)
    for img, side in ((small, 32), (big, 96)):
        bg = np.array([world.BACKGROUNDS[n] for n in attrs.names("background")])[:, None, None]
        cols = np.nonzero((np.abs(img.astype(int) - bg).sum(-1) > 0).any(axis=1))[1]
        assert cols.max() < 0.5 * side  # a left object stays in the left half


def test_every_shape_colour_texture_count_renders_distinctly():
    rng = np.random.default_rng(0)
    # Shapes: same everything else, different masks.
    base = world.sample_attributes(1, rng, size="large", position="center", texture="solid")
    masks = []
    for s in range(len(world.SHAPES)):
        a = base[[0]]
        a.shape = np.array([s])
        img = world.render(a, 32)[0]
        masks.append(np.abs(img.astype(int) - img[0, 0].astype(int)).sum(-1) > 0)
        assert masks[-1].sum() > 30  # a large object covers many pixels
    for i in range(len(masks)):
        for j in range(i):
            assert (masks[i] != masks[j]).sum() >= 8, (world.SHAPES[i], world.SHAPES[j])
    # Colours: solid objects are painted with (nearly) the named colour.
    for name in world.COLOURS:
        attrs = world.sample_attributes(4, rng, colour=name, texture="solid", size="large")
        imgs = world.render(attrs, 32)
        for i in range(4):
            pix = _object_pixels(imgs[i], attrs, i)
            assert np.abs(np.median(pix, axis=0) - np.array(world.COLOURS[name])).max() <= 15, name
    # Textures: the share of secondary-coloured pixels differs from solid.
    shares = {}
    for name in world.TEXTURES:
        attrs = world.sample_attributes(16, rng, texture=name, size="large", colour="blue", background="white")
        imgs = world.render(attrs, 32)
        col = np.array(world.COLOURS["blue"])
        shares[name] = np.mean([(np.abs(_object_pixels(imgs[i], attrs, i) - col).max(axis=1) > 20).mean() for i in range(16)])
    assert shares["solid"] < 0.02
    assert all(shares[t] > 0.15 for t in world.TEXTURES if t != "solid"), shares
    # Counts: the number of connected objects (distinct grid cells) matches.
    for n in world.COUNTS:
        attrs = world.sample_attributes(8, rng, count=n, texture="solid")
        imgs = world.render(attrs, 32)
        for i in range(8):
            bg = np.array(world.BACKGROUNDS[attrs.names("background")[i]])
            fg = np.abs(imgs[i].astype(int) - bg).sum(-1) > 0
            if n == 1:
                assert fg.any()
            else:
                quads = [fg[:16, :16].any(), fg[:16, 16:].any(), fg[16:, :16].any(), fg[16:, 16:].any()]
                assert sum(quads) == n


def test_style_shifts_change_pixels_as_described():
    attrs = world.sample_attributes(32, np.random.default_rng(3), size="large")
    plain, outline, noisy = world.render(attrs, 32), world.render(attrs, 32, outline=True), world.render(attrs, 32, noise_std=40)
    bg = np.array([world.BACKGROUNDS[n] for n in attrs.names("background")])[:, None, None]
    fg_plain = (np.abs(plain.astype(int) - bg).sum(-1) > 0).sum(axis=(1, 2))
    fg_outline = (np.abs(outline.astype(int) - bg).sum(-1) > 0).sum(axis=(1, 2))
    assert (fg_outline < 0.8 * fg_plain).all() and (fg_outline > 0).all()
    assert 25 < np.abs(noisy.astype(float) - plain).mean() < 40  # ~ E|N(0, 40)| = 32 minus clipping


def test_sample_attributes_fixes_or_restricts_values_and_rejects_unknown_ones():
    rng = np.random.default_rng(0)
    a = world.sample_attributes(200, rng, shape="star", colour=["red", "blue"], count=[2, 3])
    assert set(a.names("shape")) == {"star"} and set(a.names("colour")) == {"red", "blue"}
    assert set(a.names("count")) == {2, 3} and set(a.names("size")) == {"small"}  # several objects are small
    d = world.sample_attributes(400, rng)  # base world defaults
    assert set(d.names("colour")) == set(world.BASE_COLOURS) and set(d.names("texture")) == set(world.BASE_TEXTURES)
    assert set(d.names("count")) == {1} and set(d.names("background")) == set(world.BASE_BACKGROUNDS)
    with pytest.raises(ValueError, match="unknown value 'mauve'"):
        world.sample_attributes(2, rng, colour="mauve")
    with pytest.raises(TypeError, match="unknown attribute"):
        world.sample_attributes(2, rng, flavour="sweet")


def test_render_throughput_is_thousands_per_second():
    import time

    attrs = world.sample_attributes(2000, np.random.default_rng(0))
    start = time.perf_counter()
    world.render(attrs, 32)
    rate = 2000 / (time.perf_counter() - start)
    assert rate > 1000, f"{rate:.0f} images/s"  # ~8000/s measured on one idle core


# -- captions ------------------------------------------------------------------------
def test_captions_name_the_attributes_through_every_template():
    attrs = world.sample_attributes(3, np.random.default_rng(1), shape="circle", colour="orange", texture="striped", size="large", background="white")
    assert world.caption(attrs, 0)[0] == "a photo of an orange striped circle."
    assert world.caption(attrs, 1)[0] == "an orange striped circle."
    assert world.caption(attrs, 2)[0] == "a picture of an orange striped circle on a white background."
    assert world.caption(attrs, 3)[0] == "a photo of a large orange striped circle."
    assert world.caption(attrs, [5, 6, 7]) == ["a photo of a circle.", "a photo of an orange object.", "a photo of a striped object."]
    several = world.sample_attributes(1, np.random.default_rng(1), count=3, shape="cross", colour="red", texture="dotted")
    assert world.caption(several, 0) == ["a photo of three red dotted crosses."]
    rnd = world.caption(world.sample_attributes(200, np.random.default_rng(2)), np.random.default_rng(3))
    assert len(set(rnd)) > 100 and all(c.endswith(".") for c in rnd)


def test_caption_attributes_say_what_each_caption_asserts():
    attrs = world.sample_attributes(2, np.random.default_rng(0), shape="ring", colour="pink", texture="solid", size="small")
    asserted = world.caption_attributes(attrs, [0, 5])
    assert asserted[0].tolist() == [world.SHAPES.index("ring"), list(world.COLOURS).index("pink"), 0, -1]
    assert asserted[1].tolist() == [world.SHAPES.index("ring"), -1, -1, -1]


def test_base_concepts_are_every_colour_texture_shape():
    concepts = world.base_concepts()
    assert len(concepts) == len(set(concepts)) == 8 * 4 * 8
    assert "red striped circle" in concepts and "pink checkered crescent" in concepts


# -- the demo stream -----------------------------------------------------------------
@pytest.fixture(scope="module")
def stream() -> StreamData:
    return build_demo_stream(DemoStreamParams(train_per_class=12, test_per_class=6, control_per_class=5, reference_size=20))


def test_demo_stream_has_the_tasks_class_counts_and_sizes(stream):
    expected = {"outline-colours": 8, "counting": 4, "shades": 6, "novel-textures": 4, "digits": 10, "position": 5}
    assert [t.name for t in stream.tasks] == list(DEMO_TASK_NAMES) == list(expected)
    for task in stream.tasks:
        assert isinstance(task, Task) and len(task.templates) >= 2
        assert task.num_classes == expected[task.name]
        assert len(task.train) == 12 * task.num_classes and len(task.test) == 6 * task.num_classes
        assert np.bincount(task.train.targets).tolist() == [12] * task.num_classes
        assert np.bincount(task.test.targets).tolist() == [6] * task.num_classes
        img, label = task.train[0]
        assert img.size == (32, 32) and img.mode == "RGB" and 0 <= label < task.num_classes
    assert stream.control.classnames == list(world.SHAPES) and len(stream.control.test) == 40 and len(stream.control.train) == 0
    assert len(stream.reference) == 20 and set(stream.reference.targets) == {0}
    assert stream.base_concepts == world.base_concepts()


def test_control_concepts_are_never_trained_in_the_stream(stream):
    control = set(stream.control.classnames)
    for task in stream.tasks:
        assert not control & set(task.classnames)
        assert not any(s in p for p in (t.format(c) for t in task.templates for c in task.classnames) for s in control)


def test_demo_stream_splits_are_disjoint_and_deterministic(stream):
    again = build_demo_stream(DemoStreamParams(train_per_class=12, test_per_class=6, control_per_class=5, reference_size=20))
    other = build_demo_stream(DemoStreamParams(seed=1, train_per_class=12, test_per_class=6, control_per_class=5, reference_size=20))
    for t, t2, t3 in zip(stream.tasks, again.tasks, other.tasks):
        assert np.array_equal(t.train.images, t2.train.images) and t.train.targets == t2.train.targets
        assert np.array_equal(t.test.images, t2.test.images)
        assert not np.array_equal(t.train.images, t3.train.images)
        train_keys = {img.tobytes() for img in t.train.images}
        assert not any(img.tobytes() in train_keys for img in t.test.images), t.name
    train_idx, test_idx = digit_split(0, 5, 12, 6)
    assert len(set(train_idx)) == 120 and len(set(test_idx)) == 60 and not set(train_idx) & set(test_idx)
    glyphs, targets = load_digit_glyphs()
    digits = stream.tasks[DEMO_TASK_NAMES.index("digits")]
    assert digits.train.targets == targets[train_idx].tolist()
    assert np.array_equal(stream.control.test.images, again.control.test.images)


def test_a_task_does_not_depend_on_the_other_tasks_chosen(stream):
    sub = build_demo_stream(DemoStreamParams(tasks=["position", "counting"], train_per_class=12, test_per_class=6, control_per_class=5, reference_size=0))
    assert [t.name for t in sub.tasks] == ["counting", "position"]  # stream order kept
    assert np.array_equal(sub.tasks[1].train.images, stream.tasks[-1].train.images)
    assert sub.reference is None


def test_few_shot_and_registry_and_bad_params():
    load_builtin_components()
    data = STREAMS.build("demo", {"tasks": ["shades"], "shots": 3, "train_per_class": 10, "test_per_class": 2, "control_per_class": 0})
    assert len(data.tasks[0].train) == 3 * 6 and data.control is None
    with pytest.raises(ValidationError, match="unknown demo task"):
        DemoStreamParams(tasks=["colours"])
    with pytest.raises(ValidationError):
        DemoStreamParams(train_per_class=4, colour="red")  # extra keys are refused
    from cl_proxyfda.errors import UserError

    with pytest.raises(UserError, match="digit"):
        build_demo_stream(DemoStreamParams(tasks=["digits"], train_per_class=150, test_per_class=50))


def test_digits_are_real_upscaled_and_coloured(stream):
    digits = stream.tasks[DEMO_TASK_NAMES.index("digits")]
    glyphs, targets = load_digit_glyphs()
    train_idx, _ = digit_split(0, 5, 12, 6)
    imgs = digits.train.images.astype(int)
    ink = imgs.sum(-1) < 500  # darker than the light paper
    assert ink.mean() > 0.1
    inked = imgs[ink]
    assert (inked[:, 2] > inked[:, 1] + 40).mean() > 0.8  # purple ink, not grey
    # The ink follows the 8x8 glyph: correlation of darkness with the upscaled digit.
    import torch

    dark = torch.from_numpy((255.0 * 3 - imgs.sum(-1))[:, None, 2:30, 2:30])  # the 28x28 inside the margin
    coarse = torch.nn.functional.adaptive_avg_pool2d(dark, 8).reshape(len(imgs), -1).numpy()
    corr = [np.corrcoef(a, b.ravel())[0, 1] for a, b in zip(coarse, glyphs[train_idx])]
    assert np.median(corr) > 0.9
