"""A task stream read from image folders: ``root/TASK/{train,test}/CLASS/*.jpg``.

Every task is a folder with a ``train`` and a ``test`` split; every split holds one folder
per class (the same class folders in both splits). Class names default to the folder
names with ``_`` read as a space, labels follow the sorted folder names, and the
templates default to ``"a photo of a {}."``. Images stay on disk: a dataset keeps the
paths and opens an image (converted to RGB) only in ``__getitem__``.

Checks at build time, each a one-line ``UserError`` naming the path or the key: missing
folders, splits without class folders, class folders without images, train/test class
sets that differ, zero-byte files and files PIL cannot identify (``Image.verify()``,
which reads only the header of a JPEG: measured about 0.03 ms per 500x375 JPEG and
0.3 ms per PNG of that size, warm cache, so 100k images cost seconds; pass
``verify_images: false`` to skip it). Damage that ``verify()`` cannot see (a truncated
JPEG) surfaces at load time as a ``UserError`` naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from cl_proxyfda.benchmarks.stream import StreamData, Subset, Task, dataset_targets, few_shot_indices
from cl_proxyfda.errors import ConfigError, UserError
from cl_proxyfda.registry import STREAMS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_TEMPLATES = ["a photo of a {}."]
SPLITS = ("train", "test")

# A class-name override: a list in sorted-folder order, or a mapping folder -> name.
ClassNames = list[str] | dict[str, str]


class ImageFileDataset(Dataset):
    """Image files with integer labels, opened lazily as RGB PIL images."""

    def __init__(self, paths: Sequence[Path], targets: Sequence[int]) -> None:
        if len(paths) != len(targets):
            raise ValueError("paths and targets differ in length")
        self.paths = [Path(p) for p in paths]
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return load_rgb(self.paths[i]), self.targets[i]


def load_rgb(path: Path) -> Image.Image:
    """Open an image file as RGB; a broken file raises ``UserError`` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for broken files
        raise UserError(f"unreadable image file {path}: {e}") from e


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), skipping hidden files."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def check_image_files(paths: Sequence[Path], verify: bool = True) -> None:
    """Reject zero-byte files and (with ``verify``) files PIL cannot identify."""
    for path in paths:
        if path.stat().st_size == 0:
            raise UserError(f"empty image file {path} (0 bytes)")
        if verify:
            try:
                with Image.open(path) as image:
                    image.verify()
            except Exception as e:  # PIL raises many types for corrupt headers
                raise UserError(f"unreadable image file {path}: {e}") from e


@dataclass
class FolderSplit:
    """One split folder: its class folders (sorted) and its images."""

    folder: Path
    class_folders: list[str]
    paths: list[Path]
    folder_ids: list[int]  # index into class_folders, one per path


def scan_split(split_dir: Path, verify: bool = True) -> FolderSplit:
    """Read ``split_dir/CLASS/*`` with the build-time checks."""
    if not split_dir.is_dir():
        raise UserError(f"missing folder {split_dir} (expected {split_dir}/CLASS/*.jpg)")
    class_folders = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_folders:
        raise UserError(f"{split_dir}: no class folders (expected {split_dir}/CLASS/*.jpg)")
    paths: list[Path] = []
    ids: list[int] = []
    for k, name in enumerate(class_folders):
        images = list_images(split_dir / name)
        if not images:
            raise UserError(f"class folder {split_dir / name} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        check_image_files(images, verify)
        paths.extend(images)
        ids.extend([k] * len(images))
    return FolderSplit(split_dir, class_folders, paths, ids)


def _normalise(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def match_class_folders(
    folders: Sequence[str], class_order: Sequence[str], mode: Literal["names", "sorted"], where: str
) -> list[int]:
    """Label of each folder in a known class list.

    ``names``: a folder is named by its class name (``_`` for spaces, any case) or by
    its integer index in ``class_order``. ``sorted``: the i-th folder in sorted order is
    class i (as in torchvision's own folder layouts). Every class must have a folder.
    """
    n = len(class_order)
    if mode == "sorted":
        if len(folders) != n:
            raise UserError(f"{where}: {len(folders)} class folders, expected {n}")
        return list(range(n))
    index = {_normalise(c): i for i, c in enumerate(class_order)}
    labels: list[int] = []
    unknown: list[str] = []
    for f in folders:
        if _normalise(f) in index:
            labels.append(index[_normalise(f)])
        elif f.isdigit() and int(f) < n:
            labels.append(int(f))
        else:
            unknown.append(f)
    if unknown:
        raise UserError(
            f"{where}: class folders {unknown[:5]} match no known class name "
            f"(expected names like {list(class_order[:3])})"
        )
    if len(set(labels)) != len(labels):
        raise UserError(f"{where}: two class folders name the same class")
    missing = sorted(set(range(n)) - set(labels))
    if missing:
        raise UserError(f"{where}: no folder for classes {[class_order[i] for i in missing[:5]]} ({len(missing)} missing)")
    return labels


def resolve_classnames(folders: Sequence[str], override: ClassNames | None, where: str) -> list[str]:
    """Class names of sorted class folders: from the override or from the folder names."""
    if override is None:
        return [f.replace("_", " ") for f in folders]
    if isinstance(override, dict):
        if set(override) != set(folders):
            extra = sorted(set(override) - set(folders))
            missing = sorted(set(folders) - set(override))
            raise ConfigError(
                where, f"class-name mapping does not match the class folders (unknown: {extra[:5]}, missing: {missing[:5]})"
            )
        return [override[f] for f in folders]
    if len(override) != len(folders):
        raise ConfigError(where, f"{len(override)} class names given for {len(folders)} class folders")
    return list(override)


def check_distinct_prompts(folders: Sequence[str], names: Sequence[str], where: str) -> None:
    """Two classes whose names give the same prompt (``a_b`` and ``a b``, ``Red`` and
    ``red``: CLIP's tokenizer lower-cases) could never be told apart: refuse them."""
    seen: dict[str, str] = {}
    for folder, class_name in zip(folders, names):
        key = _normalise(class_name)
        if key in seen:
            raise UserError(
                f"{where}: class folders {seen[key]!r} and {folder!r} both give the class name {key!r}; "
                "rename one or give distinct names with stream.classnames"
            )
        seen[key] = folder


def empty_dataset() -> ImageFileDataset:
    return ImageFileDataset([], [])


def folder_task(
    task_dir: Path,
    name: str,
    templates: Sequence[str],
    *,
    classnames: ClassNames | None = None,
    class_order: Sequence[str] | None = None,
    match: Literal["names", "sorted"] = "names",
    verify: bool = True,
    require_train: bool = True,
    key: str = "stream.tasks",
) -> Task:
    """A ``Task`` from ``task_dir/{train,test}/CLASS/*``.

    Without ``class_order`` labels follow the sorted class folders and the names come
    from ``classnames`` or the folder names. With ``class_order`` (a known class list,
    as for MTIL) folders are matched to it (``match``) and labels follow its order.
    Without ``require_train`` a missing ``train`` folder gives an empty train set
    (for control sets, which are only evaluated).
    """
    if not task_dir.is_dir():
        raise UserError(f"{key}: task folder {task_dir} does not exist")
    if not require_train and not (task_dir / "train").exists():
        splits = {"test": scan_split(task_dir / "test", verify)}
    else:
        for split in SPLITS:
            if not (task_dir / split).is_dir():
                raise UserError(f"task {name!r}: missing split folder {task_dir / split}")
        splits = {s: scan_split(task_dir / s, verify) for s in SPLITS}
    if "train" in splits:
        train_set, test_set = set(splits["train"].class_folders), set(splits["test"].class_folders)
        if train_set != test_set:
            raise UserError(
                f"task {name!r} in {task_dir}: train and test class folders differ "
                f"(only in train: {sorted(train_set - test_set)[:5]}, only in test: {sorted(test_set - train_set)[:5]})"
            )
    folders = splits["test"].class_folders
    if classnames is None and class_order is not None:
        labels = match_class_folders(folders, class_order, match, f"task {name!r} in {task_dir / 'test'}")
        names = list(class_order)
    else:
        names = resolve_classnames(folders, classnames, f"stream.classnames.{name}")
        labels = list(range(len(folders)))
        check_distinct_prompts(folders, names, f"task {name!r} in {task_dir / 'test'}")

    def dataset(split: str) -> ImageFileDataset:
        if split not in splits:
            return empty_dataset()
        s = splits[split]
        return ImageFileDataset(s.paths, [labels[k] for k in s.folder_ids])

    return Task(name, names, list(templates), dataset("train"), dataset("test"), meta={"root": str(task_dir)})


def check_templates(templates: Sequence[str], key: str) -> list[str]:
    """Templates with one ``{}`` (or ``{c}``) placeholder that ``str.format`` accepts."""
    if not templates:
        raise ConfigError(key, "no templates given")
    out = []
    for i, t in enumerate(templates):
        t = t.replace("{c}", "{}")
        ok = "{}" in t
        if ok:
            try:
                t.format("x")
            except (IndexError, KeyError, ValueError):
                ok = False
        if not ok:
            raise ConfigError(f"{key}[{i}]", f"template {t!r} needs exactly one '{{}}' placeholder for the class name")
        out.append(t)
    return out


def limit_indices(n: int, limit: int | None, seed: int) -> list[int] | None:
    """A seeded random subset of ``limit`` indices out of ``n`` (sorted), or None."""
    if limit is None or limit >= n:
        return None
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, size=limit, replace=False).tolist())


def subsample_task(
    task: Task,
    *,
    shots: int | None = None,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> Task:
    """Few-shot (``shots`` per class, seeded) and size-limited copies of a task's splits.

    Few-shot sampling draws ``shots`` training images of every class with
    ``numpy.random.default_rng(seed)``; ``train_limit``/``test_limit`` keep a seeded
    random subset of at most that many images (applied after the few-shot draw).
    """
    train: Dataset = task.train
    test: Dataset = task.test
    if shots is not None:
        targets = np.asarray(dataset_targets(train), dtype=np.int64)
        counts = np.bincount(targets, minlength=task.num_classes) if len(targets) else np.zeros(task.num_classes, int)
        short = [(task.classnames[c], int(counts[c])) for c in range(task.num_classes) if counts[c] < shots]
        if short:
            cname, have = short[0]
            raise UserError(
                f"stream.shots: {shots} shots per class asked but task {task.name!r} class {cname!r} "
                f"has only {have} training images ({len(short)} classes short)"
            )
        train = Subset(train, few_shot_indices(targets.tolist(), shots, seed, task.num_classes, task.name))
    idx = limit_indices(len(train), train_limit, seed)
    if idx is not None:
        train = Subset(train, idx)
    idx = limit_indices(len(test), test_limit, seed)
    if idx is not None:
        test = Subset(test, idx)
    return Task(task.name, task.classnames, task.templates, train, test, meta=dict(task.meta))


class ImageFolderStreamParams(BaseModel):
    """Arguments of the ``image_folder`` stream."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    root: str = Field(description="folder holding one sub-folder per task: root/TASK/{train,test}/CLASS/*.jpg")
    tasks: list[str] | None = Field(None, description="task folder names in stream order (default: sorted sub-folders)")
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), description="prompt templates with '{}'")
    task_templates: dict[str, list[str]] = Field(default_factory=dict, description="per-task template override")
    classnames: dict[str, ClassNames] = Field(
        default_factory=dict, description="per-task class names: a list in sorted-folder order or a mapping folder -> name"
    )
    shots: int | None = Field(None, ge=1, description="few-shot: training images per class (seeded)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the few-shot draw and of the size limits")
    control: str | None = Field(None, description="task folder used as control set (evaluated, never trained)")
    train_limit: int | None = Field(None, ge=1, description="at most this many training images per task (seeded)")
    test_limit: int | None = Field(None, ge=1, description="at most this many test images per task (seeded)")
    verify_images: bool = Field(True, description="PIL verify() every image at build time")


def task_folders(root: Path) -> list[str]:
    """Sorted sub-folder names of ``root`` (hidden ones skipped)."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def check_unique(names: Sequence[str], key: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ConfigError(key, f"duplicate task name {n!r}")
        seen.add(n)


@STREAMS.register("image_folder", ImageFolderStreamParams, help="tasks from root/TASK/{train,test}/CLASS/*.jpg")
def build_image_folder_stream(params: ImageFolderStreamParams, **context: Any) -> StreamData:
    """Build the tasks (and the optional control set) of an image-folder stream."""
    root = Path(params.root).expanduser()
    if not root.is_dir():
        raise UserError(f"stream.root: folder {root} does not exist")
    if params.tasks is not None:
        names = list(params.tasks)
        check_unique(names, "stream.tasks")
    else:
        names = [n for n in task_folders(root) if n != params.control]
    if not names:
        raise UserError(f"stream.root: no task folders in {root}")
    if params.control is not None and params.control in names:
        raise ConfigError("stream.control", f"control set {params.control!r} is also a task of the stream")
    for key, mapping in (("stream.task_templates", params.task_templates), ("stream.classnames", params.classnames)):
        unknown = sorted(set(mapping) - set(names) - {params.control})
        if unknown:
            raise ConfigError(key, f"unknown task names {unknown} (tasks: {names})")
    default_templates = check_templates(params.templates, "stream.templates")

    def templates_of(name: str) -> list[str]:
        if name in params.task_templates:
            return check_templates(params.task_templates[name], f"stream.task_templates.{name}")
        return default_templates

    tasks = []
    for name in names:
        task = folder_task(
            root / name, name, templates_of(name), classnames=params.classnames.get(name), verify=params.verify_images
        )
        tasks.append(
            subsample_task(
                task, shots=params.shots, seed=params.seed, train_limit=params.train_limit, test_limit=params.test_limit
            )
        )
    control = None
    if params.control is not None:
        control = folder_task(
            root / params.control,
            params.control,
            templates_of(params.control),
            classnames=params.classnames.get(params.control),
            verify=params.verify_images,
            require_train=False,
            key="stream.control",
        )
        control = subsample_task(control, seed=params.seed, test_limit=params.test_limit)
    return StreamData(tasks=tasks, control=control, base_concepts=list(control.classnames) if control else [])
