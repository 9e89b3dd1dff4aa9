"""Prompt pools and the diffusers backend on a real tiny Stable Diffusion pipeline."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from pydantic import ValidationError  # noqa: E402

from cl_proxyfda.errors import UserError  # noqa: E402
from cl_proxyfda.generators.base import ImageGenerator  # noqa: E402
from cl_proxyfda.generators.cache import SyntheticCache, is_near_black  # noqa: E402
from cl_proxyfda.generators.diffusers_backend import DiffusersGenerator, build_tiny_pipeline  # noqa: E402
from cl_proxyfda.generators.prompt_pool import (  # noqa: E402
    apply_template,
    build_prompt_pool,
    imagenet_base_concepts,
    sample_prompts,
)
from cl_proxyfda.registry import GENERATORS  # noqa: E402

PROMPTS = ["a photo of a red circle.", "a photo of a blue square.", "a photo of a green star.", "a photo of a cat.", "a photo of a dog."]


# -- prompt pool ---------------------------------------------------------------------
def test_prompt_pool_holds_base_concepts_then_previous_tasks_with_duplicates_by_default():
    concepts = ["cat", "dog", "cat"]
    previous = [(["airbus a320", "boeing 747"], "a photo of a {}, a type of aircraft."), (["dog", "tulip"], "a photo of a {c}.")]
    expected = [
        "a photo of a cat.",
        "a photo of a dog.",
        "a photo of a cat.",  # listed twice: kept twice, as the official GIFT code does
        "a photo of a airbus a320, a type of aircraft.",
        "a photo of a boeing 747, a type of aircraft.",
        "a photo of a dog.",  # the same prompt from a previous task
        "a photo of a tulip.",
    ]
    assert build_prompt_pool(concepts, previous_tasks=previous) == expected
    # dedupe=True keeps the first occurrence of each prompt
    assert build_prompt_pool(concepts, previous_tasks=previous, dedupe=True) == [
        "a photo of a cat.",
        "a photo of a dog.",
        "a photo of a airbus a320, a type of aircraft.",
        "a photo of a boeing 747, a type of aircraft.",
        "a photo of a tulip.",
    ]
    assert build_prompt_pool(["x"], base_template="art of {}") == ["art of x"]
    assert apply_template(lambda c: f"itap of a {c}.", "mug") == "itap of a mug."
    with pytest.raises(UserError, match="placeholder"):
        build_prompt_pool(["x"], base_template="no placeholder")
    with pytest.raises(UserError, match="empty"):
        build_prompt_pool([])


def test_duplicates_kept_in_the_pool_are_drawn_proportionally_more_often():
    pool = build_prompt_pool(["a", "b", "a", "a"], base_template="{}")
    counts = Counter(sample_prompts(pool, 4000, seed=3))
    assert 2850 <= counts["a"] <= 3150 and counts["a"] + counts["b"] == 4000  # 3000 expected, sd ~27
    deduped = build_prompt_pool(["a", "b", "a", "a"], base_template="{}", dedupe=True)
    counts = Counter(sample_prompts(deduped, 4000, seed=3))
    assert 1850 <= counts["a"] <= 2150  # 2000 expected, sd ~32


def test_sample_prompts_is_seeded_uniform_with_replacement():
    pool = ["a", "b", "c"]
    first = sample_prompts(pool, 3000, seed=7)
    assert first == sample_prompts(pool, 3000, seed=7)
    assert first != sample_prompts(pool, 3000, seed=8)
    counts = Counter(first)
    assert set(counts) == set(pool)
    assert all(900 <= c <= 1100 for c in counts.values()), counts  # 1000 expected, sd ~26
    assert len(sample_prompts(["only"], 5, seed=0)) == 5  # with replacement
    assert sample_prompts(pool, 0, seed=0) == []
    with pytest.raises(UserError):
        sample_prompts([], 1, seed=0)


def test_imagenet_base_concepts_come_from_open_clip():
    names = imagenet_base_concepts()
    assert len(names) == 1000 and names[0] == "tench" and "goldfish" in names
    # Two names occur twice in the list ("missile" and "sunglasses"): kept twice by default
    # (official GIFT code), one prompt each with dedupe.
    pool = build_prompt_pool(names)
    assert len(pool) == 1000 and pool[0] == "a photo of a tench." and pool.count("a photo of a missile.") == 2
    assert len(build_prompt_pool(names, dedupe=True)) == len(set(names)) == 998


# -- diffusers backend ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd") / "pipe", seed=0)


def _arr(img):
    return np.asarray(img, dtype=np.int16)


def test_tiny_pipeline_loads_by_path_and_draws_seeded_images(tiny_pipeline):
    gen = DiffusersGenerator(str(tiny_pipeline), scheduler="dpm", steps=4, batch_size=3, progress=False)
    assert isinstance(gen, ImageGenerator)
    assert gen.local_files_only and gen.device.type in ("cpu", "cuda")
    seeds = [11, 12, 13, 14, 15]
    batch = gen.generate_kept(PROMPTS, seeds)
    assert gen.pipeline_calls == 2  # 5 images in batches of 3
    assert batch.kept == [0, 1, 2, 3, 4] and gen.dropped == 0
    assert all(img.size == (32, 32) and img.mode == "RGB" for img in batch.images)
    assert type(gen.load().scheduler).__name__ == "DPMSolverMultistepScheduler"
    # One generator per image: the image depends on prompt and seed, not on the batch.
    alone = DiffusersGenerator(str(tiny_pipeline), scheduler="dpm", steps=4, batch_size=1, progress=False)
    solo = alone.generate([PROMPTS[3], PROMPTS[1]], [14, 12])
    assert np.abs(_arr(solo[0]) - _arr(batch.images[3])).max() <= 2
    assert np.abs(_arr(solo[1]) - _arr(batch.images[1])).max() <= 2
    # Another seed, another image; same seed again, same image.
    other = gen.generate([PROMPTS[1]], [99])[0]
    assert np.abs(_arr(other) - _arr(batch.images[1])).mean() > 5
    assert np.array_equal(_arr(gen.generate([PROMPTS[1]], [12])[0]), _arr(batch.images[1]))


def test_default_scheduler_and_image_size_options(tiny_pipeline):
    gen = DiffusersGenerator(str(tiny_pipeline), scheduler=None, steps=3, height=48, width=32, progress=False)
    (img,) = gen.generate([PROMPTS[0]], [0])
    assert img.size == (32, 48)
    assert type(gen.load().scheduler).__name__ == "PNDMScheduler"  # the pipeline's own
    euler = DiffusersGenerator(str(tiny_pipeline), scheduler="euler", steps=3, progress=False)
    assert type(euler.load().scheduler).__name__ == "EulerDiscreteScheduler"


def test_near_black_images_are_dropped_and_counted(tiny_pipeline):
    gen = DiffusersGenerator(str(tiny_pipeline), scheduler="dpm", steps=3, batch_size=4, progress=False)
    pipe = gen.load()
    with torch.no_grad():  # a decoder that outputs black, as a safety checker's replacement does
        pipe.vae.decoder.conv_out.bias.fill_(-50.0)
    batch = gen.generate_kept(PROMPTS[:3], [1, 2, 3])
    assert batch.images == [] and batch.kept == [] and gen.dropped == 3
    keep_all = DiffusersGenerator(str(tiny_pipeline), steps=3, drop_black=False, progress=False)
    with torch.no_grad():
        keep_all.load().vae.decoder.conv_out.bias.fill_(-50.0)
    imgs = keep_all.generate(PROMPTS[:2], [1, 2])
    assert len(imgs) == 2 and all(is_near_black(im) for im in imgs) and keep_all.dropped == 0

    # The cache records them as dropped and does not ask again.
    cache_root = tiny_pipeline.parent / "black_cache"
    records = SyntheticCache(cache_root).ensure(PROMPTS[:3], [1, 2, 3], gen, progress=False)
    assert [r.status for r in records] == ["dropped"] * 3
    calls = gen.pipeline_calls
    SyntheticCache(cache_root).ensure(PROMPTS[:3], [1, 2, 3], gen, progress=False)
    assert gen.pipeline_calls == calls


def test_cache_with_the_diffusers_backend_generates_once(tiny_pipeline, tmp_path):
    gen = DiffusersGenerator(str(tiny_pipeline), scheduler="dpm", steps=3, batch_size=4, progress=False)
    cache = SyntheticCache(tmp_path / "syn")
    prompts, seeds = PROMPTS, [3, 4, 5, 6, 7]
    cache.ensure(prompts, seeds, gen, progress=False)
    assert gen.pipeline_calls == 2 and cache.stats["generated"] == 5
    cache.ensure(prompts, seeds, gen, progress=False)
    assert gen.pipeline_calls == 2 and cache.stats["reused"] == 5
    data = cache.load(prompts, seeds)
    assert [p for _, p in data] == prompts
    fresh = gen.generate([prompts[2]], [5])[0]
    assert np.array_equal(_arr(data[2][0]), _arr(fresh))  # PNG is lossless
    changed = DiffusersGenerator(str(tiny_pipeline), scheduler="dpm", steps=4, progress=False)
    with pytest.raises(UserError, match="was made by generator"):
        cache.ensure(prompts, seeds, changed, progress=False)


def test_registry_builds_the_diffusers_generator(tiny_pipeline):
    gen = GENERATORS.build("diffusers", {"model": str(tiny_pipeline), "steps": 4, "scheduler": "ddim", "dtype": "fp32"})
    assert isinstance(gen, DiffusersGenerator) and gen.steps == 4 and gen.dtype == torch.float32
    assert GENERATORS.build("diffusers", {"model": str(tiny_pipeline)}, device="cpu").device.type == "cpu"
    defaults = GENERATORS.build("diffusers", {})
    assert (defaults.steps, defaults.guidance, defaults.batch_size, defaults.drop_black) == (50, 7.5, 8, True)
    assert defaults.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert DiffusersGenerator(device="cpu", dtype="auto").dtype == torch.float32
    assert DiffusersGenerator(device="cpu", dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ValidationError):
        GENERATORS.build("diffusers", {"model": "x", "stepz": 3})
    with pytest.raises(ValidationError):
        GENERATORS.build("diffusers", {"scheduler": "magic"})
    with pytest.raises(UserError):
        DiffusersGenerator(scheduler="magic")


def test_missing_models_fail_with_a_user_error_and_no_download(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        DiffusersGenerator(str(tmp_path / "nowhere"), progress=False).load()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = DiffusersGenerator("some-org/not-a-cached-model", progress=False)
    assert hub.local_files_only
    with pytest.raises(UserError, match=r"generator.model: cannot get the text-to-image pipeline some-org/not-a-cached-model: it is not in the local cache and offline mode is on"):
        hub.load()
