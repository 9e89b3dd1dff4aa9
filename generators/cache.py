"""A resumable disk cache of synthetic image-prompt pairs.

One cache folder holds the synthetic set of one (stream, order, experience)::

    <root>/cache.json          which generator made the images (a changed one is refused)
    <root>/manifest.jsonl      one JSON record a line: prompt, seed, status, file, sha256
    <root>/images/<key>.png    one PNG per (prompt, seed); <key> is a hash of both

:meth:`SyntheticCache.ensure` generates whatever of a plan (prompts + seeds) is missing and
is idempotent and resumable: each image is written to a temporary file and moved into
place with ``os.replace``, then its record is appended to the manifest in one write, so a
killed run leaves at worst an unrecorded image or a truncated last manifest line, and the
next run regenerates exactly what is missing. A file whose SHA-256 no longer matches its
record (corrupted, truncated) is regenerated. Images the generator dropped (near-black
safety-checker outputs) are recorded as ``dropped`` and never retried. Under data
parallelism rank ``r`` of ``w`` generates the items ``i % w == r`` and appends to its own
manifest (``manifest.rank{r}of{w}.jsonl``); every manifest is read back.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from cl_proxyfda.errors import UserError
from cl_proxyfda.io import write_atomic
from cl_proxyfda.generators.base import ImageGenerator

BLACK_THRESHOLD = 8
"""An image whose brightest channel value is below this (0-255) counts as near-black."""


def is_near_black(image: Image.Image, threshold: int = BLACK_THRESHOLD) -> bool:
    """Whether every pixel value of ``image`` is below ``threshold`` (safety-checker output)."""
    return int(np.asarray(image.convert("RGB")).max()) < threshold


@dataclass(frozen=True)
class GeneratedBatch:
    """What a filtering generator returns: the kept images and their request indices."""

    images: list[Image.Image]
    kept: list[int]


@runtime_checkable
class FilteringGenerator(Protocol):
    """A generator that may drop images (e.g. near-black) and says which it kept."""

    name: str

    def generate_kept(self, prompts: Sequence[str], seeds: Sequence[int]) -> GeneratedBatch:
        ...


def generate_with_drops(generator: ImageGenerator, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image | None]:
    """One entry per prompt: the image, or ``None`` where the generator dropped it."""
    if isinstance(generator, FilteringGenerator):
        batch = generator.generate_kept(prompts, seeds)
        if len(batch.images) != len(batch.kept) or any(not 0 <= k < len(prompts) for k in batch.kept):
            raise RuntimeError(f"generator {generator.name!r} returned inconsistent kept indices")
        out: list[Image.Image | None] = [None] * len(prompts)
        for k, img in zip(batch.kept, batch.images):
            out[k] = img
        return out
    images = generator.generate(prompts, seeds)
    if len(images) != len(prompts):
        raise RuntimeError(f"generator {generator.name!r} returned {len(images)} images for {len(prompts)} prompts")
    return list(images)


def generator_id(generator: ImageGenerator) -> str:
    """What identifies the images a generator makes: its ``config_id`` or else its name."""
    return str(getattr(generator, "config_id", None) or generator.name)


_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def cache_folder(base: str | Path, stream: str, order: str, experience: int) -> Path:
    """The cache folder of one (stream, order, experience) under ``base``."""
    for label, part in (("stream", stream), ("order", order)):
        if not _SAFE_PART.match(str(part)) or ".." in str(part):
            raise UserError(f"synthetic cache: {label} name {part!r} is not a plain folder name")
    if int(experience) < 0:
        raise UserError(f"synthetic cache: experience must be >= 0, got {experience}")
    return Path(base) / str(stream) / str(order) / f"experience_{int(experience):03d}"


@dataclass(frozen=True)
class CacheRecord:
    """One planned item: its prompt and seed, ``ok`` with its file, or ``dropped``."""

    prompt: str
    seed: int
    status: str  # "ok" | "dropped"
    file: str | None = None
    sha256: str | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.prompt, self.seed)


class SyntheticDataset(Dataset):
    """The cached pairs of a plan: ``dataset[i] = (PIL image, prompt)``, read lazily."""

    def __init__(self, root: Path, records: Sequence[CacheRecord]) -> None:
        self.root = root
        self.records = list(records)

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        rec = self.records[i]
        assert rec.file is not None
        with Image.open(self.root / rec.file) as img:
            return img.convert("RGB"), rec.prompt


class SyntheticCache:
    """The synthetic image-prompt pairs of one cache folder (see the module docstring)."""

    META = "cache.json"
    MANIFEST = "manifest.jsonl"
    IMAGES = "images"
    _MANIFEST_RE = re.compile(r"^manifest(\.rank\d+of\d+)?\.jsonl$")
    _IMAGE_RE = re.compile(r"^[0-9a-f]{24}\.png$")
    _TMP_PREFIX = ".tmp-"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.stats: dict[str, int] = {}

    # -- layout -----------------------------------------------------------------------
    @staticmethod
    def image_name(prompt: str, seed: int) -> str:
        digest = hashlib.sha256(f"{int(seed)}\n{prompt}".encode("utf-8")).hexdigest()
        return f"{digest[:24]}.png"

    @classmethod
    def manifest_name(cls, rank: int, world: int) -> str:
        return cls.MANIFEST if world == 1 else f"manifest.rank{rank}of{world}.jsonl"

    def _manifests(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        names = sorted(p.name for p in self.root.iterdir() if self._MANIFEST_RE.match(p.name))
        if self.MANIFEST in names:  # the single-process manifest first
            names.remove(self.MANIFEST)
            names.insert(0, self.MANIFEST)
        return [self.root / n for n in names]

    def _check_foreign_files(self) -> None:
        """Refuse a folder holding files this cache did not write, naming them."""
        foreign: list[str] = []
        if not self.root.is_dir():
            return
        for p in sorted(self.root.iterdir()):
            if p.name == self.IMAGES and p.is_dir():
                for q in sorted(p.iterdir()):
                    if not (q.is_file() and (self._IMAGE_RE.match(q.name) or q.name.startswith(self._TMP_PREFIX))):
                        foreign.append(f"{self.IMAGES}/{q.name}")
            elif not (p.is_file() and (p.name == self.META or self._MANIFEST_RE.match(p.name) or p.name.startswith(self._TMP_PREFIX))):
                foreign.append(p.name)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise UserError(f"synthetic cache {self.root} holds files it did not write: {shown} (move them away or use another folder)")

    def _confined(self, file: Any, where: str) -> Path:
        """The absolute path of a manifest ``file`` entry, refused if it leaves the images folder."""
        if not isinstance(file, str) or not file:
            raise UserError(f"{where}: record has no file name")
        pure = Path(file)
        if pure.is_absolute() or ".." in pure.parts or "\\" in file or len(pure.parts) != 2 or pure.parts[0] != self.IMAGES:
            raise UserError(f"{where}: file {file!r} is outside the cache folder's {self.IMAGES}/ (path traversal refused)")
        path = (self.root / pure).resolve()
        if path.parent != (self.root / self.IMAGES).resolve():
            raise UserError(f"{where}: file {file!r} resolves outside the cache folder {self.root}")
        return path

    # -- reading ----------------------------------------------------------------------
    def _read_manifest(self, path: Path) -> tuple[list[CacheRecord], bool]:
        """Records of one manifest and whether its last line was truncated (ignored)."""
        data = path.read_bytes()
        lines = data.split(b"\n")
        truncated = False
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:  # no final newline: the last record was cut short by a kill
            lines.pop()
            truncated = True
        records = []
        for n, raw in enumerate(lines, start=1):
            where = f"synthetic cache manifest {path} line {n}"
            try:
                obj = json.loads(raw.decode("utf-8"))
                rec = CacheRecord(prompt=str(obj["prompt"]), seed=int(obj["seed"]), status=str(obj["status"]), file=obj.get("file"), sha256=obj.get("sha256"))
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise UserError(f"{where} is not a valid record (fix or delete that line, or the whole folder)") from None
            if rec.status == "ok":
                self._confined(rec.file, where)
                if not isinstance(rec.sha256, str):
                    raise UserError(f"{where} has no sha256")
            elif rec.status != "dropped":
                raise UserError(f"{where}: unknown status {rec.status!r}")
            records.append(rec)
        return records, truncated

    def _file_ok(self, rec: CacheRecord) -> bool:
        path = self._confined(rec.file, f"synthetic cache {self.root}")
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest() == rec.sha256
        except OSError:
            return False

    def valid_records(self) -> dict[tuple[str, int], CacheRecord]:
        """Every (prompt, seed) with a record whose image is intact (or that was dropped)."""
        candidates: dict[tuple[str, int], list[CacheRecord]] = {}
        for manifest in self._manifests():
            for rec in self._read_manifest(manifest)[0]:
                candidates.setdefault(rec.key, []).append(rec)
        valid: dict[tuple[str, int], CacheRecord] = {}
        for key, recs in candidates.items():
            for rec in reversed(recs):  # the latest record that still holds wins
                if rec.status == "dropped" or self._file_ok(rec):
                    valid[key] = rec
                    break
        return valid

    # -- writing ----------------------------------------------------------------------
    def _check_generator(self, generator: ImageGenerator, owner: str) -> None:
        meta_path = self.root / self.META
        gid = generator_id(generator)
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except ValueError:
                raise UserError(f"synthetic cache {meta_path} is not valid JSON (delete the folder to start over)") from None
            if meta.get("generator") != gid:
                raise UserError(
                    f"synthetic cache {self.root} was made by generator {meta.get('generator')!r}, not {gid!r}; use another folder or delete it"
                )
            return
        self._write_atomic(meta_path, json.dumps({"generator": gid}, indent=1).encode("utf-8"), owner)

    def _write_atomic(self, path: Path, data: bytes, owner: str) -> None:
        """Write ``data`` to a temporary file of ``owner`` (``r{rank}of{world}``), then rename."""
        write_atomic(path, data, tmp_name=f"{self._TMP_PREFIX}{owner}-{os.getpid()}-{path.name}")

    def _clean_own_temporaries(self, owner: str, everything: bool) -> None:
        """Remove temporaries a killed run of ``owner`` left (all of them when ``everything``)."""
        prefix = f"{self._TMP_PREFIX}{owner}-"
        for folder in (self.root, self.root / self.IMAGES):
            for p in folder.iterdir():
                if p.name.startswith(prefix) or (everything and p.name.startswith(self._TMP_PREFIX)):
                    p.unlink()

    def _repair_manifest(self, path: Path, owner: str) -> None:
        """Drop a truncated last line (left by a kill), rewriting the manifest atomically."""
        if not path.is_file():
            return
        records, truncated = self._read_manifest(path)
        if truncated:
            body = b"".join(self._record_line(r) for r in records)
            self._write_atomic(path, body, owner)

    @staticmethod
    def _record_line(rec: CacheRecord) -> bytes:
        return (json.dumps(asdict(rec), ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")

    def _append(self, manifest: Path, rec: CacheRecord) -> None:
        """Append one record in a single write, flushed to disk."""
        fd = os.open(manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, self._record_line(rec))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _store(self, prompt: str, seed: int, image: Image.Image | None, owner: str) -> CacheRecord:
        if image is None:
            return CacheRecord(prompt, int(seed), "dropped")
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        data = buf.getvalue()
        name = self.image_name(prompt, seed)
        final = self.root / self.IMAGES / name
        self._write_atomic(final, data, owner)
        return CacheRecord(prompt, int(seed), "ok", f"{self.IMAGES}/{name}", hashlib.sha256(data).hexdigest())

    @staticmethod
    def _check_plan(prompts: Sequence[str], seeds: Sequence[int]) -> None:
        if len(prompts) != len(seeds):
            raise UserError(f"synthetic plan: {len(prompts)} prompts but {len(seeds)} seeds")

    def ensure(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        generator: ImageGenerator,
        shard: tuple[int, int] = (0, 1),
        chunk_size: int | None = None,
        progress: bool = True,
    ) -> list[CacheRecord]:
        """Generate the missing items of this shard of the plan; return their records.

        The plan is ``prompts[i]`` drawn with ``seeds[i]``; rank ``r`` of ``w`` owns the
        items ``i % w == r`` and the returned records are those, in plan order (dropped
        ones included, with ``status == "dropped"``). Items already cached intact are not
        generated again. The generator is called ``chunk_size`` items at a time (default:
        its ``batch_size`` or 8) and each chunk is on disk before the next starts.
        ``self.stats`` counts ``generated``, ``dropped`` and ``reused`` items of this call.
        """
        self._check_plan(prompts, seeds)
        rank, world = int(shard[0]), int(shard[1])
        if world < 1 or not 0 <= rank < world:
            raise UserError(f"synthetic cache: invalid shard (rank {rank}, world {world})")
        owner = f"r{rank}of{world}"
        (self.root / self.IMAGES).mkdir(parents=True, exist_ok=True)
        self._check_foreign_files()
        self._clean_own_temporaries(owner, everything=world == 1)
        self._check_generator(generator, owner)
        manifest = self.root / self.manifest_name(rank, world)
        self._repair_manifest(manifest, owner)

        mine = [i for i in range(len(prompts)) if i % world == rank]
        keys = list(dict.fromkeys((str(prompts[i]), int(seeds[i])) for i in mine))  # unique, in plan order
        valid = self.valid_records()
        todo = [k for k in keys if k not in valid]
        self.stats = {"generated": 0, "dropped": 0, "reused": len(keys) - len(todo)}

        size = int(chunk_size or getattr(generator, "batch_size", 8) or 8)
        chunks = [todo[s : s + size] for s in range(0, len(todo), size)]
        for chunk in tqdm(chunks, desc=f"synthetic images {self.root.name}", disable=not progress or not chunks):
            images = generate_with_drops(generator, [p for p, _ in chunk], [s for _, s in chunk])
            for (prompt, seed), image in zip(chunk, images):
                rec = self._store(prompt, seed, image, owner)
                self._append(manifest, rec)
                valid[rec.key] = rec
                self.stats["generated" if rec.status == "ok" else "dropped"] += 1
        return [valid[(str(prompts[i]), int(seeds[i]))] for i in mine]

    def load(self, prompts: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> SyntheticDataset:
        """The cached (PIL image, prompt) pairs, dropped items left out.

        With a plan (``prompts`` and ``seeds``) the pairs follow the plan's order and every
        item must be cached (UserError naming how many are missing); without one, every
        intact image of the folder in manifest order.
        """
        if not self.root.is_dir():
            raise UserError(f"synthetic cache {self.root} does not exist (generate it first)")
        self._check_foreign_files()
        valid = self.valid_records()
        if prompts is None and seeds is None:
            recs = [r for r in valid.values() if r.status == "ok"]
        else:
            if prompts is None or seeds is None:
                raise UserError("synthetic cache load: give both prompts and seeds, or neither")
            self._check_plan(prompts, seeds)
            keys = [(str(p), int(s)) for p, s in zip(prompts, seeds)]
            missing = [k for k in keys if k not in valid]
            if missing:
                raise UserError(f"synthetic cache {self.root}: {len(missing)} of {len(keys)} planned images are missing (run generation first)")
            recs = [valid[k] for k in keys if valid[k].status == "ok"]
        return SyntheticDataset(self.root, recs)
