"""The synthetic-image disk cache: idempotent, resumable after SIGKILL, self-checking.

``SolidColourGenerator`` below is a real generator (it implements the generator
protocol and draws solid colours, slowly if asked); running this file as a script
generates a plan into a cache folder, which the kill-and-resume test kills mid-way.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from cl_proxyfda.errors import UserError  # noqa: E402
from cl_proxyfda.generators.cache import (  # noqa: E402
    CacheRecord,
    GeneratedBatch,
    SyntheticCache,
    cache_folder,
    generate_with_drops,
    is_near_black,
)


def colour_of(seed: int) -> tuple[int, int, int]:
    return (64 + (seed * 37) % 192, 64 + (seed * 91) % 192, 64 + (seed * 53) % 192)


class SolidColourGenerator:
    """Draws one solid 16x16 image per prompt, its colour set by the seed.

    Seeds divisible by 5 give a black image, which the generator drops (as a diffusers
    generator drops safety-checker outputs). ``delay`` seconds are spent per image.
    """

    name = "solid-colour"

    def __init__(self, delay: float = 0.0, tag: str = "v1") -> None:
        self.delay = delay
        self.config_id = f"solid-colour/{tag}"
        self.batch_size = 4
        self.calls = 0
        self.requested: list[tuple[str, int]] = []

    def _draw(self, seed: int) -> Image.Image:
        if seed % 5 == 0:
            return Image.new("RGB", (16, 16), (0, 0, 0))
        return Image.new("RGB", (16, 16), colour_of(seed))

    def generate_kept(self, prompts: Sequence[str], seeds: Sequence[int]) -> GeneratedBatch:
        self.calls += 1
        images, kept = [], []
        for i, (p, s) in enumerate(zip(prompts, seeds)):
            time.sleep(self.delay)
            self.requested.append((p, int(s)))
            img = self._draw(int(s))
            if not is_near_black(img):
                images.append(img)
                kept.append(i)
        return GeneratedBatch(images, kept)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        return self.generate_kept(prompts, seeds).images


def make_plan(n: int) -> tuple[list[str], list[int]]:
    prompts = [f"a photo of a thing {i % 7}." for i in range(n)]
    seeds = [1000 + i for i in range(n)]  # seeds 1000, 1005, ... are dropped (black)
    return prompts, seeds


def manifest_records(root: Path) -> list[dict]:
    out = []
    for m in sorted(root.glob("manifest*.jsonl")):
        complete = m.read_text().split("\n")[:-1]  # a last line without newline was cut short
        out += [json.loads(line) for line in complete if line.strip()]
    return out


def check_consistent(root: Path, prompts: list[str], seeds: list[int]) -> None:
    """Exactly the planned images, each once, intact, with the right colour; nothing else."""
    recs = manifest_records(root)
    keys = [(r["prompt"], r["seed"]) for r in recs]
    assert len(keys) == len(set(keys)), "a planned image was recorded twice"
    assert set(keys) == set(zip(prompts, seeds))
    files = sorted(p.name for p in (root / "images").iterdir())
    ok = [r for r in recs if r["status"] == "ok"]
    assert files == sorted(Path(r["file"]).name for r in ok), "stray, missing or temporary files"
    for r in ok:
        data = (root / r["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
        arr = np.asarray(Image.open(root / r["file"]).convert("RGB"))
        assert tuple(arr[0, 0]) == colour_of(r["seed"]) and (arr == arr[0, 0]).all()
    dropped = {r["seed"] for r in recs if r["status"] == "dropped"}
    assert dropped == {s for s in seeds if s % 5 == 0}


def test_second_call_does_no_work_and_load_follows_the_plan(tmp_path):
    prompts, seeds = make_plan(12)
    cache = SyntheticCache(tmp_path / "exp")
    gen = SolidColourGenerator()
    records = cache.ensure(prompts, seeds, gen, progress=False)
    assert gen.calls == 3  # 12 items in chunks of the generator's batch_size 4
    assert len(records) == 12 and [r.key for r in records] == list(zip(prompts, seeds))
    assert [r.status for r in records].count("dropped") == 3  # seeds 1000, 1005, 1010
    assert cache.stats == {"generated": 9, "dropped": 3, "reused": 0}
    check_consistent(tmp_path / "exp", prompts, seeds)

    again = SolidColourGenerator()
    assert cache.ensure(prompts, seeds, again, progress=False) == records
    assert again.calls == 0 and cache.stats == {"generated": 0, "dropped": 0, "reused": 12}

    data = cache.load(prompts, seeds)
    assert len(data) == 9
    kept_seeds = [s for s in seeds if s % 5]
    assert data.prompts == [p for p, s in zip(prompts, seeds) if s % 5]
    for i, (img, prompt) in enumerate(data):
        assert prompt == data.prompts[i]
        assert img.mode == "RGB" and img.getpixel((3, 3)) == colour_of(kept_seeds[i])
    assert len(cache.load()) == 9


def test_duplicate_plan_items_are_generated_once(tmp_path):
    prompts, seeds = ["a", "b", "a", "a"], [1, 2, 1, 3]
    gen = SolidColourGenerator()
    records = SyntheticCache(tmp_path).ensure(prompts, seeds, gen, progress=False)
    assert sorted(gen.requested) == [("a", 1), ("a", 3), ("b", 2)]
    assert records[0] == records[2]
    assert len(SyntheticCache(tmp_path).load(prompts, seeds)) == 4


def test_kill_during_generation_then_resume_makes_exactly_the_plan(tmp_path):
    root = tmp_path / "exp"
    n = 24
    proc = subprocess.Popen(
        [sys.executable, __file__, str(root), str(n), "0.15"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    manifest = root / "manifest.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if manifest.is_file() and manifest.read_bytes().count(b"\n") >= 6:
                break
            if proc.poll() is not None:
                pytest.fail(f"generation subprocess ended early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
        else:
            pytest.fail("generation subprocess made no progress in 120 s")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done_before = len(manifest_records(root))
    assert 6 <= done_before < n, "the kill must land in the middle of the generation"

    prompts, seeds = make_plan(n)
    cache = SyntheticCache(root)
    gen = SolidColourGenerator()
    records = cache.ensure(prompts, seeds, gen, chunk_size=1, progress=False)
    assert cache.stats["reused"] == done_before
    assert len(gen.requested) == n - done_before  # only what was missing
    assert not set(gen.requested) & {(r["prompt"], r["seed"]) for r in manifest_records(root)[:done_before]}
    assert [r.key for r in records] == list(zip(prompts, seeds))
    check_consistent(root, prompts, seeds)
    assert not [p for p in root.rglob(".tmp-*")]


def test_corrupted_truncated_or_deleted_images_are_regenerated(tmp_path):
    prompts, seeds = make_plan(8)
    cache = SyntheticCache(tmp_path)
    cache.ensure(prompts, seeds, SolidColourGenerator(), progress=False)
    ok = [r for r in manifest_records(tmp_path) if r["status"] == "ok"]
    truncated, flipped, deleted = (tmp_path / ok[0]["file"]), (tmp_path / ok[1]["file"]), (tmp_path / ok[2]["file"])
    truncated.write_bytes(truncated.read_bytes()[:20])
    data = bytearray(flipped.read_bytes())
    data[-20] ^= 0xFF
    flipped.write_bytes(bytes(data))
    deleted.unlink()
    with pytest.raises(UserError, match="missing"):
        cache.load(prompts, seeds)

    gen = SolidColourGenerator()
    cache.ensure(prompts, seeds, gen, progress=False)
    assert sorted(s for _, s in gen.requested) == sorted(r["seed"] for r in ok[:3])
    assert cache.stats == {"generated": 3, "dropped": 0, "reused": 5}
    for f in (truncated, flipped, deleted):
        latest = [r for r in manifest_records(tmp_path) if r.get("file") == f"images/{f.name}"][-1]
        assert hashlib.sha256(f.read_bytes()).hexdigest() == latest["sha256"]
    assert len(cache.load(prompts, seeds)) == 6


def test_a_truncated_last_manifest_line_is_repaired(tmp_path):
    prompts, seeds = make_plan(6)
    cache = SyntheticCache(tmp_path)
    cache.ensure(prompts[:4], seeds[:4], SolidColourGenerator(), progress=False)
    with open(tmp_path / "manifest.jsonl", "ab") as f:
        f.write(b'{"file": "images/00')  # a record cut short by a kill
    gen = SolidColourGenerator()
    cache.ensure(prompts, seeds, gen, progress=False)
    assert len(gen.requested) == 2
    assert (tmp_path / "manifest.jsonl").read_bytes().endswith(b"\n")
    assert len(manifest_records(tmp_path)) == 6


def test_dropped_images_are_recorded_and_not_retried(tmp_path):
    prompts, seeds = ["x", "y"], [5, 10]
    cache = SyntheticCache(tmp_path)
    recs = cache.ensure(prompts, seeds, SolidColourGenerator(), progress=False)
    assert [r.status for r in recs] == ["dropped", "dropped"] and all(r.file is None for r in recs)
    gen = SolidColourGenerator()
    cache.ensure(prompts, seeds, gen, progress=False)
    assert gen.calls == 0
    assert len(cache.load(prompts, seeds)) == 0


@pytest.mark.parametrize("bad", ["../evil.png", "/etc/passwd", "images/../../evil.png", "images/sub/x.png", "cache.json"])
def test_manifest_paths_outside_the_cache_folder_are_refused(tmp_path, bad):
    prompts, seeds = make_plan(3)
    cache = SyntheticCache(tmp_path)
    cache.ensure(prompts, seeds, SolidColourGenerator(), progress=False)
    rec = {"prompt": "p", "seed": 1, "status": "ok", "file": bad, "sha256": "0" * 64}
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    with pytest.raises(UserError, match="outside the cache folder"):
        cache.ensure(prompts, seeds, SolidColourGenerator(), progress=False)
    with pytest.raises(UserError, match="outside the cache folder"):
        cache.load()


def test_foreign_files_are_reported_by_name(tmp_path):
    prompts, seeds = make_plan(3)
    cache = SyntheticCache(tmp_path)
    cache.ensure(prompts, seeds, SolidColourGenerator(), progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "images" / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(UserError, match=r"holiday\.jpg.*notes\.txt|notes\.txt.*holiday\.jpg") as err:
        cache.ensure(prompts, seeds, SolidColourGenerator(), progress=False)
    assert "did not write" in str(err.value)
    with pytest.raises(UserError, match="notes.txt"):
        cache.load()


def test_a_different_generator_is_refused(tmp_path):
    prompts, seeds = make_plan(3)
    cache = SyntheticCache(tmp_path)
    cache.ensure(prompts, seeds, SolidColourGenerator(tag="v1"), progress=False)
    with pytest.raises(UserError, match="was made by generator"):
        cache.ensure(prompts, seeds, SolidColourGenerator(tag="v2"), progress=False)


def test_sharded_ranks_generate_disjoint_shares(tmp_path):
    prompts, seeds = make_plan(11)
    gens = [SolidColourGenerator(), SolidColourGenerator()]
    recs = [SyntheticCache(tmp_path).ensure(prompts, seeds, gens[r], shard=(r, 2), progress=False) for r in (0, 1)]
    for r in (0, 1):
        assert sorted(gens[r].requested) == sorted((prompts[i], seeds[i]) for i in range(11) if i % 2 == r)
        assert [x.key for x in recs[r]] == [(prompts[i], seeds[i]) for i in range(11) if i % 2 == r]
    assert sorted(p.name for p in tmp_path.glob("manifest*")) == ["manifest.rank0of2.jsonl", "manifest.rank1of2.jsonl"]
    check_consistent(tmp_path, prompts, seeds)
    single = SolidColourGenerator()
    SyntheticCache(tmp_path).ensure(prompts, seeds, single, progress=False)
    assert single.calls == 0
    assert len(SyntheticCache(tmp_path).load(prompts, seeds)) == len([s for s in seeds if s % 5])
    with pytest.raises(UserError, match="invalid shard"):
        SyntheticCache(tmp_path).ensure(prompts, seeds, single, shard=(2, 2))


def test_plan_errors_and_cache_folder_layout(tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    with pytest.raises(UserError, match="2 prompts but 1 seeds"):
        cache.ensure(["a", "b"], [1], SolidColourGenerator())
    with pytest.raises(UserError, match="does not exist"):
        SyntheticCache(tmp_path / "none").load()
    assert cache_folder(tmp_path, "mtil", "order_I", 3) == tmp_path / "mtil" / "order_I" / "experience_003"
    for bad in ("../up", "a/b", "", ".hidden"):
        with pytest.raises(UserError):
            cache_folder(tmp_path, bad, "I", 0)


def test_plain_generators_without_drops_are_accepted():
    class Plain:
        name = "plain"

        def generate(self, prompts, seeds):
            return [Image.new("RGB", (4, 4), colour_of(s)) for s in seeds]

    out = generate_with_drops(Plain(), ["a", "b"], [1, 2])
    assert [im.getpixel((0, 0)) for im in out] == [colour_of(1), colour_of(2)]
    assert generate_with_drops(SolidColourGenerator(), ["a", "b"], [5, 6])[0] is None
    assert isinstance(CacheRecord("p", 1, "dropped").key, tuple)


if __name__ == "__main__":  # the generation the kill-and-resume test kills
    root_arg, n_arg, delay_arg = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    plan_prompts, plan_seeds = make_plan(n_arg)
    SyntheticCache(root_arg).ensure(plan_prompts, plan_seeds, SolidColourGenerator(delay=delay_arg), chunk_size=1, progress=False)
