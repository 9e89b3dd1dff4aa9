"""The ``awc`` section: AWC's per-iteration importance (and penalty) cost relative to a
naive training step."""
from __future__ import annotations

import torch

from cl_proxyfda.tools.bench.context import BenchContext
from cl_proxyfda.tools.bench.report import Section
from cl_proxyfda.tools.bench.step_timer import StepEntry, measure_steps
from cl_proxyfda.tools.bench.timing import seconds_per_call


def awc_section(ctx: BenchContext) -> Section:
    from cl_proxyfda.losses.awc import awc_penalty_and_grad, importance_from_grads, snapshot
    from cl_proxyfda.strategies.anchors import trainable_named_parameters

    s = ctx.sizes
    section = Section("awc", "AWC's per-iteration cost relative to a naive step")
    results, notes = measure_steps(ctx, [StepEntry("naive", [{"name": "naive"}])], batch_size=s.batch_size)
    if not results:
        raise RuntimeError("bench awc: the naive step could not be measured: " + "; ".join(notes))
    step = results[0].median
    from cl_proxyfda.runner import build_run

    run = build_run(ctx.run_config([{"name": "naive"}]))
    run.strategy.iterations_for = lambda n: 1
    run.strategy.train(run.benchmark.train_stream[0])  # leaves the last step's gradients in .grad
    named = trainable_named_parameters(run.strategy)
    grads = {n: p.grad for n, p in named}
    if any(g is None for g in grads.values()):
        raise RuntimeError("bench awc: some trainable parameters have no gradient after a step")
    params = dict(named)
    anchor = {n: (p.detach() + 1e-3 * torch.randn_like(p)) for n, p in named}
    importance = importance_from_grads(grads, params)
    device = run.device

    def penalty_forward_backward() -> None:
        awc_penalty_and_grad(named, anchor, importance)  # value and analytic gradient, as the plugin computes them

    t_imp = seconds_per_call(lambda: importance_from_grads(grads, params), s.min_run_time)
    t_pen = seconds_per_call(penalty_forward_backward, s.min_run_time)
    t_snap = seconds_per_call(lambda: snapshot(named), s.min_run_time)
    n_params = sum(p.numel() for _, p in named)
    section.setting = (
        f"model {ctx.model} ({ctx.pretrained_label}), image tower trained ({n_params:,} parameters in {len(named)} tensors), "
        f"batch {s.batch_size}, {device.type}; naive step: median as in the steps section; AWC parts: Timer.blocked_autorange median ({s.min_run_time:g} s each)."
    )
    section.columns = ["what", "median ms", "x naive step"]
    section.rows.append(["naive step", 1000 * step, 1.0])
    for label, key, t in (("importance_from_grads (all trainable tensors)", "importance", t_imp),
                          ("awc_penalty_and_grad (value + analytic gradient)", "penalty", t_pen),
                          ("anchor snapshot (once per experience)", "snapshot", t_snap)):
        section.rows.append([label, 1000 * t, section.add_ratio(f"awc_{key}_over_naive_step", t / step)])
    section.notes.append("AWC's gradient of the synthetic loss is shared with the update (reuse_gradient), so it is not counted here; "
                         "see the steps section's 'gift + awc' row for the whole step.")
    section.notes += notes
    return section
