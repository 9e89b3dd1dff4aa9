"""Miniature copies of the 11 MTIL datasets' on-disk layouts, for torchvision's own
dataset classes to read (shared by the MTIL tests).

Each writer lays out the files torchvision's class checks and parses (folder names,
annotation text/JSON/.mat files, MNIST idx files) with a few tiny images per class.
CIFAR100 and Flowers102, whose files torchvision checks by md5, are written as
``root/NAME/{train,test}/CLASS`` image folders (the ``mtil`` stream's per-task
``formats``). Class names are the real ones: read from clip-benchmark where the stream
knows them offline, else from ``tests/data/mtil_classnames.json`` (CLIP's lists,
openai/CLIP ``data/prompts.md``), turned back into each dataset's raw folder names.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from cl_proxyfda.benchmarks.mtil import EUROSAT_FOLDERS, MTIL_ORDER_I, mtil_classnames

DATA = Path(__file__).parent / "data"
IMAGE_FOLDER_TASKS = ("CIFAR100", "Flowers")  # md5-checked by torchvision: written as image folders


def known_classnames(name: str) -> list[str]:
    """The real class names of an MTIL dataset (offline ones first, else CLIP's lists)."""
    names = mtil_classnames(name)
    if names is not None:
        return names
    return list(json.loads((DATA / "mtil_classnames.json").read_text(encoding="utf-8"))["classnames"][name])


def write_image(path: Path, value: int, size: int = 6, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(np.full(shape, value % 256, dtype=np.uint8), mode=mode).save(path)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file (big-endian header, uint8 payload)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    magic = 0x0800 + array.ndim  # 0x08 = unsigned byte
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _folder(name: str) -> str:
    return name.replace(" ", "_").replace("/", "_")


def write_mnist(root: Path, train: int = 20, test: int = 10) -> None:
    raw = root / "MNIST" / "raw"
    for prefix, n in (("train", train), ("t10k", test)):
        labels = np.arange(n) % 10
        images = np.repeat(labels[:, None, None] * 20, 28 * 28, axis=1).reshape(n, 28, 28)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def write_eurosat(root: Path, per_class: int = 2) -> None:
    for k, folder in enumerate(EUROSAT_FOLDERS):
        for i in range(per_class):
            write_image(root / "eurosat" / "2750" / folder / f"{folder}_{i}.jpg", 20 * k + i)


def write_caltech101(root: Path, per_class: int = 1) -> None:
    base = root / "caltech101" / "101_ObjectCategories"
    # torchvision sorts the folders; any 101 names in the real ones' order will do
    for k, folder in enumerate(["BACKGROUND_Google"] + [f"c{k:03d}" for k in range(101)]):
        for i in range(per_class):
            write_image(base / folder / f"image_{i + 1:04d}.jpg", 2 * k, mode="L")


def write_dtd(root: Path, classes: Sequence[str], per_split: int = 1) -> None:
    base = root / "dtd" / "dtd"
    lines: dict[str, list[str]] = {"train1": [], "val1": [], "test1": []}
    for k, c in enumerate(classes):
        for split in lines:
            for i in range(per_split):
                write_image(base / "images" / c / f"{c}_{split}_{i}.jpg", k)
                lines[split].append(f"{c}/{c}_{split}_{i}.jpg")
    (base / "labels").mkdir(parents=True, exist_ok=True)
    for split, rows in lines.items():
        (base / "labels" / f"{split}.txt").write_text("\n".join(rows) + "\n")


def write_sun397(root: Path, names: Sequence[str], per_class: int = 1) -> None:
    base = root / "SUN397"
    raw = [f"/{n[0]}/{_folder(n)}" for n in names]
    for k, c in enumerate(raw):
        for i in range(per_class):
            write_image(base / c.strip("/") / f"sun_{k:04d}_{i}.jpg", k)
    (base / "ClassName.txt").write_text("\n".join(raw) + "\n")


def write_aircraft(root: Path, variants: Sequence[str], per_split: int = 1) -> None:
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    for split in ("train", "val", "test", "trainval"):
        rows = []
        for k, v in enumerate(variants):
            for i in range(per_split):
                image_id = f"{split}{k:03d}{i}"
                write_image(data / "images" / f"{image_id}.jpg", k)
                rows.append(f"{image_id} {v}")
        (data / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")


def write_food(root: Path, names: Sequence[str], per_split: int = 1) -> None:
    base = root / "food-101"
    (base / "meta").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        meta = {}
        for k, n in enumerate(names):
            folder = _folder(n)
            meta[folder] = [f"{folder}/{split}{i}" for i in range(per_split)]
            for rel in meta[folder]:
                write_image(base / "images" / f"{rel}.jpg", k)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))


def write_pets(root: Path, names: Sequence[str], per_split: int = 1) -> None:
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("trainval", "test"):
        rows = []
        for k, n in enumerate(names):
            breed = n.replace(" ", "_")  # torchvision title-cases the image id's breed part
            for i in range(per_split):
                image_id = f"{breed}_{split}{i}"
                write_image(base / "images" / f"{image_id}.jpg", k)
                rows.append(f"{image_id} {k + 1} 1 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")


def write_cars(root: Path, names: Sequence[str], per_split: int = 1) -> None:
    import scipy.io as sio

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(list(names), dtype=object)})
    for split, folder, annos in (
        ("train", "cars_train", base / "devkit" / "cars_train_annos.mat"),
        ("test", "cars_test", base / "cars_test_annos_withlabels.mat"),
    ):
        records = np.zeros((len(names) * per_split,), dtype=[("fname", object), ("class", object)])
        for k in range(len(names)):
            for i in range(per_split):
                fname = f"{split}_{k:03d}_{i}.jpg"
                write_image(base / folder / fname, k)
                records[k * per_split + i] = (fname, k + 1)
        sio.savemat(annos, {"annotations": records})


def write_image_folder_task(root: Path, name: str, classes: Sequence[str], per_split: int = 1) -> None:
    for split in ("train", "test"):
        for k, c in enumerate(classes):
            for i in range(per_split):
                write_image(root / name / split / _folder(c) / f"{i}.png", k)


def write_mtil_copy(root: Path, tasks: Sequence[str] = MTIL_ORDER_I, per_class: int = 1) -> dict[str, Any]:
    """Write the chosen MTIL tasks under ``root``; returns the ``mtil`` stream arguments.

    ``per_class`` images per class and split (per class in total for the random-split
    datasets Caltech101, EuroSAT and SUN397, at least 2 for EuroSAT; MNIST gets 2 per
    class for training and 1 for testing).
    """
    writers = {
        "Aircraft": lambda: write_aircraft(root, known_classnames("Aircraft"), per_class),
        "Caltech101": lambda: write_caltech101(root, per_class),
        "CIFAR100": lambda: write_image_folder_task(root, "CIFAR100", known_classnames("CIFAR100"), per_class),
        "DTD": lambda: write_dtd(root, known_classnames("DTD"), per_class),
        "EuroSAT": lambda: write_eurosat(root, max(2, per_class)),
        "Flowers": lambda: write_image_folder_task(root, "Flowers", known_classnames("Flowers"), per_class),
        "Food": lambda: write_food(root, known_classnames("Food"), per_class),
        "MNIST": lambda: write_mnist(root, 20 * per_class, 10 * per_class),
        "OxfordPet": lambda: write_pets(root, known_classnames("OxfordPet"), per_class),
        "StanfordCars": lambda: write_cars(root, known_classnames("StanfordCars"), per_class),
        "SUN397": lambda: write_sun397(root, known_classnames("SUN397"), per_class),
    }
    for name in tasks:
        writers[name]()
    return {
        "root": str(root),
        "tasks": list(tasks),
        "format": "torchvision",
        "formats": {n: "image_folder" for n in tasks if n in IMAGE_FOLDER_TASKS},
    }
