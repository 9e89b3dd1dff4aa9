"""The demo stream: an offline miniature of MTIL built on the demo world.

Six tasks, each with its own class names and templates (the first is the training
prompt), in this order (:data:`DEMO_TASKS`):

=================  ======  ===========================================================
task               classes what it is
=================  ======  ===========================================================
outline-colours    8       base colours, but drawn as outlines on coloured backgrounds
                           with pixel noise: covered by pre-training, shifted style
counting           4       how many (blue) objects, 1-4: never named in pre-training
shades             6       dark/light red, green, blue: fine-grained colour shades
novel-textures     4       wavy, gridded, gradient, speckled: textures never seen
                           (large green centred squares and circles: swatches)
digits             10      real images: scikit-learn's handwritten digits (8x8),
                           upscaled to the world size, purple ink on light paper
position           5       where a single small red object lies (left, right, top,
                           bottom, center): never named in pre-training
=================  ======  ===========================================================

Control set (``StreamData.control``): zero-shot classification of the eight base
*shapes* in the base style with the pre-training prompt "a photo of a {}." No stream
task has shape names as classes, in any style, so the control concepts are never
trained in the stream; their drop is the concept forgetting of naive fine-tuning.
The control task has an empty training set.

``StreamData.base_concepts`` (GIFT's prompt pool): every "{colour} {texture} {shape}"
of the base world (8 x 4 x 8 = 256), i.e. exactly the pre-training captions with
"a photo of a {}." ("a photo of a red striped circle."), which the world renderer
backend draws. ``StreamData.reference``: unlabelled base-world images (labels 0).

The novel-concept tasks and the digits use one object colour each: the demo model's
image features are dominated by colour, and with colour as a free nuisance a task
like counting is learned slowly (45% after 120 steps of batch 32 at lr 3e-4
against 85% with a fixed colour, measured on the shipped model).

The text tower of the demo model knows the novel class words from text alone (see
``cl_proxyfda.demo_pretrain.LANGUAGE_CONCEPTS``), as a real CLIP knows words it has
rarely seen pictured: zero-shot accuracy on the novel tasks is near chance, and the
image tower has to learn them.

Images are rendered when the stream is built (about a second for the whole stream),
from seeds derived from ``seed``, the task's fixed number and the split, so a task's
content does not depend on which other tasks are chosen. Train and test images of a
world task come from separate random streams; digits are split per class by a seeded
permutation of scikit-learn's 1797 images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cl_proxyfda.benchmarks import demo_world as world
from cl_proxyfda.benchmarks.image_folder import subsample_task
from cl_proxyfda.benchmarks.stream import ArrayImageDataset, StreamData, Task
from cl_proxyfda.errors import UserError
from cl_proxyfda.registry import STREAMS

DIGIT_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
CONTROL_TEMPLATES: list[str] = ["a photo of a {}."]
DIGIT_BACKGROUNDS: tuple[str, ...] = ("white", "light gray")
DIGIT_INK = "purple"
# Outline task style: contours only, coloured backgrounds, pixel noise.
OUTLINE_STYLE: dict[str, Any] = world.STYLE_SHIFTS["outline-noise"]
_SPLITS = {"train": 0, "test": 1, "colour": 2, "control": 3, "reference": 4}
Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train images, labels, test images, labels


@dataclass(frozen=True)
class DemoTaskSpec:
    """How one demo task is made: vocabulary, meta data and an image maker.

    ``make(params, number)`` returns the rendered ``(train_images, train_labels,
    test_images, test_labels)``; ``number`` is the task's fixed id in seed derivation.
    """

    name: str
    number: int
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    make: Callable[["DemoStreamParams", int], Split]
    meta: dict[str, Any] = field(default_factory=dict)


def task_rng(seed: int, number: int, split: str) -> np.random.Generator:
    """The generator of one task's split: independent of the other tasks chosen."""
    return np.random.default_rng(np.random.SeedSequence([seed, number, _SPLITS[split]]))


def world_task(attribute: str, classes: tuple[Any, ...], render_kwargs: dict[str, Any] | None = None, **fixed: Any) -> Callable:
    """A maker of world images classified by ``attribute`` (train and test drawn from
    separate seeded generators); ``fixed`` restricts the other attributes."""

    def make(params: "DemoStreamParams", number: int) -> Split:
        out = []
        for split, per_class in (("train", params.train_per_class), ("test", params.test_per_class)):
            attrs, labels = world.sample_labelled(task_rng(params.seed, number, split), attribute, classes, per_class, **fixed)
            out += [world.render(attrs, params.image_size, **(render_kwargs or {})), labels]
        return out[0], out[1], out[2], out[3]

    return make


def load_digit_glyphs() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits: (1797, 8, 8) floats in [0, 1], labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def colour_digits(glyphs: np.ndarray, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Upscale grey 8x8 digits (values in [0, 1]) to ``image_size`` (bilinear, a small
    margin) and colour them: purple ink (jittered) on white or light gray paper."""
    import torch
    import torch.nn.functional as F

    n = len(glyphs)
    margin = max(1, image_size // 16)
    inner = image_size - 2 * margin
    up = F.interpolate(torch.from_numpy(glyphs)[:, None], size=(inner, inner), mode="bilinear", align_corners=False)[:, 0].numpy()
    ink = np.zeros((n, image_size, image_size), dtype=np.float32)
    ink[:, margin : margin + inner, margin : margin + inner] = np.clip(up, 0.0, 1.0)
    fg = np.array(world.COLOURS[DIGIT_INK], dtype=np.float32)[None] + rng.uniform(-20, 20, size=(n, 3)).astype(np.float32)
    bg = np.array([world.BACKGROUNDS[b] for b in DIGIT_BACKGROUNDS], dtype=np.float32)[rng.integers(0, len(DIGIT_BACKGROUNDS), n)]
    img = bg[:, None, None, :] + ink[..., None] * (fg - bg)[:, None, None, :]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def digit_split(seed: int, number: int, train_per_class: int, test_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into scikit-learn's digits: per class, a seeded permutation gives
    ``train_per_class`` training and the next ``test_per_class`` test images."""
    _, targets = load_digit_glyphs()
    rng = task_rng(seed, number, "train")
    need = train_per_class + test_per_class
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(targets == c)
        if len(idx) < need:
            raise UserError(
                f"stream: the digits task has {len(idx)} images of digit {c}; train_per_class + test_per_class = {need} is too many"
            )
        idx = rng.permutation(idx)
        train_idx.extend(idx[:train_per_class])
        test_idx.extend(idx[train_per_class:need])
    return rng.permutation(np.asarray(train_idx)), task_rng(seed, number, "test").permutation(np.asarray(test_idx))


def digits_task(params: "DemoStreamParams", number: int) -> Split:
    """The digits split by :func:`digit_split`, upscaled and coloured (seeded)."""
    glyphs, targets = load_digit_glyphs()
    train, test = digit_split(params.seed, number, params.train_per_class, params.test_per_class)
    colour_rng = task_rng(params.seed, number, "colour")
    train_x = colour_digits(glyphs[train], colour_rng, params.image_size)
    test_x = colour_digits(glyphs[test], colour_rng, params.image_size)
    return train_x, targets[train], test_x, targets[test]


DEMO_TASKS: tuple[DemoTaskSpec, ...] = (
    DemoTaskSpec(
        "outline-colours", 1, world.BASE_COLOURS,
        ("a line drawing in {}.", "an outline drawn in {}.", "a noisy sketch in {} on a coloured background."),
        world_task("colour", world.BASE_COLOURS, OUTLINE_STYLE, background=world.NEW_BACKGROUNDS, size="large"),
        {"kind": "shifted style", "covered_by_pretraining": True, "style": "outline, coloured backgrounds, noise 30"},
    ),
    DemoTaskSpec(
        "counting", 2, world.COUNT_WORDS,
        ("a photo of {} objects.", "a picture with {} shapes in it."),
        world_task("count", world.COUNTS, colour="blue"),
        {"kind": "novel concept", "covered_by_pretraining": False},
    ),
    DemoTaskSpec(
        "shades", 3, world.SHADE_COLOURS,
        ("a photo of a {} object.", "a {} shape."),
        world_task("colour", world.SHADE_COLOURS),
        {"kind": "fine-grained", "covered_by_pretraining": False},
    ),
    DemoTaskSpec(
        "novel-textures", 4, world.NOVEL_TEXTURES,
        ("a photo of a {} object.", "a shape with a {} pattern."),
        world_task("texture", world.NOVEL_TEXTURES, size="large", shape=["square", "circle"], position="center", colour="green"),
        {"kind": "novel concept", "covered_by_pretraining": False},
    ),
    DemoTaskSpec(
        "digits", 5, DIGIT_NAMES,
        ('a photo of the number: "{}".', "a photo of the digit {}.", "a handwritten {}."),
        digits_task,
        {"kind": "real images", "covered_by_pretraining": False, "source": "sklearn.datasets.load_digits"},
    ),
    DemoTaskSpec(
        "position", 6, world.POSITIONS,
        ("a photo of an object in the {} part of the image.", "a picture with a shape in the {}."),
        world_task("position", world.POSITIONS, size="small", colour="red"),
        {"kind": "novel concept", "covered_by_pretraining": False},
    ),
)
DEMO_TASK_NAMES: tuple[str, ...] = tuple(t.name for t in DEMO_TASKS)


class DemoStreamParams(BaseModel):
    """Arguments of the ``demo`` stream."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of every image and split of the stream")
    image_size: int = Field(32, ge=16, le=512, description="image side in pixels (the demo model takes 32)")
    train_per_class: int = Field(100, ge=1, le=100_000, description="training images per class (digits: train + test <= 174)")
    test_per_class: int = Field(25, ge=1, le=100_000, description="test images per class")
    tasks: list[str] | None = Field(None, description=f"subset of the tasks (stream order kept): {', '.join(DEMO_TASK_NAMES)}")
    control_per_class: int = Field(40, ge=0, le=100_000, description="control-set images per base shape (0: no control set)")
    reference_size: int = Field(512, ge=0, le=1_000_000, description="unlabelled base-world reference images (0: none)")
    shots: int | None = Field(None, ge=1, le=100_000, description="few-shot: training images per class (seeded draw from the training set)")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("empty task list (omit 'tasks' for all)")
        unknown = [t for t in value if t not in DEMO_TASK_NAMES]
        if unknown:
            raise ValueError(f"unknown demo task(s) {unknown} (known: {', '.join(DEMO_TASK_NAMES)})")
        if len(set(value)) != len(value):
            raise ValueError("duplicate task names")
        return value


def build_task(spec: DemoTaskSpec, params: DemoStreamParams) -> Task:
    """One task of the stream, rendered (and few-shot subsampled when ``shots``)."""
    train_x, train_y, test_x, test_y = spec.make(params, spec.number)
    task = Task(
        spec.name, list(spec.classnames), list(spec.templates),
        ArrayImageDataset(train_x, train_y), ArrayImageDataset(test_x, test_y), dict(spec.meta),
    )
    if params.shots is not None:
        task = subsample_task(task, shots=params.shots, seed=params.seed)
    return task


def control_task(params: DemoStreamParams) -> Task:
    """Base shapes in the base style, never trained in the stream (empty train set)."""
    rng = task_rng(params.seed, 0, "control")
    attrs, labels = world.sample_labelled(rng, "shape", world.SHAPES, params.control_per_class)
    empty = ArrayImageDataset(np.zeros((0, params.image_size, params.image_size, 3), dtype=np.uint8), [])
    test = ArrayImageDataset(world.render(attrs, params.image_size), labels)
    return Task("control-shapes", list(world.SHAPES), list(CONTROL_TEMPLATES), empty, test, {"kind": "control"})


def reference_images(params: DemoStreamParams) -> ArrayImageDataset:
    """Unlabelled base-world images (all labels 0) for methods that need reference data."""
    attrs = world.sample_attributes(params.reference_size, task_rng(params.seed, 0, "reference"))
    return ArrayImageDataset(world.render(attrs, params.image_size), np.zeros(params.reference_size, dtype=np.int64))


@STREAMS.register("demo", DemoStreamParams, help="the offline demo stream: 6 tasks of the demo world and handwritten digits")
def build_demo_stream(params: DemoStreamParams, **context: Any) -> StreamData:
    """Render the demo stream (tasks, control set, reference images, base concepts)."""
    names = params.tasks if params.tasks is not None else list(DEMO_TASK_NAMES)
    tasks = [build_task(spec, params) for spec in DEMO_TASKS if spec.name in names]
    control = control_task(params) if params.control_per_class > 0 else None
    reference = reference_images(params) if params.reference_size > 0 else None
    return StreamData(tasks=tasks, control=control, reference=reference, base_concepts=world.base_concepts())
