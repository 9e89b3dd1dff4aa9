"""MTIL: the 11-dataset multi-domain task-incremental stream (orders I and II).

Vocabularies (class names and templates; ``stream.protocol``), nothing downloaded:

- ``zscl`` **[default]**: exactly as the official ZSCL code, which GIFT's official code
  reuses, so that zero-shot Transfer compares with the published tables. The lists are in
  :mod:`cl_proxyfda.benchmarks.mtil_zscl`. Templates in ZSCL's order (the first is the
  training prompt); hard-coded class names for Caltech101, EuroSAT and Flowers; the others
  read from the torchvision dataset at build time with ``_`` replaced by a space, as ZSCL
  does (MNIST: ``"0 - zero"``..., SUN397: ``"apartment building/outdoor"``).
- ``clip_benchmark``: clip-benchmark's ``en_zeroshot_classification_templates.json``
  (``{c}`` rewritten as ``{}``; Aircraft's, EuroSAT's and MNIST's training prompt (docs/protocol.md) forced
  first, as clip-benchmark 1.6.2 already lists them) and ``en_classnames.json`` for
  Caltech101 (minus the leading "background": torchvision drops BACKGROUND_Google),
  EuroSAT, Flowers (CLIP's curated names), MNIST (``"0"``...) and OxfordPet; Aircraft and
  StanfordCars as torchvision names them, CIFAR100, DTD and Food with ``_`` -> space,
  SUN397 with ``_`` and ``/`` -> space.

The differences, dataset by dataset and with their sources, are in docs/mtil_protocols.md
(Food's and StanfordCars' templates, MNIST's, Flowers' and SUN397's class names). The
ImageNet control set has the same 1000 names and 80 templates under both (checked
against ZSCL's by fingerprint). ``stream.templates`` and ``stream.classnames`` override
either protocol per task. Class counts are checked when a dataset is built.

Splits with ``format: torchvision``: the official train/test splits (OxfordPet
trainval/test, Aircraft variant train/test, DTD partition 1 train/test, Flowers102
train/test with labels checked to be 0..101); Caltech101, EuroSAT and SUN397 use the
split of ``torch.utils.data.random_split(ds, [int(0.8 n), n - int(0.8 n)],
Generator().manual_seed(42))`` as in ZSCL (SUN397's files are sorted by path first,
since torchvision lists them in file-system order). With ``format: image_folder`` each
dataset is read from ``root/NAME/{train,test}/CLASS`` (NAME as in ``MTIL_ORDER_I``);
for datasets with offline class names the folders are matched to them (by name, by
index, or by sorted position with ``folder_classes: sorted``). ``formats`` sets the
format per task, for a root that holds both kinds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import clip_benchmark
import torch
import torchvision.datasets as tvd
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from cl_proxyfda.benchmarks import mtil_zscl
from cl_proxyfda.benchmarks.image_folder import (
    ClassNames,
    ImageFileDataset,
    check_templates,
    empty_dataset,
    folder_task,
    limit_indices,
    scan_split,
    subsample_task,
)
from cl_proxyfda.benchmarks.stream import StreamData, Subset, Task, dataset_targets
from cl_proxyfda.errors import ConfigError, UserError
from cl_proxyfda.registry import STREAMS

MTIL_ORDER_I = [
    "Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers",
    "Food", "MNIST", "OxfordPet", "StanfordCars", "SUN397",
]  # fmt: skip
MTIL_ORDER_II = [
    "StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397",
    "Aircraft", "Caltech101", "DTD", "EuroSAT", "CIFAR100",
]  # fmt: skip
MTIL_ORDERS = {"I": MTIL_ORDER_I, "II": MTIL_ORDER_II}

# Folder names of torchvision's EuroSAT (2750/CLASS), in label order.
EUROSAT_FOLDERS = [
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
]  # fmt: skip

MTILProtocol = Literal["zscl", "clip_benchmark"]
DEFAULT_PROTOCOL: MTILProtocol = "zscl"

SPLIT_SEED = 42
TRAIN_FRACTION = 0.8


@dataclass(frozen=True)
class MTILDatasetInfo:
    """What the stream knows about one MTIL dataset."""

    name: str
    num_classes: int
    benchmark_key: str  # key in clip-benchmark's JSON files
    split: str  # how train/test are made with format: torchvision
    first_template: str | None = None  # the training prompt docs/protocol.md names


MTIL_DATASETS: dict[str, MTILDatasetInfo] = {
    d.name: d
    for d in [
        MTILDatasetInfo("Aircraft", 100, "fgvc_aircraft", "train/test (variant)", "a photo of a {}, a type of aircraft."),
        MTILDatasetInfo("Caltech101", 101, "caltech101", "random 80/20 (seed 42)"),
        MTILDatasetInfo("CIFAR100", 100, "cifar100", "train/test"),
        MTILDatasetInfo("DTD", 47, "dtd", "train/test (partition 1)"),
        MTILDatasetInfo("EuroSAT", 10, "eurosat", "random 80/20 (seed 42)", "a centered satellite photo of {}."),
        MTILDatasetInfo("Flowers", 102, "flowers", "train/test"),
        MTILDatasetInfo("Food", 101, "food101", "train/test"),
        MTILDatasetInfo("MNIST", 10, "mnist", "train/test", 'a photo of the number: "{}".'),
        MTILDatasetInfo("OxfordPet", 37, "pets", "trainval/test"),
        MTILDatasetInfo("StanfordCars", 196, "cars", "train/test"),
        MTILDatasetInfo("SUN397", 397, "sun397", "random 80/20 (seed 42)"),
    ]
}

CONTROL_NAME = "ImageNet"


@lru_cache(maxsize=None)
def _clip_benchmark_json(filename: str) -> dict[str, list[str]]:
    path = Path(clip_benchmark.__file__).parent / "datasets" / filename
    if not path.is_file():
        raise UserError(f"clip-benchmark package data {path} is missing; reinstall clip-benchmark")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def benchmark_templates(key: str) -> list[str]:
    """clip-benchmark's English zero-shot templates for ``key``, with ``{}`` placeholders."""
    return [t.replace("{c}", "{}") for t in _clip_benchmark_json("en_zeroshot_classification_templates.json")[key]]


def benchmark_classnames(key: str) -> list[str]:
    """clip-benchmark's English class names for ``key``."""
    return list(_clip_benchmark_json("en_classnames.json")[key])


def mtil_templates(name: str, protocol: MTILProtocol = DEFAULT_PROTOCOL) -> list[str]:
    """The templates of an MTIL dataset under ``protocol``; the first is the training prompt."""
    if protocol == "zscl":
        return list(mtil_zscl.ZSCL_TEMPLATES[name])
    info = MTIL_DATASETS[name]
    templates = benchmark_templates(info.benchmark_key)
    if info.first_template is not None:
        templates = [info.first_template] + [t for t in templates if t != info.first_template]
    return templates


def mtil_classnames(name: str, protocol: MTILProtocol = DEFAULT_PROTOCOL) -> list[str] | None:
    """Class names known offline (label order) under ``protocol``, or None where they come
    from the dataset (with ``format: torchvision``) or the class folders (``image_folder``)."""
    if protocol == "zscl":
        names = mtil_zscl.ZSCL_CLASSNAMES.get(name)
        return None if names is None else list(names)
    if name == "Caltech101":
        names = benchmark_classnames("caltech101")
        if names[0] != "background":
            raise UserError("clip-benchmark's caltech101 class list changed: expected 'background' first")
        return names[1:]  # torchvision's Caltech101 drops BACKGROUND_Google
    if name in ("EuroSAT", "Flowers", "MNIST", "OxfordPet"):
        return benchmark_classnames(MTIL_DATASETS[name].benchmark_key)
    return None


def _spaces(names: Sequence[str]) -> list[str]:
    return [n.replace("_", " ") for n in names]


def dataset_classnames(name: str, classes: Sequence[str], protocol: MTILProtocol) -> list[str]:
    """Class names from a torchvision dataset's ``classes``, as ``protocol`` derives them.

    zscl: ``_`` -> space (ZSCL's ``process_labels``). clip_benchmark: Aircraft and
    StanfordCars unchanged, SUN397 ``_`` and ``/`` -> space, the others ``_`` -> space.
    """
    if protocol == "zscl":
        return _spaces(classes)
    if name in ("Aircraft", "StanfordCars"):
        return list(classes)
    if name == "SUN397":
        return [c.replace("_", " ").replace("/", " ") for c in classes]
    return _spaces(classes)


def imagenet_vocabulary(protocol: MTILProtocol = DEFAULT_PROTOCOL) -> tuple[list[str], list[str]]:
    """The control set's 1000 class names and 80 templates (clip-benchmark's ``imagenet1k``).

    Under zscl they are checked to be ZSCL's (its lists' fingerprints).
    """
    names, templates = benchmark_classnames("imagenet1k"), benchmark_templates("imagenet1k")
    if protocol == "zscl" and (
        mtil_zscl.fingerprint(names) != mtil_zscl.IMAGENET_CLASSNAMES_SHA256
        or mtil_zscl.fingerprint(templates) != mtil_zscl.IMAGENET_TEMPLATES_SHA256
    ):
        raise UserError("clip-benchmark's imagenet1k names or templates differ from ZSCL's; reinstall clip-benchmark 1.6")
    return names, templates


def mtil_task_names(order: str = "I", tasks: Sequence[str] | None = None) -> list[str]:
    """The datasets of an order, optionally restricted to ``tasks`` (order kept)."""
    names = MTIL_ORDERS[order]
    if tasks is None:
        return list(names)
    canonical = {n.casefold(): n for n in names}
    chosen: set[str] = set()
    for t in tasks:
        if t.casefold() not in canonical:
            raise ConfigError("stream.tasks", f"unknown MTIL task {t!r} (known: {', '.join(names)})")
        if canonical[t.casefold()] in chosen:
            raise ConfigError("stream.tasks", f"duplicate task name {t!r}")
        chosen.add(canonical[t.casefold()])
    return [n for n in names if n in chosen]


def random_split_indices(n: int, seed: int = SPLIT_SEED, train_fraction: float = TRAIN_FRACTION) -> tuple[list[int], list[int]]:
    """The train/test indices of ``torch.utils.data.random_split`` with lengths
    ``[int(train_fraction * n), rest]`` and ``Generator().manual_seed(seed)``."""
    n_train = int(train_fraction * n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[:n_train], perm[n_train:]


class LabelledDataset(Dataset):
    """A torchvision dataset (or part of it) yielding (RGB PIL image, int label), with ``targets``."""

    def __init__(self, base: Dataset, targets: Sequence[int], indices: Sequence[int] | None = None) -> None:
        self.base = base
        self.indices = list(range(len(targets))) if indices is None else [int(i) for i in indices]
        self.targets = [int(targets[i]) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = self.base[self.indices[i]][0]
        return image.convert("RGB"), self.targets[i]


@dataclass
class LoadedDataset:
    """Train and test sets of one dataset with its class names (label order)."""

    train: LabelledDataset
    test: LabelledDataset
    classnames: list[str]


def _targets(ds: Any, attr: str) -> list[int]:
    """Labels from a torchvision dataset attribute; decoding every image only as a fallback."""
    values = getattr(ds, attr, None)
    if values is None:
        return dataset_targets(ds)
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    return [int(v) for v in values]


def _official(train: Any, test: Any, attr: str, classnames: list[str]) -> LoadedDataset:
    return LoadedDataset(LabelledDataset(train, _targets(train, attr)), LabelledDataset(test, _targets(test, attr)), classnames)


def _random_split(ds: Any, targets: list[int], classnames: list[str], order: Sequence[int] | None = None) -> LoadedDataset:
    """The seeded 80/20 split; ``order`` first puts the samples in a reproducible order."""
    order = list(range(len(targets))) if order is None else list(order)
    train_pos, test_pos = random_split_indices(len(order))
    return LoadedDataset(
        LabelledDataset(ds, targets, [order[p] for p in train_pos]),
        LabelledDataset(ds, targets, [order[p] for p in test_pos]),
        classnames,
    )


def load_aircraft(root: Path, download: bool, protocol: MTILProtocol) -> LoadedDataset:
    train = tvd.FGVCAircraft(root, split="train", annotation_level="variant", download=download)
    test = tvd.FGVCAircraft(root, split="test", annotation_level="variant", download=download)
    return _official(train, test, "_labels", dataset_classnames("Aircraft", train.classes, protocol))


def load_caltech101(root: Path, download: bool, protocol: MTILProtocol) -> LoadedDataset:
    ds = tvd.Caltech101(root, target_type="category", download=download)
    if len(ds.categories) != 101:
        raise UserError(f"Caltech101 in {root}: {len(ds.categories)} categories, expected 101")
    return _random_split(ds, _targets(ds, "y"), mtil_classnames("Caltech101", protocol) or [])


def load_cifar100(root: Path, download: bool, protocol: MTILProtocol) -> LoadedDataset:
    train = tvd.CIFAR100(root, train=True, download=download)
    test = tvd.CIFAR100(root, train=False, download=download)
    return _official(train, test, "targets", dataset_classnames("CIFAR100", train.classes, protocol))


def load_dtd(root: Path, download: bool, protocol: MTILProtocol) -> LoadedDataset:
    train = tvd.DTD(root, split="train", partition=1, download=download)
    test = tvd.DTD(root, split="test", partition=1, download=download)
    return _official(train, test, "_labels", dataset_classnames("DTD", train.classes, protocol))


def load_eurosat(root: Path, download: bool, protocol: MTILProtocol) -> LoadedDataset:
    ds = tvd.EuroSAT(root, download=download)
    if list(ds.classes) != EUROSAT_FOLDERS:
        raise UserError(f"EuroSAT in {root}: class folders {ds.classes} differ from {EUROSAT_FOLDERS}")
    return _random_split(ds, _targets(ds, "targets"), mtil_classnames("EuroSAT", protocol) or [])


def load_flowers(root: Path, download: bool, protocol: MTILProtocol) -> LoadedDataset:
    train = tvd.Flowers102(root, split="train", download=download)
    test = tvd.Flowers102(root, split="test", download=download)
    data = _official(train, test, "_labels", mtil_classnames("Flowers", protocol) or [])
    labels = data.train.targets + data.test.targets
    if min(labels) == 1 and max(labels) == 102:  # convention of old torchvision releases
        data.train.targets = [t - 1 for t in data.train.targets]
        data.test.targets = [t - 1 for t in data.test.targets]
    return data


def load_food(root: Path, download: bool, protocol: MTILProtocol) -> LoadedDataset:
    train = tvd.Food101(root, split="train", download=download)
    test = tvd.Food101(root, split="test", download=download)
    return _official(train, test, "_labels", dataset_classnames("Food", train.classes, protocol))


def load_mnist(root: Path, download: bool, protocol: MTILProtocol) -> LoadedDataset:
    train = tvd.MNIST(root, train=True, download=download)
    test = tvd.MNIST(root, train=False, download=download)
    # zscl: torchvision's names ("0 - zero", ...) read from the dataset, as ZSCL does
    names = dataset_classnames("MNIST", train.classes, protocol) if protocol == "zscl" else mtil_classnames("MNIST", protocol)
    return _official(train, test, "targets", names or [])


def load_pets(root: Path, download: bool, protocol: MTILProtocol) -> LoadedDataset:
    train = tvd.OxfordIIITPet(root, split="trainval", target_types="category", download=download)
    test = tvd.OxfordIIITPet(root, split="test", target_types="category", download=download)
    # zscl: torchvision's names read from the dataset (title-cased annotation names), as ZSCL does
    names = dataset_classnames("OxfordPet", train.classes, protocol) if protocol == "zscl" else mtil_classnames("OxfordPet", protocol)
    return _official(train, test, "_labels", names or [])


def load_cars(root: Path, download: bool, protocol: MTILProtocol) -> LoadedDataset:
    train = tvd.StanfordCars(root, split="train", download=download)
    test = tvd.StanfordCars(root, split="test", download=download)

    def labels(ds: Any) -> list[int]:
        return [int(label) for _, label in ds._samples]

    names = dataset_classnames("StanfordCars", train.classes, protocol)
    return LoadedDataset(LabelledDataset(train, labels(train)), LabelledDataset(test, labels(test)), names)


def load_sun397(root: Path, download: bool, protocol: MTILProtocol) -> LoadedDataset:
    ds = tvd.SUN397(root, download=download)
    names = dataset_classnames("SUN397", ds.classes, protocol)
    order = sorted(range(len(ds._image_files)), key=lambda i: str(ds._image_files[i]))
    return _random_split(ds, _targets(ds, "_labels"), names, order)


# Dataset name -> loader of its torchvision form (an explicit table, no dynamic imports).
TORCHVISION_LOADERS: dict[str, Callable[[Path, bool, MTILProtocol], LoadedDataset]] = {
    "Aircraft": load_aircraft,
    "Caltech101": load_caltech101,
    "CIFAR100": load_cifar100,
    "DTD": load_dtd,
    "EuroSAT": load_eurosat,
    "Flowers": load_flowers,
    "Food": load_food,
    "MNIST": load_mnist,
    "OxfordPet": load_pets,
    "StanfordCars": load_cars,
    "SUN397": load_sun397,
}


def check_loaded(name: str, data: LoadedDataset) -> None:
    """Class count and label range of a loaded dataset, against the MTIL table."""
    expected = MTIL_DATASETS[name].num_classes
    if len(data.classnames) != expected:
        raise UserError(f"MTIL task {name}: {len(data.classnames)} class names, expected {expected}")
    labels = data.train.targets + data.test.targets
    if labels and (min(labels) < 0 or max(labels) >= expected):
        raise UserError(f"MTIL task {name}: labels span {min(labels)}..{max(labels)}, expected 0..{expected - 1}")


def torchvision_task(
    name: str, root: Path, download: bool, templates: list[str], protocol: MTILProtocol = DEFAULT_PROTOCOL
) -> Task:
    """An MTIL task from torchvision's dataset class under ``root``, named as ``protocol`` does."""
    try:
        data = TORCHVISION_LOADERS[name](root, download, protocol)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted..."
        hint = "" if download else " (set stream.download: true to fetch it, or use format: image_folder)"
        raise UserError(f"MTIL task {name}: torchvision could not load it from {root}: {e}{hint}") from e
    check_loaded(name, data)
    return Task(name, data.classnames, templates, data.train, data.test, meta={"root": str(root), "format": "torchvision", "protocol": protocol})


def image_folder_task(
    name: str,
    root: Path,
    templates: list[str],
    classnames: ClassNames | None,
    match: Literal["names", "sorted"],
    verify: bool,
    protocol: MTILProtocol = DEFAULT_PROTOCOL,
) -> Task:
    """An MTIL task from ``root/NAME/{train,test}/CLASS`` with its class count checked."""
    task = folder_task(
        root / name,
        name,
        templates,
        classnames=classnames,
        class_order=mtil_classnames(name, protocol),
        match=match,
        verify=verify,
    )
    expected = MTIL_DATASETS[name].num_classes
    if task.num_classes != expected:
        raise UserError(f"MTIL task {name}: {root / name} has {task.num_classes} classes, expected {expected}")
    task.meta.update(format="image_folder", protocol=protocol)
    return task


def imagenet_control(
    path: Path, limit: int | None = None, seed: int = 0, verify: bool = True, protocol: MTILProtocol = DEFAULT_PROTOCOL
) -> Task:
    """The ImageNet control set from a folder of 1000 class folders (wnids, sorted = label order).

    ``path`` may also be the ImageNet root holding ``val/``. Class names and the 80
    OpenAI templates: :func:`imagenet_vocabulary`.
    """
    if not path.is_dir():
        raise UserError(f"stream.control: folder {path} does not exist")
    split_dir = path / "val" if (path / "val").is_dir() else path
    split = scan_split(split_dir, verify)
    names, templates = imagenet_vocabulary(protocol)
    if len(split.class_folders) != len(names):
        raise UserError(
            f"stream.control: {split_dir} has {len(split.class_folders)} class folders, expected {len(names)} (ImageNet wnids)"
        )
    test: Dataset = ImageFileDataset(split.paths, split.folder_ids)
    idx = limit_indices(len(test), limit, seed)
    if idx is not None:
        test = Subset(test, idx)
    return Task(CONTROL_NAME, names, templates, empty_dataset(), test, meta={"root": str(split_dir), "protocol": protocol})


class MTILStreamParams(BaseModel):
    """Arguments of the ``mtil`` stream."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    root: str = Field(description="data root: torchvision's dataset folders, or root/NAME/{train,test}/CLASS")
    order: Literal["I", "II"] = Field("I", description="MTIL order I or II")
    tasks: list[str] | None = Field(None, description="subset of the 11 datasets (the order's sequence is kept)")
    download: bool = Field(False, description="let torchvision download missing datasets (user's machine only)")
    format: Literal["torchvision", "image_folder"] = Field("torchvision", description="how the datasets are stored")
    protocol: MTILProtocol = Field(
        DEFAULT_PROTOCOL,
        description="vocabulary: zscl = class names and templates of the ZSCL/GIFT code (published numbers); clip_benchmark = clip-benchmark's",
    )
    formats: dict[str, Literal["torchvision", "image_folder"]] = Field(
        default_factory=dict, description="per-task format override (a root holding both kinds)"
    )
    shots: int | None = Field(None, ge=1, description="few-shot MTIL: training images per class (5 or 16 in the papers)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the few-shot draw and of the size limits")
    train_limit: int | None = Field(None, ge=1, description="at most this many training images per task (seeded)")
    test_limit: int | None = Field(None, ge=1, description="at most this many test images per task (seeded)")
    templates: dict[str, list[str]] = Field(
        default_factory=dict, description="per-task template override (first = training prompt)"
    )
    classnames: dict[str, ClassNames] = Field(default_factory=dict, description="per-task class names (image_folder format)")
    folder_classes: Literal["names", "sorted"] = Field(
        "names", description="image_folder: match class folders to known names by name/index, or by sorted position"
    )
    control: str | None = Field(None, description="ImageNet folder (1000 wnid class folders) used as control set")
    control_limit: int | None = Field(None, ge=1, description="at most this many control images (seeded)")
    verify_images: bool = Field(True, description="image_folder: PIL verify() every image at build time")


@STREAMS.register("mtil", MTILStreamParams, help="MTIL: 11 datasets, orders I/II, torchvision or image folders")
def build_mtil_stream(params: MTILStreamParams, **context: Any) -> StreamData:
    """Build the MTIL tasks (and the optional ImageNet control set)."""
    return build_mtil_datasets(params, mtil_task_names(params.order, params.tasks))


def build_mtil_datasets(params: MTILStreamParams, names: Sequence[str]) -> StreamData:
    """The tasks ``names`` (MTIL datasets, in stream order) built as ``params`` says, and
    the optional ImageNet control set; shared by the ``mtil`` and ``xtail`` streams."""
    names = list(names)
    root = Path(params.root).expanduser()
    formats = {name: params.formats.get(name, params.format) for name in names}
    if "image_folder" in formats.values() and not root.is_dir():
        raise UserError(f"stream.root: folder {root} does not exist")
    if "torchvision" in formats.values() and not params.download and not root.is_dir():
        raise UserError(f"stream.root: folder {root} does not exist (set stream.download: true to fetch the datasets)")
    mappings = (("stream.templates", params.templates), ("stream.classnames", params.classnames), ("stream.formats", params.formats))
    for key, mapping in mappings:
        unknown = sorted(set(mapping) - set(names))
        if unknown:
            raise ConfigError(key, f"unknown task names {unknown} (tasks: {names})")
    if any(formats[name] == "torchvision" for name in params.classnames):
        raise ConfigError("stream.classnames", "class-name overrides apply to format: image_folder only")
    tasks = []
    for name in names:
        if name in params.templates:
            templates = check_templates(params.templates[name], f"stream.templates.{name}")
        else:
            templates = mtil_templates(name, params.protocol)
        if formats[name] == "torchvision":
            task = torchvision_task(name, root, params.download, templates, params.protocol)
        else:
            task = image_folder_task(
                name, root, templates, params.classnames.get(name), params.folder_classes, params.verify_images, params.protocol
            )
        tasks.append(
            subsample_task(
                task, shots=params.shots, seed=params.seed, train_limit=params.train_limit, test_limit=params.test_limit
            )
        )
    control = None
    if params.control is not None:
        control = imagenet_control(
            Path(params.control).expanduser(), params.control_limit, params.seed, params.verify_images, params.protocol
        )
    return StreamData(tasks=tasks, control=control, base_concepts=list(control.classnames) if control else [])
