"""MTIL vocabularies: ``stream.protocol: zscl`` (default, the ZSCL/GIFT code's class names
and templates) against ``clip_benchmark``, dataset by dataset (docs/mtil_protocols.md).

Tiny copies of torchvision's on-disk layouts are written for the datasets torchvision reads
without checksums: MNIST, EuroSAT, DTD, Caltech101, SUN397 (helpers of test_mtil.py) and
Aircraft, Food, OxfordPet, StanfordCars (here). CIFAR100's and Flowers102's files are
md5-checked, so those two are checked through the name functions only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import get_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.io  # noqa: E402
import torchvision.datasets as tvd  # noqa: E402

from cl_proxyfda.benchmarks import mtil_zscl  # noqa: E402
from cl_proxyfda.benchmarks.mtil import (  # noqa: E402
    DEFAULT_PROTOCOL,
    MTIL_ORDER_I,
    MTILProtocol,
    MTILStreamParams,
    dataset_classnames,
    imagenet_vocabulary,
    mtil_classnames,
    mtil_templates,
)
from cl_proxyfda.errors import ConfigError  # noqa: E402
from cl_proxyfda.registry import STREAMS  # noqa: E402
from mtil_layouts import write_caltech101, write_image, write_mnist  # noqa: E402
from test_mtil import (  # noqa: E402
    PROTOCOL_COUNTS,
    build,
    make_folder_copy,
    write_torchvision_dtd,
    write_torchvision_eurosat,
    write_torchvision_sun397,
)

PROTOCOLS: tuple[str, ...] = get_args(MTILProtocol)
MNIST_ZSCL = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine"]
# The Oxford-IIIT Pet annotation names (image files are "<name>_<n>.jpg").
PET_RAW = (
    "Abyssinian american_bulldog american_pit_bull_terrier basset_hound beagle Bengal Birman Bombay boxer "
    "British_Shorthair chihuahua Egyptian_Mau english_cocker_spaniel english_setter german_shorthaired great_pyrenees "
    "havanese japanese_chin keeshond leonberger Maine_Coon miniature_pinscher newfoundland Persian pomeranian pug "
    "Ragdoll Russian_Blue saint_bernard samoyed scottish_terrier shiba_inu Siamese Sphynx staffordshire_bull_terrier "
    "wheaten_terrier yorkshire_terrier"
).split()
# Real FGVC-Aircraft variant names (of the 100) and Stanford Cars class names (of the 196).
AIRCRAFT_SOME = ["707-320", "A300B4", "Cessna 172", "DHC-1", "F/A-18", "Falcon 2000", "Tu-134"]
CARS_SOME = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "smart fortwo Convertible 2012"]
FOOD_SOME = ["apple_pie", "baby_back_ribs", "eggs_benedict", "french_fries"]


# --------------------------------------------------------------------------- layouts


def write_torchvision_aircraft(root: Path, variants: list[str]) -> None:
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    for split in ("train", "test"):
        rows = []
        for k, v in enumerate(variants):
            image = f"{split[:2]}{k:05d}"
            write_image(data / "images" / f"{image}.jpg", k)
            rows.append(f"{image} {v}")
        (data / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")


def write_torchvision_food(root: Path, classes: list[str]) -> None:
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    for split in ("train", "test"):
        meta = {c: [f"{c}/{split}_{k}"] for k, c in enumerate(classes)}
        for k, c in enumerate(classes):
            write_image(base / "images" / c / f"{split}_{k}.jpg", k)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))


def write_torchvision_pets(root: Path, raw_names: list[str]) -> None:
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    for split in ("trainval", "test"):
        rows = []
        for k, name in enumerate(raw_names):
            image = f"{name}_{1 if split == 'trainval' else 2}"
            write_image(base / "images" / f"{image}.jpg", k)
            rows.append(f"{image} {k + 1} {1 + (k % 2)} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")


def write_torchvision_cars(root: Path, classes: list[str]) -> None:
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(str(base / "devkit" / "cars_meta.mat"), {"class_names": np.array(classes, dtype=object)})
    for split, mat in (("train", base / "devkit" / "cars_train_annos.mat"), ("test", base / "cars_test_annos_withlabels.mat")):
        rows = [(f"{k + 1:05d}.jpg", k + 1) for k in range(len(classes))]
        for name, label in rows:
            write_image(base / f"cars_{split}" / name, label)
        scipy.io.savemat(str(mat), {"annotations": np.array(rows, dtype=[("fname", object), ("class", object)])})


def numbered(some: list[str], n: int, prefix: str) -> list[str]:
    return some + [f"{prefix} {k:03d}" for k in range(n - len(some))]


@pytest.fixture(scope="module")
def mtil_root(tmp_path_factory) -> Path:
    """Nine of the eleven datasets in torchvision's layouts, at their real class counts."""
    root = tmp_path_factory.mktemp("mtil")
    write_torchvision_aircraft(root, numbered(AIRCRAFT_SOME, 100, "Variant"))
    write_caltech101(root, per_class=1)
    write_torchvision_dtd(root, [f"texture_{i:02d}" for i in range(47)])
    write_torchvision_eurosat(root, per_class=1)
    write_torchvision_food(root, numbered(FOOD_SOME, 101, "dish"))
    write_mnist(root, train=10, test=10)
    write_torchvision_pets(root, PET_RAW)
    write_torchvision_cars(root, numbered(CARS_SOME, 196, "Car"))
    write_torchvision_sun397(root)
    return root


LOADABLE = [n for n in MTIL_ORDER_I if n not in ("CIFAR100", "Flowers")]


# --------------------------------------------------------------------------- default


def test_default_protocol_is_zscl(tmp_path: Path) -> None:
    assert DEFAULT_PROTOCOL == "zscl" and PROTOCOLS == ("zscl", "clip_benchmark")
    assert MTILStreamParams(root="x").protocol == "zscl"
    for name in MTIL_ORDER_I:
        assert mtil_templates(name) == mtil_templates(name, "zscl") == mtil_zscl.ZSCL_TEMPLATES[name]
        assert mtil_classnames(name) == mtil_classnames(name, "zscl")
    root = make_folder_copy(tmp_path / "mtil", per_class=1)
    task = STREAMS.build("mtil", {"root": str(root), "format": "image_folder", "tasks": ["MNIST"]}).tasks[0]
    assert task.classnames == MNIST_ZSCL and task.meta["protocol"] == "zscl"
    with pytest.raises(Exception, match="zscl"):
        STREAMS.build("mtil", {"root": str(root), "protocol": "openai"})


# --------------------------------------------------------------------------- differences


def test_templates_differ_only_for_food_and_stanford_cars() -> None:
    differ = {n for n in MTIL_ORDER_I if mtil_templates(n, "zscl") != mtil_templates(n, "clip_benchmark")}
    assert differ == {"Food", "StanfordCars"}
    assert mtil_templates("Food", "zscl") == ["a photo of a {}, a type of food."]
    assert mtil_templates("Food", "clip_benchmark") == ["a photo of {}, a type of food."]
    cars_zscl, cars_cb = mtil_templates("StanfordCars", "zscl"), mtil_templates("StanfordCars", "clip_benchmark")
    assert cars_zscl[0] == "a photo of a {}, a type of car." and cars_cb[0] == "a photo of a {}."
    assert cars_zscl[1:] == cars_cb and (len(cars_zscl), len(cars_cb)) == (9, 8)


def test_zscl_template_lists_as_in_the_zscl_code() -> None:
    counts = {n: len(mtil_templates(n, "zscl")) for n in MTIL_ORDER_I}
    assert counts == {
        "Aircraft": 2, "Caltech101": 34, "CIFAR100": 18, "DTD": 8, "EuroSAT": 3, "Flowers": 1,
        "Food": 1, "MNIST": 1, "OxfordPet": 1, "StanfordCars": 9, "SUN397": 2,
    }  # fmt: skip
    first = {n: mtil_templates(n, "zscl")[0] for n in MTIL_ORDER_I}
    assert first == {
        "Aircraft": "a photo of a {}, a type of aircraft.",
        "Caltech101": "a photo of a {}.",
        "CIFAR100": "a photo of a {}.",
        "DTD": "a photo of a {} texture.",
        "EuroSAT": "a centered satellite photo of {}.",
        "Flowers": "a photo of a {}, a type of flower.",
        "Food": "a photo of a {}, a type of food.",
        "MNIST": 'a photo of the number: "{}".',
        "OxfordPet": "a photo of a {}, a type of pet.",
        "StanfordCars": "a photo of a {}, a type of car.",
        "SUN397": "a photo of a {}.",
    }
    assert mtil_templates("SUN397", "zscl") == ["a photo of a {}.", "a photo of the {}."]
    for name in MTIL_ORDER_I:
        templates = mtil_templates(name, "zscl")
        assert len(set(templates)) == len(templates) and all(t.count("{}") == 1 for t in templates), name


def test_offline_class_names_differ_only_for_flowers_and_mnist() -> None:
    differ = {}
    for name in MTIL_ORDER_I:
        zscl, cb = mtil_classnames(name, "zscl"), mtil_classnames(name, "clip_benchmark")
        assert (zscl is None) == (cb is None), name
        if zscl is not None and zscl != cb:
            differ[name] = [(i, a, b) for i, (a, b) in enumerate(zip(zscl, cb)) if a != b]
    assert differ == {
        "Flowers": [(15, "globe-flower", "globe flower"), (59, "pink-yellow dahlia", "pink and yellow dahlia"), (92, "ball moss", "air plant")],
        "MNIST": [(d, MNIST_ZSCL[d], str(d)) for d in range(10)],
    }
    assert mtil_classnames("MNIST", "zscl") == tvd.MNIST.classes
    # ZSCL's Flowers list is torchvision's but for the "?" torchvision has after "pink-yellow dahlia"
    flowers = mtil_classnames("Flowers", "zscl")
    assert [i for i, (a, b) in enumerate(zip(flowers, tvd.Flowers102.classes)) if a != b] == [59]
    assert tvd.Flowers102.classes[59] == "pink-yellow dahlia?"
    # kept as ZSCL has them, typos included
    caltech = mtil_classnames("Caltech101", "zscl")
    assert caltech[29] == "head of a  crocodile" and caltech[95] == "water lilly"
    assert mtil_classnames("EuroSAT", "zscl")[2] == "brushland or shrubland"
    pets = mtil_classnames("OxfordPet", "zscl")
    assert pets == [" ".join(p.title() for p in raw.split("_")) for raw in PET_RAW]


def test_names_read_from_the_dataset_per_protocol() -> None:
    sun = ["abbey", "apartment_building/outdoor", "bus_interior"]
    assert dataset_classnames("SUN397", sun, "zscl") == ["abbey", "apartment building/outdoor", "bus interior"]
    assert dataset_classnames("SUN397", sun, "clip_benchmark") == ["abbey", "apartment building outdoor", "bus interior"]
    cifar = ["apple", "aquarium_fish", "maple_tree"]
    for protocol in PROTOCOLS:
        assert dataset_classnames("CIFAR100", cifar, protocol) == ["apple", "aquarium fish", "maple tree"]
        assert dataset_classnames("Food", FOOD_SOME, protocol) == [c.replace("_", " ") for c in FOOD_SOME]
        assert dataset_classnames("Aircraft", AIRCRAFT_SOME, protocol) == AIRCRAFT_SOME
        assert dataset_classnames("StanfordCars", CARS_SOME, protocol) == CARS_SOME
    assert dataset_classnames("MNIST", tvd.MNIST.classes, "zscl") == MNIST_ZSCL


def test_imagenet_control_vocabulary_is_zscl_under_both_protocols() -> None:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    names, templates = imagenet_vocabulary("zscl")
    assert (names, templates) == imagenet_vocabulary("clip_benchmark")
    assert len(names) == 1000 and len(templates) == 80 and templates[0] == "a bad photo of a {}."
    assert mtil_zscl.fingerprint(names) == mtil_zscl.IMAGENET_CLASSNAMES_SHA256
    assert mtil_zscl.fingerprint(templates) == mtil_zscl.IMAGENET_TEMPLATES_SHA256
    # GIFT's ImageNet base concepts (open_clip's list) are ZSCL's names too
    assert mtil_zscl.fingerprint(list(IMAGENET_CLASSNAMES)) == mtil_zscl.IMAGENET_CLASSNAMES_SHA256
    assert [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] == templates
    assert mtil_zscl.fingerprint(names[:-1] + ["toilet tissue"]) != mtil_zscl.IMAGENET_CLASSNAMES_SHA256


# --------------------------------------------------------------------------- built streams


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_dataset_builds_with_its_class_count(mtil_root: Path, protocol: str) -> None:
    data = build(root=str(mtil_root), tasks=LOADABLE, protocol=protocol)
    tasks = {t.name: t for t in data.tasks}
    assert list(tasks) == LOADABLE
    for name, task in tasks.items():
        assert task.num_classes == len(task.classnames) == PROTOCOL_COUNTS[name], name
        assert task.templates == mtil_templates(name, protocol), name
        assert task.meta["protocol"] == protocol
        assert set(task.train.targets) | set(task.test.targets) <= set(range(PROTOCOL_COUNTS[name])), name
    for name in ("CIFAR100", "Flowers"):  # md5-checked files: counts of the name lists / templates only
        names = mtil_classnames(name, protocol)
        assert names is None if name == "CIFAR100" else len(names) == PROTOCOL_COUNTS[name]
    zscl = protocol == "zscl"
    assert tasks["MNIST"].classnames == (MNIST_ZSCL if zscl else [str(d) for d in range(10)])
    assert tasks["MNIST"].vocabulary.prompts()[3][0] == ('a photo of the number: "3 - three".' if zscl else 'a photo of the number: "3".')
    assert tasks["SUN397"].classnames[-1] == ("apartment building/outdoor" if zscl else "apartment building outdoor")
    assert tasks["StanfordCars"].vocabulary.prompts()[0][0] == (
        "a photo of a AM General Hummer SUV 2000, a type of car." if zscl else "a photo of a AM General Hummer SUV 2000."
    )
    assert tasks["Aircraft"].classnames[:7] == AIRCRAFT_SOME and tasks["StanfordCars"].classnames[:3] == CARS_SOME
    real_food = [c for c in tasks["Food"].classnames if not c.startswith("dish ")]  # sorted by torchvision
    assert real_food == ["apple pie", "baby back ribs", "eggs benedict", "french fries"]
    assert tasks["OxfordPet"].classnames == mtil_classnames("OxfordPet", protocol)
    assert tasks["Caltech101"].classnames == mtil_classnames("Caltech101", protocol)
    assert tasks["EuroSAT"].classnames == mtil_classnames("EuroSAT", protocol)


def test_zscl_reads_pet_names_from_the_dataset(tmp_path: Path) -> None:
    """As ZSCL does (train_dataset.classes); clip_benchmark uses its own list whatever the files say."""
    raw = [f"breed_{k:02d}" for k in range(37)]
    write_torchvision_pets(tmp_path, raw)
    zscl = build(root=str(tmp_path), tasks=["OxfordPet"]).tasks[0]
    assert zscl.classnames == [f"Breed {k:02d}" for k in range(37)]
    cb = build(root=str(tmp_path), tasks=["OxfordPet"], protocol="clip_benchmark").tasks[0]
    assert cb.classnames == mtil_classnames("OxfordPet", "clip_benchmark") and cb.classnames[0] == "Abyssinian"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_overrides_apply_on_top_of_either_protocol(tmp_path: Path, protocol: str) -> None:
    root = make_folder_copy(tmp_path / "mtil", per_class=1)
    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    args = dict(root=str(root), format="image_folder", tasks=["EuroSAT", "MNIST"], protocol=protocol)
    plain = {t.name: t for t in build(**args).tasks}
    assert plain["EuroSAT"].templates == mtil_templates("EuroSAT", protocol)
    over = {
        t.name: t
        for t in build(**args, templates={"MNIST": ["a digit {}.", "the number {}."]}, classnames={"MNIST": digits}).tasks
    }
    assert over["MNIST"].templates == ["a digit {}.", "the number {}."] and over["MNIST"].classnames == digits
    assert over["MNIST"].vocabulary.prompts()[2][0] == "a digit two."
    assert over["EuroSAT"].templates == plain["EuroSAT"].templates and over["EuroSAT"].classnames == plain["EuroSAT"].classnames
    # torchvision format: template overrides too; class-name overrides stay image_folder only
    tv = tmp_path / "tv"
    write_mnist(tv, train=10, test=10)
    task = build(root=str(tv), tasks=["MNIST"], protocol=protocol, templates={"MNIST": ["digit {}"]}).tasks[0]
    assert task.templates == ["digit {}"] and task.classnames == mtil_classnames("MNIST", protocol)
    with pytest.raises(ConfigError, match="stream.classnames"):
        build(root=str(tv), tasks=["MNIST"], protocol=protocol, classnames={"MNIST": digits})
