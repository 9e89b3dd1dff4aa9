"""MTIL: metadata, orders, templates, splits, and streams built from local files.

Nothing is downloaded: torchvision-format tests write tiny copies of the datasets'
on-disk layouts (tests/mtil_layouts.py, and the EuroSAT, DTD and SUN397 variants below
that test_mtil_protocols.py shares) for torchvision's own dataset classes to read;
CIFAR100 and Flowers102, whose files torchvision checks by md5, are read as image folders.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

import cl_proxyfda.benchmarks  # noqa: F401  (registers the streams)
from cl_proxyfda.benchmarks.mtil import (
    EUROSAT_FOLDERS,
    MTIL_DATASETS,
    MTIL_ORDER_I,
    MTIL_ORDER_II,
    MTILStreamParams,
    TORCHVISION_LOADERS,
    benchmark_classnames,
    build_mtil_stream,
    mtil_classnames,
    mtil_task_names,
    mtil_templates,
    random_split_indices,
)
from cl_proxyfda.errors import ConfigError, UserError
from cl_proxyfda.registry import STREAMS
from mtil_layouts import IMAGE_FOLDER_TASKS, known_classnames, write_caltech101, write_image, write_mnist, write_mtil_copy

PROTOCOL_COUNTS = {
    "Aircraft": 100, "Caltech101": 101, "CIFAR100": 100, "DTD": 47, "EuroSAT": 10, "Flowers": 102,
    "Food": 101, "MNIST": 10, "OxfordPet": 37, "StanfordCars": 196, "SUN397": 397,
}  # fmt: skip
OFFLINE_NAMES = {"Caltech101", "EuroSAT", "Flowers", "MNIST", "OxfordPet"}


def build(**args):
    return build_mtil_stream(MTILStreamParams(**args))


# --------------------------------------------------------------------------- metadata


def test_orders_match_protocol() -> None:
    assert MTIL_ORDER_I == [
        "Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers",
        "Food", "MNIST", "OxfordPet", "StanfordCars", "SUN397",
    ]  # fmt: skip
    assert MTIL_ORDER_II == [
        "StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397",
        "Aircraft", "Caltech101", "DTD", "EuroSAT", "CIFAR100",
    ]  # fmt: skip
    assert sorted(MTIL_ORDER_II) == sorted(MTIL_ORDER_I) == sorted(MTIL_DATASETS)
    assert mtil_task_names("II", ["eurosat", "MNIST"]) == ["MNIST", "EuroSAT"]
    assert mtil_task_names("I", ["mnist", "EuroSAT"]) == ["EuroSAT", "MNIST"]


@pytest.mark.parametrize("protocol", ["zscl", "clip_benchmark"])
def test_class_counts(protocol: str) -> None:
    assert {n: d.num_classes for n, d in MTIL_DATASETS.items()} == PROTOCOL_COUNTS
    for name in MTIL_ORDER_I:
        names = mtil_classnames(name, protocol)
        if name in OFFLINE_NAMES:
            assert names is not None and len(names) == PROTOCOL_COUNTS[name], name
            assert len(set(names)) == len(names), name
        else:  # read from the downloaded torchvision dataset at build time
            assert names is None, name


def test_clip_benchmark_class_names_line_up_with_torchvision() -> None:
    caltech = mtil_classnames("Caltech101", "clip_benchmark")
    assert benchmark_classnames("caltech101")[0] == "background" and "background" not in caltech
    assert caltech[:4] == ["off-center face", "centered face", "leopard", "motorbike"]  # Faces, Faces_easy, ...
    assert caltech[-1] == "yin and yang symbol"
    eurosat = mtil_classnames("EuroSAT", "clip_benchmark")
    assert eurosat[0] == "annual crop land" and eurosat[-1] == "lake or sea" and len(EUROSAT_FOLDERS) == 10
    flowers = mtil_classnames("Flowers", "clip_benchmark")
    differ = [i for i, (a, b) in enumerate(zip(flowers, tvd.Flowers102.classes)) if a != b]
    assert differ == [15, 59, 92]  # CLIP's curated names; same classes, same order
    assert mtil_classnames("MNIST", "clip_benchmark") == [str(d) for d in range(10)]
    pets = mtil_classnames("OxfordPet", "clip_benchmark")
    assert pets[0] == "Abyssinian" and pets[-1] == "Yorkshire Terrier"


@pytest.mark.parametrize("protocol", ["zscl", "clip_benchmark"])
def test_templates(protocol: str) -> None:
    first = {
        "Aircraft": "a photo of a {}, a type of aircraft.",
        "EuroSAT": "a centered satellite photo of {}.",
        "MNIST": 'a photo of the number: "{}".',
        "Flowers": "a photo of a {}, a type of flower.",
        "OxfordPet": "a photo of a {}, a type of pet.",
        "DTD": "a photo of a {} texture.",
        "Food": {"zscl": "a photo of a {}, a type of food.", "clip_benchmark": "a photo of {}, a type of food."}[protocol],
    }
    for name in MTIL_ORDER_I:
        templates = mtil_templates(name, protocol)
        assert templates, name
        for t in templates:
            assert "{}" in t and "{c}" not in t, (name, t)
            assert t.format("x") != t
        assert len(set(templates)) == len(templates), name
        if name in first:
            assert templates[0] == first[name], name
    assert len(mtil_templates("Caltech101", protocol)) == 34 and len(mtil_templates("CIFAR100", protocol)) == 18


def test_random_split_is_torch_random_split() -> None:
    for n in (10, 37, 1001):
        train, test = random_split_indices(n)
        ref = torch.utils.data.random_split(range(n), [int(0.8 * n), n - int(0.8 * n)], torch.Generator().manual_seed(42))
        assert train == list(ref[0].indices) and test == list(ref[1].indices)
        assert sorted(train + test) == list(range(n))
    assert random_split_indices(50) == random_split_indices(50)


def test_every_dataset_has_a_torchvision_loader() -> None:
    assert set(TORCHVISION_LOADERS) == set(MTIL_DATASETS)
    assert STREAMS.get("mtil").params is MTILStreamParams


# --------------------------------------------------------------------------- image folders


def make_folder_copy(root: Path, per_class: int = 3) -> Path:
    """EuroSAT and MNIST as root/NAME/{train,test}/CLASS with their real class names."""
    for split in ("train", "test"):
        for k, name in enumerate(mtil_classnames("EuroSAT")):
            for i in range(per_class):
                write_image(root / "EuroSAT" / split / name.replace(" ", "_") / f"{i}.png", 20 * k + i)
        for k in range(10):
            for i in range(per_class):
                write_image(root / "MNIST" / split / str(k) / f"{i}.png", 20 * k + i, mode="L")
    return root


def test_image_folder_copy_of_two_tasks(tmp_path: Path) -> None:
    root = make_folder_copy(tmp_path / "mtil")
    for order, expected in (("I", ["EuroSAT", "MNIST"]), ("II", ["MNIST", "EuroSAT"])):
        data = STREAMS.build("mtil", {"root": str(root), "format": "image_folder", "order": order, "tasks": ["EuroSAT", "MNIST"]})
        assert [t.name for t in data.tasks] == expected
        assert data.control is None
    eurosat, mnist = build(root=str(root), format="image_folder", tasks=["MNIST", "EuroSAT"]).tasks
    assert eurosat.classnames == mtil_classnames("EuroSAT") and mnist.classnames == tvd.MNIST.classes  # zscl: "0 - zero", ...
    assert eurosat.templates == mtil_templates("EuroSAT") and mnist.templates == mtil_templates("MNIST")
    assert eurosat.vocabulary.prompts()[1][0] == "a centered satellite photo of forest."
    # labels follow the canonical class order, not the sorted folder names
    for ds in (eurosat.train, eurosat.test):
        for path, label in zip(ds.paths, ds.targets):
            assert path.parent.name.replace("_", " ") == eurosat.classnames[label]
    image, label = mnist.test[7]
    assert image.mode == "RGB" and label == 2 and np.asarray(image)[0, 0, 0] == 20 * 2 + 1
    assert (len(eurosat.train), len(eurosat.test)) == (30, 30)


def test_image_folder_with_torchvision_folder_names(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for k, folder in enumerate(EUROSAT_FOLDERS):
            write_image(tmp_path / "EuroSAT" / split / folder / "0.png", k)
    task = build(root=str(tmp_path), format="image_folder", tasks=["EuroSAT"], folder_classes="sorted").tasks[0]
    assert task.classnames == mtil_classnames("EuroSAT")
    assert [p.parent.name for p in task.test.paths] == EUROSAT_FOLDERS and task.test.targets == list(range(10))
    with pytest.raises(UserError, match="match no known class name"):
        build(root=str(tmp_path), format="image_folder", tasks=["EuroSAT"])


def test_image_folder_class_count_checks(tmp_path: Path) -> None:
    root = make_folder_copy(tmp_path / "mtil", per_class=1)
    for split in ("train", "test"):
        (root / "EuroSAT" / split / "river").rename(root / "EuroSAT" / split / "x")
        for c in ("banded", "bubbly", "zigzagged"):
            write_image(root / "DTD" / split / c / "0.png", 1)
    with pytest.raises(UserError, match=r"EuroSAT.*class folders \['x'\] match no known class name"):
        build(root=str(root), format="image_folder", tasks=["EuroSAT"])
    with pytest.raises(UserError, match="has 3 classes, expected 47"):
        build(root=str(root), format="image_folder", tasks=["DTD"])
    with pytest.raises(UserError, match=r"stream.tasks: task folder .*/Food does not exist"):
        build(root=str(root), format="image_folder", tasks=["MNIST", "Food"])


def test_few_shot_determinism_and_too_many_shots(tmp_path: Path) -> None:
    root = make_folder_copy(tmp_path / "mtil", per_class=4)
    args = dict(root=str(root), format="image_folder", tasks=["EuroSAT", "MNIST"], shots=2)
    a = build(**args, seed=3).tasks
    b = build(**args, seed=3).tasks
    c = build(**args, seed=4).tasks
    assert [t.train.indices for t in a] == [t.train.indices for t in b]
    assert [t.train.indices for t in a] != [t.train.indices for t in c]
    for task in a:
        assert np.bincount(task.train.targets).tolist() == [2] * 10
        assert len(task.test) == 40
    with pytest.raises(UserError, match=r"stream.shots: 5 shots per class.*'EuroSAT'.*only 4"):
        build(**{**args, "shots": 5})


def test_config_errors(tmp_path: Path) -> None:
    root = make_folder_copy(tmp_path / "mtil", per_class=1)
    with pytest.raises(ConfigError, match="unknown MTIL task 'ImageNet'"):
        build(root=str(root), tasks=["EuroSAT", "ImageNet"])
    with pytest.raises(ConfigError, match="duplicate"):
        build(root=str(root), tasks=["EuroSAT", "eurosat"])
    with pytest.raises(ConfigError, match=r"stream.templates.MNIST\[0\]"):
        build(root=str(root), format="image_folder", tasks=["MNIST"], templates={"MNIST": ["digit"]})
    with pytest.raises(ConfigError, match="stream.templates"):
        build(root=str(root), format="image_folder", tasks=["MNIST"], templates={"DTD": ["a {}."]})
    task = build(root=str(root), format="image_folder", tasks=["MNIST"], templates={"MNIST": ["a digit {}."]}).tasks[0]
    assert task.templates == ["a digit {}."]
    with pytest.raises(UserError, match="stream.root.*download"):
        build(root=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"MNIST: torchvision could not load.*stream.download: true"):
        build(root=str(tmp_path / "empty"), tasks=["MNIST"])


# --------------------------------------------------------------------------- torchvision layouts


def write_torchvision_eurosat(root: Path, per_class: int = 5) -> None:
    for k, folder in enumerate(EUROSAT_FOLDERS):
        for i in range(per_class):
            write_image(root / "eurosat" / "2750" / folder / f"{folder}_{i}.jpg", 20 * k)


def write_torchvision_dtd(root: Path, classes: list[str]) -> dict[str, list[str]]:
    """DTD with one image per class in each of partition 1's splits; returns the split files' lines."""
    base = root / "dtd" / "dtd"
    lines: dict[str, list[str]] = {"train1": [], "val1": [], "test1": []}
    for k, c in enumerate(classes):
        for split in lines:
            write_image(base / "images" / c / f"{c}_{split}.jpg", k)
            lines[split].append(f"{c}/{c}_{split}.jpg")
    (base / "labels").mkdir()
    for split, rows in lines.items():
        (base / "labels" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return lines


def write_torchvision_sun397(root: Path) -> list[str]:
    """SUN397 with one image per class; the last class is a two-level one. Returns ClassName.txt's lines."""
    base = root / "SUN397"
    raw = [f"/{chr(97 + k % 26)}/class_{k:03d}" for k in range(396)] + ["/a/apartment_building/outdoor"]
    for k, c in enumerate(raw):
        write_image(base / c.strip("/") / f"sun_{k:04d}.jpg", k)
    (base / "ClassName.txt").write_text("\n".join(raw) + "\n")
    return raw


def test_torchvision_mnist(tmp_path: Path) -> None:
    write_mnist(tmp_path, train=30, test=20)
    data = build(root=str(tmp_path), tasks=["MNIST"])
    task = data.tasks[0]
    assert task.name == "MNIST" and task.classnames == ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
                                                        "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine"]
    assert (len(task.train), len(task.test)) == (30, 20) and task.test.targets[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    image, label = task.test[13]
    assert image.mode == "RGB" and image.size == (28, 28) and label == 3 and 60 <= np.asarray(image)[5, 5, 0] <= 62
    few = build(root=str(tmp_path), tasks=["MNIST"], shots=2, seed=0).tasks[0]
    assert np.bincount(few.train.targets).tolist() == [2] * 10


def test_torchvision_eurosat_random_split(tmp_path: Path) -> None:
    write_torchvision_eurosat(tmp_path)
    task = build(root=str(tmp_path), tasks=["EuroSAT"]).tasks[0]
    assert task.classnames == mtil_classnames("EuroSAT")
    assert (len(task.train), len(task.test)) == (40, 10)
    train_idx, test_idx = random_split_indices(50)
    assert task.train.indices == train_idx and task.test.indices == test_idx
    for i in range(len(task.test)):
        image, label = task.test[i]
        assert abs(int(np.asarray(image)[2, 2, 0]) - 20 * label) <= 3  # the image of that class (JPEG noise)


def test_torchvision_dtd_names_from_dataset(tmp_path: Path) -> None:
    base = tmp_path / "dtd" / "dtd"
    classes = [f"texture_{i:02d}" for i in range(47)]
    lines = write_torchvision_dtd(tmp_path, classes)
    task = build(root=str(tmp_path), tasks=["DTD"]).tasks[0]
    assert task.classnames == [c.replace("_", " ") for c in classes]
    assert task.templates[0] == "a photo of a {} texture."
    assert (len(task.train), len(task.test)) == (47, 47) and task.test.targets == list(range(47))
    # one class short: the class count check fires at build time
    (base / "labels" / "train1.txt").write_text("\n".join(lines["train1"][:-1]) + "\n")
    (base / "labels" / "test1.txt").write_text("\n".join(lines["test1"][:-1]) + "\n")
    with pytest.raises(UserError, match="DTD: 46 class names, expected 47"):
        build(root=str(tmp_path), tasks=["DTD"])


def test_torchvision_caltech101_drops_background(tmp_path: Path) -> None:
    write_caltech101(tmp_path, per_class=2)
    task = build(root=str(tmp_path), tasks=["Caltech101"]).tasks[0]
    assert task.classnames == benchmark_classnames("caltech101")[1:] and len(task.classnames) == 101
    assert (len(task.train), len(task.test)) == (161, 41)
    assert sorted(task.train.indices + task.test.indices) == list(range(202))
    image, label = task.test[0]
    assert image.mode == "RGB" and abs(int(np.asarray(image)[1, 1, 0]) - 2 * (label + 1)) <= 3


def test_torchvision_sun397_names_and_stable_split(tmp_path: Path) -> None:
    write_torchvision_sun397(tmp_path)
    task = build(root=str(tmp_path), tasks=["SUN397"]).tasks[0]
    assert len(task.classnames) == 397 and task.classnames[-1] == "apartment building/outdoor"  # zscl keeps the "/"
    assert task.classnames[5] == "class 005"
    assert (len(task.train), len(task.test)) == (317, 80)
    again = build(root=str(tmp_path), tasks=["SUN397"]).tasks[0]
    assert task.test.indices == again.test.indices
    image, label = task.test[0]
    assert label == task.test.targets[0] and image.mode == "RGB"


def test_imagenet_control(tmp_path: Path) -> None:
    root = make_folder_copy(tmp_path / "mtil", per_class=1)
    val = tmp_path / "imagenet" / "val"
    for k in range(1000):
        write_image(val / f"n{k:08d}" / "0.png", k)
    data = build(root=str(root), format="image_folder", tasks=["MNIST"], control=str(tmp_path / "imagenet"), control_limit=50)
    control = data.control
    assert control is not None and control.name == "ImageNet"
    assert len(control.classnames) == 1000 and control.classnames[0] == "tench"
    assert len(control.templates) == 80 and control.templates[0] == "a bad photo of a {}."
    assert (len(control.train), len(control.test)) == (0, 50)
    assert data.base_concepts == control.classnames
    (val / "n00000999" / "0.png").unlink()
    (val / "n00000999").rmdir()
    with pytest.raises(UserError, match="999 class folders, expected 1000"):
        build(root=str(root), format="image_folder", tasks=["MNIST"], control=str(tmp_path / "imagenet"))


def test_every_task_from_one_mixed_root(tmp_path: Path) -> None:
    """All 11 layouts in one root: torchvision's classes read 9, image folders CIFAR100 and Flowers."""
    args = write_mtil_copy(tmp_path / "mtil", per_class=2)
    assert args["formats"] == {"CIFAR100": "image_folder", "Flowers": "image_folder"}
    data = build(**args)
    assert [t.name for t in data.tasks] == MTIL_ORDER_I
    for task in data.tasks:
        assert len(task.classnames) == PROTOCOL_COUNTS[task.name], task.name
        assert task.meta["format"] == ("image_folder" if task.name in IMAGE_FOLDER_TASKS else "torchvision"), task.name
        assert task.templates == mtil_templates(task.name)
        labels = task.train.targets + task.test.targets
        assert min(labels) >= 0 and max(labels) < len(task.classnames)
    by_name = {t.name: t for t in data.tasks}
    # class names read through torchvision from the written metadata (variants.txt,
    # Food's meta JSON, StanfordCars' cars_meta.mat, SUN397's ClassName.txt)
    for name in ("Aircraft", "Food", "StanfordCars", "SUN397", "DTD", "CIFAR100"):
        assert by_name[name].classnames == known_classnames(name), name
    cars = by_name["StanfordCars"]
    assert cars.classnames[0] == "AM General Hummer SUV 2000" and (len(cars.train), len(cars.test)) == (392, 392)
    assert sorted(cars.test.targets) == sorted(list(range(196)) * 2)
    pets = by_name["OxfordPet"]
    assert pets.test.base.classes == mtil_classnames("OxfordPet")  # torchvision's names from the image ids
    image, label = by_name["Aircraft"].test[5]
    assert image.mode == "RGB" and label == 2 and np.asarray(image)[0, 0, 0] == 2
    with pytest.raises(ConfigError, match=r"stream.formats.*\['DTD'\]"):
        build(**{**args, "tasks": ["MNIST"], "formats": {"DTD": "image_folder"}})
    two = {"tasks": ["MNIST", "CIFAR100"], "formats": {"CIFAR100": "image_folder"}}
    with pytest.raises(ConfigError, match="stream.classnames: class-name overrides apply to format: image_folder only"):
        build(**{**args, **two, "classnames": {"MNIST": [str(d) for d in range(10)]}})
    cifar = build(**{**args, **two, "classnames": {"CIFAR100": [f"c{k}" for k in range(100)]}}).tasks[0]
    assert cifar.classnames[:2] == ["c0", "c1"]
