"""The ``eval`` section: zero-shot evaluation of every test set with the text-embedding
cache versus without it, and an evaluation row versus one bare image forward pass."""
from __future__ import annotations

import torch

from cl_proxyfda.device import autocast_to
from cl_proxyfda.tools.bench.context import BenchContext
from cl_proxyfda.tools.bench.report import Section, Target
from cl_proxyfda.tools.bench.timing import interleaved


def eval_section(ctx: BenchContext) -> Section:
    from cl_proxyfda.runner import build_run, evaluate_row

    s = ctx.sizes
    section = Section("eval", "zero-shot evaluation: text-embedding cache, and evaluation vs a bare forward pass")
    run = build_run(ctx.run_config([{"name": "naive"}]))
    model, device = run.model, run.device
    model.to(device)
    evaluate_row(run)  # row 0: fills the evaluator's input cache and the class heads
    run.strategy.iterations_for = lambda n: s.prime_iterations
    run.strategy.train(run.benchmark.train_stream[0])
    evaluator = run.evaluator
    sets = len(evaluator.datasets)
    n_images = sum(len(d) for d in evaluator.datasets)
    batches = []
    for ds in evaluator.datasets:
        xs = [evaluator.transform(ds[i][0]) for i in range(len(ds))]
        batches += [torch.stack(xs[j : j + evaluator.batch_size]) for j in range(0, len(xs), evaluator.batch_size)]

    def forward_pass() -> None:
        model.eval()
        with torch.no_grad():
            for x in batches:
                with autocast_to(device, run.amp):
                    model.encode_image(x.to(device))
        model.train()

    def refill_heads() -> None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for t in range(len(model.tasks)):
                model.class_embeddings(t)
        model.train(was_training)

    def all_heads() -> None:
        model.text_changed()
        refill_heads()

    def row_cached() -> None:
        evaluate_row(run)

    def row_uncached() -> None:
        handle = model.register_forward_pre_hook(lambda m, args: m.text_changed())
        try:
            evaluate_row(run)
        finally:
            handle.remove()
            model.text_changed()

    calls_before = model.text_encode_calls
    row_cached()
    cached_calls = model.text_encode_calls - calls_before
    calls_before = model.text_encode_calls
    row_uncached()
    uncached_calls = model.text_encode_calls - calls_before
    refill_heads()
    jobs = [("cached", row_cached), ("uncached", row_uncached), ("forward", forward_pass), ("heads", all_heads)]
    rounds = max(4, s.repeats * 3)

    def after(key: str) -> None:
        if key in ("uncached", "heads"):
            refill_heads()  # untimed: the next cached row finds the heads in the cache

    found = interleaved(jobs, rounds, s.min_run_time / rounds, after=after)
    med = {k: m.median for k, m in found.items()}
    n_batches = len(batches)
    section.setting = (
        f"model {ctx.model} ({ctx.pretrained_label}) after one experience (image tower trained), {ctx.describe_stream()}: "
        f"{sets} test sets (tasks{' + control' if run.stream.control is not None else ''}), {n_images} images in {n_batches} batches "
        f"of up to {evaluator.batch_size}, {device.type}; Timer.blocked_autorange medians pooled over {rounds} rounds, order rotated; preprocessed inputs are in "
        "the evaluator's memory cache."
    )
    section.columns = ["what", "median ms", "ratio", "class-head computations"]
    r_text = section.add_ratio("eval_without_text_cache_over_with", med["uncached"] / med["cached"])
    r_fwd = section.add_ratio("eval_row_over_forward_pass", med["cached"] / med["forward"])
    section.rows = [
        ["evaluation row after an experience, text cache on", 1000 * med["cached"], 1.0, cached_calls],
        ["evaluation row, text cache off (text_changed() before each batch)", 1000 * med["uncached"], r_text, uncached_calls],
        ["one image forward pass over the same test sets (encode_image only)", 1000 * med["forward"], 1 / r_fwd, 0],
        ["class heads of every test set's vocabulary, computed once", 1000 * med["heads"], med["heads"] / med["cached"], len(model.tasks)],
    ]
    section.targets.append(Target("evaluation row after an experience / one forward pass", r_fwd, 1.10))
    section.notes.append(
        f"without the cache every batch recomputes its task's class heads ({uncached_calls} computations per row instead of "
        f"{cached_calls}); here that costs {r_text:.2f}x. The saving grows with batches per test set and with prompts per head "
        "(ImageNet-sized vocabularies: 1000 classes x 80 templates)."
    )
    return section
