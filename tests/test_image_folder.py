"""The image-folder stream: layout, class names, templates, laziness, few-shot, errors."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

import cl_proxyfda.benchmarks  # noqa: F401  (registers the streams)
from cl_proxyfda.benchmarks.image_folder import ImageFolderStreamParams, build_image_folder_stream
from cl_proxyfda.errors import ConfigError, UserError
from cl_proxyfda.registry import STREAMS


def write_image(path: Path, value: int, mode: str = "RGB", fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = np.full((6, 6, channels), value, dtype=np.uint8).squeeze()
    Image.fromarray(array, mode=mode).save(path, format=fmt)


def make_tree(root: Path, tasks: dict[str, list[str]], per_class: int = 3, splits=("train", "test")) -> Path:
    """root/TASK/SPLIT/CLASS/i.png with grey level 10 * class index + i."""
    for task, classes in tasks.items():
        for split in splits:
            for k, cls in enumerate(classes):
                for i in range(per_class):
                    write_image(root / task / split / cls / f"{i}.png", 10 * k + i)
    return root


def build(**args):
    return build_image_folder_stream(ImageFolderStreamParams(**args))


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return make_tree(
        tmp_path / "data",
        {"shapes": ["red_circle", "blue_square"], "animals": ["cat", "dog", "sea_lion"], "base": ["tree", "car"]},
    )


def test_stream_from_folders(tree: Path) -> None:
    data = build(root=str(tree), tasks=["shapes", "animals"], control="base")
    assert [t.name for t in data.tasks] == ["shapes", "animals"]
    shapes, animals = data.tasks
    # sorted folders, "_" read as a space
    assert shapes.classnames == ["blue square", "red circle"]
    assert animals.classnames == ["cat", "dog", "sea lion"]
    assert shapes.templates == ["a photo of a {}."]
    assert (len(shapes.train), len(shapes.test), len(animals.train)) == (6, 6, 9)
    assert animals.train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    image, label = animals.test[4]  # dog/1.png: grey 10 * 1 + 1
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (6, 6)
    assert label == 1 and np.asarray(image)[0, 0].tolist() == [11, 11, 11]
    # control set: evaluated, never trained; its classes are the base concepts
    assert data.control is not None and data.control.name == "base"
    assert data.control.classnames == ["car", "tree"] and len(data.control.test) == 6
    assert data.base_concepts == ["car", "tree"]
    assert data.reference is None


def test_default_task_order_excludes_control(tree: Path) -> None:
    data = build(root=str(tree), control="base")
    assert [t.name for t in data.tasks] == ["animals", "shapes"]
    data = build(root=str(tree))
    assert [t.name for t in data.tasks] == ["animals", "base", "shapes"]


def test_templates_and_classname_overrides(tree: Path) -> None:
    data = build(
        root=str(tree),
        tasks=["shapes", "animals"],
        templates=["a drawing of a {}.", "itap of a {c}."],
        task_templates={"animals": ["a photo of a {}, a type of animal."]},
        classnames={"shapes": ["blue box", "red ball"], "animals": {"cat": "kitten", "dog": "puppy", "sea_lion": "seal"}},
    )
    shapes, animals = data.tasks
    assert shapes.templates == ["a drawing of a {}.", "itap of a {}."]
    assert animals.templates == ["a photo of a {}, a type of animal."]
    assert shapes.classnames == ["blue box", "red ball"]
    assert animals.classnames == ["kitten", "puppy", "seal"]
    assert animals.vocabulary.prompts()[2][0] == "a photo of a seal, a type of animal."


def test_images_are_read_lazily_and_converted(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"t": ["a", "b"]}, per_class=1)
    write_image(root / "t" / "train" / "b" / "grey.jpg", 200, mode="L")
    write_image(root / "t" / "train" / "b" / "alpha.webp", 90, mode="RGBA")
    task = build(root=str(root)).tasks[0]
    assert [p.name for p in task.train.paths] == ["0.png", "0.png", "alpha.webp", "grey.jpg"]
    for i in range(4):
        assert task.train[i][0].mode == "RGB"
    # the file is opened at access time, not at build time
    write_image(root / "t" / "train" / "a" / "0.png", 77)
    assert np.asarray(task.train[0][0])[0, 0].tolist() == [77, 77, 77]


def test_truncated_image_fails_at_load_naming_the_file(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"t": ["a"]}, per_class=1)
    big = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path = root / "t" / "train" / "a" / "big.jpg"
    Image.fromarray(big).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # header intact: verify() passes
    task = build(root=str(root)).tasks[0]
    with pytest.raises(UserError, match="big.jpg"):
        task.train[1]


def test_few_shot_is_seeded_and_exact(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"t": ["a", "b", "c"]}, per_class=8)
    a = build(root=str(root), shots=3, seed=1).tasks[0]
    b = build(root=str(root), shots=3, seed=1).tasks[0]
    c = build(root=str(root), shots=3, seed=2).tasks[0]
    assert a.train.indices == b.train.indices
    assert a.train.indices != c.train.indices
    assert np.bincount(a.train.targets).tolist() == [3, 3, 3]
    assert len(a.test) == 24  # the test split is untouched
    picked = [a.train[i][0] for i in range(len(a.train))]
    assert [np.asarray(im)[0, 0, 0] // 10 for im in picked] == a.train.targets


def test_limits(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"t": ["a", "b"]}, per_class=5)
    task = build(root=str(root), train_limit=4, test_limit=3, seed=0).tasks[0]
    assert (len(task.train), len(task.test)) == (4, 3)
    again = build(root=str(root), train_limit=4, test_limit=3, seed=0).tasks[0]
    assert task.test.indices == again.test.indices


def test_registered_and_strict(tree: Path) -> None:
    data = STREAMS.build("image_folder", {"root": str(tree), "tasks": ["shapes"]})
    assert [t.name for t in data.tasks] == ["shapes"]
    with pytest.raises(ValidationError):
        ImageFolderStreamParams(root=str(tree), shot=5)
    with pytest.raises(ValidationError):
        ImageFolderStreamParams(root=str(tree), shots=0)


def _break(root: Path, what: str) -> dict:
    """Damage a fresh two-task tree; return the builder arguments that hit the damage."""
    make_tree(root, {"t1": ["a", "b"], "t2": ["c", "d"]}, per_class=2)
    args = {"root": str(root)}
    if what == "missing root":
        args["root"] = str(root / "nowhere")
    elif what == "missing task":
        args["tasks"] = ["t1", "t3"]
    elif what == "no train":
        for f in (root / "t2" / "train").rglob("*"):
            if f.is_file():
                f.unlink()
        for d in sorted((root / "t2" / "train").rglob("*"), reverse=True):
            d.rmdir()
        (root / "t2" / "train").rmdir()
    elif what == "no test":
        (root / "t2" / "test").rename(root / "t2" / "val")
    elif what == "no class folders":
        for f in (root / "t1" / "test").rglob("*.png"):
            f.rename(root / "t1" / "test" / f"{f.parent.name}_{f.name}")
        for d in (root / "t1" / "test").iterdir():
            if d.is_dir():
                d.rmdir()
    elif what == "empty class":
        for f in (root / "t1" / "train" / "b").iterdir():
            f.rename(root / "t1" / "train" / "b" / (f.name + ".txt"))
    elif what == "class sets differ":
        (root / "t2" / "test" / "d").rename(root / "t2" / "test" / "e")
    elif what == "zero-byte image":
        (root / "t1" / "train" / "a" / "0.png").write_bytes(b"")
    elif what == "unreadable image":
        (root / "t1" / "test" / "b" / "1.png").write_bytes(b"this is not an image")
    elif what == "too many shots":
        args["shots"] = 3
    elif what == "duplicate task":
        args["tasks"] = ["t1", "t2", "t1"]
    elif what == "template without placeholder":
        args["templates"] = ["a photo of a {}.", "a photo."]
    elif what == "template with two placeholders":
        args["templates"] = ["a {} of a {}."]
    elif what == "classnames of wrong length":
        args["classnames"] = {"t1": ["only one"]}
    elif what == "classnames of unknown task":
        args["classnames"] = {"t9": ["x", "y"]}
    elif what == "control is a task":
        args.update(tasks=["t1", "t2"], control="t2")
    return args


ERRORS = {
    # case: text the one-line message must contain (paths are checked relative to the tree)
    "missing root": ["stream.root", "nowhere"],
    "missing task": ["stream.tasks", "t3"],
    "no train": ["missing split folder", "t2/train"],
    "no test": ["missing split folder", "t2/test"],
    "no class folders": ["no class folders", "t1/test"],
    "empty class": ["has no images", "t1/train/b"],
    "class sets differ": ["differ", "only in train: ['d']", "only in test: ['e']"],
    "zero-byte image": ["0 bytes", "t1/train/a/0.png"],
    "unreadable image": ["unreadable image", "t1/test/b/1.png"],
    "too many shots": ["stream.shots", "'t1'", "only 2"],
    "duplicate task": ["stream.tasks", "duplicate", "t1"],
    "template without placeholder": ["stream.templates[1]", "'a photo.'"],
    "template with two placeholders": ["stream.templates[0]"],
    "classnames of wrong length": ["stream.classnames.t1", "1 class names given for 2"],
    "classnames of unknown task": ["stream.classnames", "t9"],
    "control is a task": ["stream.control", "t2"],
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_name_the_problem(tmp_path: Path, case: str) -> None:
    args = _break(tmp_path / "data", case)
    with pytest.raises(UserError) as info:
        build(**args)
    message = str(info.value)
    assert "\n" not in message
    for part in ERRORS[case]:
        assert part in message, (case, message)


def test_config_errors_are_config_errors(tmp_path: Path) -> None:
    args = _break(tmp_path / "data", "template without placeholder")
    with pytest.raises(ConfigError) as info:
        build(**args)
    assert info.value.path == "stream.templates[1]"


def test_feeds_an_avalanche_benchmark(tmp_path: Path) -> None:
    import torchvision.transforms as T

    from cl_proxyfda.benchmarks.stream import to_avalanche

    root = make_tree(tmp_path, {"a": ["x", "y"], "b": ["u", "v", "w"]}, per_class=2)
    data = build(root=str(root), shots=1, seed=0)
    bench = to_avalanche(data.tasks, T.ToTensor(), T.ToTensor())
    assert len(bench.train_stream) == 2 and len(bench.train_stream[1].dataset) == 3
    x, y, t = bench.train_stream[1].dataset[2]
    assert tuple(x.shape) == (3, 6, 6) and (y, t) == (2, 1)
    x, y, t = bench.test_stream[0].dataset[3]
    assert (y, t) == (1, 0) and abs(float(x[0, 0, 0]) * 255 - 11) < 0.5  # y/1.png: grey 11
