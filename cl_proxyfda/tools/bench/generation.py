"""The ``generation`` section: the tiny diffusers pipeline batched versus one image at a
time, and the synthetic cache's hit path versus generation."""
from __future__ import annotations

import statistics
import time

from torch.utils.benchmark import Measurement

from cl_proxyfda.tools.bench.context import BenchContext
from cl_proxyfda.tools.bench.report import Section
from cl_proxyfda.tools.bench.timing import interleaved, timer_of


def generation_section(ctx: BenchContext) -> Section:
    from cl_proxyfda.generators.cache import SyntheticCache
    from cl_proxyfda.generators.diffusers_backend import DiffusersGenerator, build_tiny_pipeline

    s = ctx.sizes
    section = Section("generation", "tiny diffusers pipeline: batched vs one at a time; synthetic cache hit vs generation")
    pipe = ctx.tmp / "tiny_pipeline"
    if not pipe.is_dir():
        build_tiny_pipeline(pipe)
    dev = "cuda" if ctx.device.type == "cuda" else "cpu"
    common = {"model": str(pipe), "steps": s.generation_steps, "device": dev, "drop_black": False, "progress": False}
    batched = DiffusersGenerator(batch_size=s.generation_batch, **common)
    single = DiffusersGenerator(batch_size=1, **common)
    n = s.generation_batch
    prompts = [f"a photo of a {c} circle." for c in ("red", "green", "blue", "yellow", "purple", "cyan", "orange", "gray")]
    prompts = (prompts * (n // len(prompts) + 1))[:n]
    seeds = list(range(n))
    for gen in (batched, single):  # also the first warm-up
        images = gen.generate(prompts, seeds)
        if len(images) != n:
            raise RuntimeError(f"bench generation: {len(images)} images for {n} prompts")
    found = interleaved([("batched", lambda: batched.generate(prompts, seeds)), ("single", lambda: single.generate(prompts, seeds))],
                        s.repeats, s.min_run_time / s.repeats)
    tb, ts = found["batched"].median, found["single"].median
    ips_b, ips_s = n / tb, n / ts
    section.columns = ["what", "median ms", "images/s", "ratio"]
    r_batch = section.add_ratio("generation_batched_over_single_images_per_s", ips_b / ips_s)
    section.rows += [
        [f"batch of {n} in one pipeline call", 1000 * tb, ips_b, r_batch],
        [f"{n} calls of one image", 1000 * ts, ips_s, 1.0],
    ]
    m = s.cache_images
    cprompts = (prompts * (m // len(prompts) + 1))[:m]
    cseeds = list(range(100, 100 + m))
    tg: list[float] = []
    th: list[Measurement] = []
    for r in range(s.repeats):
        cache = SyntheticCache(ctx.tmp / f"cache_{r}")
        t0 = time.perf_counter()  # one call: on a fresh cache only the first ensure generates (a Timer would warm up first)
        cache.ensure(cprompts, cseeds, batched, progress=False)
        tg.append(time.perf_counter() - t0)
        if cache.stats.get("generated") != m:
            raise RuntimeError(f"bench generation: expected {m} generated images, got {cache.stats}")

        def hit(cache: SyntheticCache = cache) -> None:
            cache.ensure(cprompts, cseeds, batched, progress=False)
            data = cache.load(cprompts, cseeds)
            _ = [data[i][0].size for i in range(len(data))]

        th.append(timer_of(hit, "cache hit").blocked_autorange(min_run_time=s.min_run_time / s.repeats))
        if cache.stats.get("reused") != m:
            raise RuntimeError(f"bench generation: expected {m} reused images, got {cache.stats}")
    mg, mh = statistics.median(tg), Measurement.merge(th)[0].median
    r_cache = section.add_ratio("cache_generation_over_hit", mg / mh)
    section.rows += [
        [f"SyntheticCache.ensure, {m} images generated and written", 1000 * mg, m / mg, r_cache],
        [f"cache hit: ensure (all reused, SHA-256 checked) + load + decode {m} images", 1000 * mh, m / mh, 1.0],
    ]
    section.setting = (
        f"tiny random Stable Diffusion pipeline (build_tiny_pipeline, 32x32 images), {s.generation_steps} steps, guidance 7.5, "
        f"{dev}, fp32 on CPU / fp16 on CUDA; pipeline calls: Timer.blocked_autorange medians pooled over {s.repeats} interleaved rounds; "
        f"cache: a fresh cache per round, its generating ensure timed once, its hit path by Timer.blocked_autorange."
    )
    return section
