"""The runner: a validated RunConfig in, a run folder with results out.

Flow per run: build stream, model and plugins (any bad input fails here, before a file
is written) -> lock the run folder -> evaluate row 0 -> for each experience: train once,
evaluate every task and the control set, save results, plots and a checkpoint ->
summary table. ``--resume`` continues only a folder written with the same resolved
config (see :mod:`cl_proxyfda.runfolder`) and first rewrites the results files from the
checkpoint.
"""
from __future__ import annotations

import copy
import inspect
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from avalanche.core import SupervisedPlugin
from torch import nn

from cl_proxyfda import checkpoint as ckpt
from cl_proxyfda.config import RunConfig
from cl_proxyfda.device import resolve_device
from cl_proxyfda.distributed import DistContext, barrier, init_distributed
from cl_proxyfda.errors import TrainingDiverged, UserError
from cl_proxyfda.evaluation import TaskEvaluator
from cl_proxyfda.io import write_atomic
from cl_proxyfda.ledger import build_ledger, peak_rss_mb
from cl_proxyfda.models import CLIPTaskModel, build_task_model
from cl_proxyfda.probe import probe_row
from cl_proxyfda.registry import STREAMS, load_builtin_components
from cl_proxyfda.runfolder import FolderLock, check_output_folder, check_same_config, make_output_folder
from cl_proxyfda.strategies.base import RunContext
from cl_proxyfda.teacher import TeacherBank, unwrap
from cl_proxyfda.training import CLStrategy

DEFAULT_ITERATIONS = 100


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise UserError("run.precision: fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


class ProgressPlugin(SupervisedPlugin):
    """A tqdm bar per experience showing the loss."""

    def __init__(self, names: list[str], enabled: bool = True) -> None:
        super().__init__()
        self.names, self.enabled, self.bar = names, enabled, None

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        i = strategy.experience_index
        self.bar = tqdm(total=strategy.total_steps, desc=f"exp {i + 1}/{len(self.names)} {self.names[i]}", leave=False, file=sys.stderr, dynamic_ncols=True)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if strategy.clock.train_exp_iterations % 10 == 0:
                self.bar.set_postfix(loss=f"{float(strategy.loss.detach()):.3f}")

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the bar (also when training stops early), so later lines start clean."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class Run:
    """Everything a run is built from; ``execute`` does the work."""

    config: RunConfig
    out_dir: Path
    stream: Any
    model: CLIPTaskModel
    strategy: CLStrategy
    plugins: list[Any]
    benchmark: Any
    evaluator: TaskEvaluator
    device: torch.device
    amp: torch.dtype | None
    logger: Any = None
    train_log: Any = None  # cl_proxyfda.train_log.TrainLog on rank 0 while executing
    dist: DistContext = field(default_factory=DistContext)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.stream.tasks]


def _make_batch_sampler(cfg: RunConfig) -> Any:
    seed = cfg.run.seed
    kind, m_classes, n_per_class = cfg.sampler_layout()

    def factory(exp_index: int, targets: list[int], iterations: int, class_similarity: np.ndarray | None) -> Any:
        from cl_proxyfda.benchmarks.samplers import ClassBalancedBatchSampler, RandomBatchSampler

        exp_seed = seed * 1_000_003 + exp_index
        if kind == "class_balanced":
            return ClassBalancedBatchSampler(
                targets,
                m_classes=m_classes,
                n_per_class=n_per_class,
                iterations=iterations,
                seed=exp_seed,
                class_similarity=class_similarity,
                hard_mining=cfg.train.hard_class_mining,
                mining_temperature=cfg.train.mining_temperature,
            )
        return RandomBatchSampler(len(targets), cfg.train.batch_size, iterations, exp_seed)

    return factory


def build_run(cfg: RunConfig, out_dir: Path | None = None) -> Run:
    """Build stream, model, plugins and strategy; writes nothing."""
    load_builtin_components()
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    ctx = init_distributed(device.type)
    if ctx.enabled:
        if cfg.train.batch_size % ctx.world:
            raise UserError(f"train.batch_size: {cfg.train.batch_size} does not split evenly over {ctx.world} processes")
        if device.type == "cuda":
            device = torch.device("cuda", ctx.local_rank)
    amp = autocast_dtype(cfg.run.precision, device)
    stream = STREAMS.build(cfg.stream.name, cfg.stream.args, run_seed=cfg.run.seed)
    tasks = list(stream.tasks)
    if not tasks:
        raise UserError("stream: the stream has no tasks")
    from cl_proxyfda.benchmarks.stream import check_unique_names, to_avalanche

    check_unique_names(tasks)
    if cfg.eval.control_probe != "none" and stream.control is None and not cfg.eval.probe_tasks:
        raise UserError(f"eval.control_probe: {cfg.eval.control_probe} needs a control set, and stream {cfg.stream.name!r} has none (or set eval.probe_tasks: true)")
    for name in cfg.train.lr_per_task:
        if name not in {t.name for t in tasks}:
            raise UserError(f"train.lr_per_task: unknown task {name!r} (tasks: {', '.join(t.name for t in tasks)})")
    vocab = [t.vocabulary for t in tasks] + ([stream.control.vocabulary] if stream.control is not None else [])
    model, pre_train, pre_eval = build_task_model(
        cfg.model.name, cfg.model.pretrained, vocab, cfg.model.train_towers, cfg.model.freeze_logit_scale, device="cpu",
        text_templates=cfg.train.text_templates,
    )
    if cfg.model.adapter is not None:
        from cl_proxyfda.adapters import inject_adapters

        inject_adapters(model.clip, cfg.model.adapter)
        model.set_trainable(cfg.model.train_towers, cfg.model.freeze_logit_scale)
    if cfg.model.prompt_learner is not None:
        from cl_proxyfda.prompt_learner import attach_prompt_learner

        attach_prompt_learner(model, cfg.model.prompt_learner)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    run_context = RunContext(
        task_names=tuple(t.name for t in tasks),
        classnames=tuple(tuple(t.classnames) for t in tasks),
        stream=stream,
        stream_name=cfg.stream.name,
        stream_args=cfg.stream.args,
        seed=cfg.run.seed,
        workers=cfg.train.workers,
        train_batch_size=cfg.train.batch_size,
        eval_batch_size=cfg.eval.batch_size,
        augment=cfg.train.augment,
        output_dir=cfg.run.output_dir,
        progress=cfg.logging.progress,
        rank=ctx.rank,
        world=ctx.world,
        device=str(device),
    )
    plugins = []
    for entry in cfg.strategies:  # an entry may stand for several plugins (a recipe's parts)
        for plugin in entry.plugin.build_plugins(entry.params, run_context):
            plugins.append(plugin)
            layers = getattr(plugin, "needs_layers", ())
            if layers:
                model.capture_layers(layers)

    iterations = cfg.train.iterations
    epochs = cfg.train.epochs
    batch = cfg.train.batch_size

    def iterations_for(n_items: int) -> int:
        if iterations is not None:
            return iterations
        if epochs is not None:
            return epochs * max(1, -(-n_items // batch))
        return DEFAULT_ITERATIONS

    def lr_for(exp_index: int) -> float:
        return cfg.train.lr_per_task.get(tasks[exp_index].name, cfg.train.lr)

    progress = ProgressPlugin([t.name for t in tasks], enabled=cfg.logging.progress and ctx.is_main)
    trained: nn.Module = model
    if ctx.enabled:
        model.to(device)
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    strategy = CLStrategy(
        model=trained,
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing),
        train_mb_size=batch,
        plugins=[*plugins, progress],
        device=device,
        lr_for_experience=lr_for,
        iterations_for=iterations_for,
        batch_sampler=_make_batch_sampler(cfg),
        optimizer=cfg.train.optimizer,
        weight_decay=cfg.train.weight_decay,
        warmup=cfg.train.warmup,
        schedule=cfg.train.schedule,
        grad_clip=cfg.train.grad_clip,
        workers=cfg.train.workers,
        num_experiences=len(tasks),
        autocast_dtype=amp,
        dist_context=ctx,
        batch_indices=cfg.train.teacher_table,
        teachers=TeacherBank(
            initial_state=initial_state, half=cfg.run.teacher_half, table=cfg.train.teacher_table, table_batch_size=cfg.eval.batch_size
        ),
    )
    benchmark = to_avalanche(tasks, pre_train if cfg.train.augment else pre_eval, pre_eval)
    test_sets = [t.test for t in tasks] + ([stream.control.test] if stream.control is not None else [])
    evaluator = TaskEvaluator(test_sets, pre_eval, batch_size=cfg.eval.batch_size, workers=cfg.train.workers, dist_context=ctx)
    out = Path(out_dir) if out_dir is not None else Path(cfg.run.output_dir) / cfg.run.name
    return Run(cfg, out, stream, model, strategy, plugins, benchmark, evaluator, device, amp, dist=ctx)


def _check_out_dir(out: Path, resume: bool, cfg: RunConfig | None = None) -> None:
    """The output path can be a run folder; without ``resume`` it holds no run; with
    ``resume`` a run in it was written with the same resolved config. Writes nothing."""
    check_output_folder(out)
    if not resume and out.is_dir() and any((out / name).exists() for name in ("metrics.json", "checkpoints", "config.yaml")):
        raise UserError(f"--out: {out} already holds a run; pass --resume to continue it or choose another folder")
    if resume and cfg is not None and out.is_dir():
        check_same_config(out, cfg.to_dict())


def _lock_run_folder(run: "Run") -> FolderLock | None:
    """Create the run folder and lock it on rank 0; every rank fails when rank 0 cannot."""
    lock, error = None, None
    if run.dist.is_main:
        try:
            make_output_folder(run.out_dir)
            lock = FolderLock(run.out_dir).acquire()
        except UserError as exc:
            error = exc
    if run.dist.enabled:
        from cl_proxyfda.distributed import sum_across

        failed = sum_across([1.0 if error is not None else 0.0], run.device)[0]
        if failed and error is None:
            error = UserError(f"run folder: rank 0 could not take the lock of {run.out_dir}")
    if error is not None:
        raise error
    return lock


def _trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _plugin_states(plugins: list[Any]) -> dict[str, Any]:
    return {f"{i}:{getattr(p, 'name', type(p).__name__)}": p.state_dict() for i, p in enumerate(plugins) if hasattr(p, "state_dict")}


def _load_plugin_states(run: Run, states: dict[str, Any], source: Path) -> None:
    expected = {f"{i}:{getattr(p, 'name', type(p).__name__)}" for i, p in enumerate(run.plugins) if hasattr(p, "state_dict")}
    if set(states) != expected:
        raise UserError(f"checkpoint in {source} was written with strategies {sorted(states)}, the config has {sorted(expected)}")
    for i, plugin in enumerate(run.plugins):
        key = f"{i}:{getattr(plugin, 'name', type(plugin).__name__)}"
        if key not in states:
            continue
        # Plugins whose state needs the model (Avalanche's LwF / EWC wrappers) say so in
        # their signature; a TypeError from inside a plugin is a real error, not a retry.
        takes_model = "model" in inspect.signature(plugin.load_state_dict).parameters
        plugin.load_state_dict(states[key], **({"model": run.model} if takes_model else {}))


TASK_AGNOSTIC = "task_agnostic"  # name of the X-TAIL extra matrix (cl_proxyfda.union)


def stream_union(run: Run) -> Any:
    """The union vocabulary of the stream's tasks (built once per run)."""
    if "union" not in run.extra:
        from cl_proxyfda.union import build_union

        run.extra["union"] = build_union([t.vocabulary for t in run.stream.tasks])
    return run.extra["union"]


def task_agnostic_meta(run: Run) -> dict[str, Any]:
    """What metrics.json records of the union: its size, head templates and shared names."""
    union = stream_union(run)
    return {"classes": union.num_classes, "templates": run.config.eval.task_agnostic_templates, "shared_names": union.shared()}


def evaluate_row(run: Run) -> tuple[list[float], float | None]:
    """Accuracy on every task, and on the control set when there is one.

    With ``eval.task_agnostic`` the same image forward also scores each task over the
    union vocabulary; that row waits in ``run.extra`` for :func:`extra_rows`.
    """
    n = len(run.stream.tasks)
    if run.config.eval.task_agnostic:
        union, templates = stream_union(run), run.config.eval.task_agnostic_templates or "task"
        pairs = [run.evaluator.accuracy_with_union(run.model, t, union, templates, device=run.device, autocast_dtype=run.amp) for t in range(n)]
        row = [own for own, _ in pairs]
        run.extra["task_agnostic_row"] = [agnostic for _, agnostic in pairs]
    else:
        row = [run.evaluator.accuracy(run.model, t, device=run.device, autocast_dtype=run.amp) for t in range(n)]
    control = None
    if run.stream.control is not None and run.config.eval.control:
        control = run.evaluator.accuracy(run.model, n, device=run.device, autocast_dtype=run.amp)
    return row, control


def extra_rows(run: Run) -> dict[str, list[float]] | None:
    """Rows of the extra matrices: image retrieval mAP@k and Recall@1 with eval.retrieval,
    task-agnostic accuracy with eval.task_agnostic (scored by :func:`evaluate_row`)."""
    out: dict[str, list[float]] = {}
    if run.config.eval.task_agnostic:
        out[TASK_AGNOSTIC] = run.extra.pop("task_agnostic_row")
    if run.config.eval.retrieval:
        from cl_proxyfda.retrieval import retrieval_row

        out.update(retrieval_row(run.model, run.evaluator, len(run.stream.tasks), run.device, k=run.config.eval.retrieval_k))
    return out or None


def execute(run: Run, resume: bool = False, quiet: bool = False) -> Any:
    """Train through the stream, evaluating after each experience; returns RunResults.

    ``quiet`` suppresses the per-experience lines and the final table (comparisons).
    The run folder is locked (``.lock``) for the life of the call.
    """
    cfg = run.config
    out = run.out_dir
    _check_out_dir(out, resume, cfg)
    barrier()  # every process checked the folder before rank 0 writes into it
    lock = _lock_run_folder(run)
    try:
        return _execute_locked(run, resume, quiet)
    finally:
        if lock is not None:
            lock.release()


def _execute_locked(run: Run, resume: bool, quiet: bool) -> Any:
    from cl_proxyfda.results import RunResults

    cfg, out = run.config, run.out_dir
    _check_out_dir(out, resume, cfg)  # again, now that no other run can write here
    barrier()  # every process checked again before rank 0 writes config.yaml
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    ckpt_dir = out / "checkpoints"
    results = None
    start = 0
    state = ckpt.load_latest_checkpoint(ckpt_dir) if resume else None
    if state is not None:
        check_same_config(out, cfg.to_dict(), fallback=state.get("config"))
        _restore(run, state, ckpt_dir)
        results = RunResults.from_dict(state["results"])
        start = int(state["experience"])
    elif resume and run.dist.is_main and not quiet and any((out / n).exists() for n in ("metrics.json", "config.yaml", "checkpoints")):
        print(f"resume: no checkpoint in {ckpt_dir}; starting {out} again from the first experience", file=sys.stderr)
    if run.dist.is_main:
        write_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        run.logger = _make_logger(run)
        _start_train_log(run, start)
    barrier()
    exit_code = 1
    try:
        results = _train_stream(run, results, start, quiet)
        exit_code = 0
    except TrainingDiverged as exc:
        kept = ckpt.list_checkpoints(ckpt_dir) if run.dist.is_main else []
        exc.checkpoint = kept[-1] if kept else None  # type: ignore[attr-defined]
        raise
    finally:
        for plugin in run.strategy.plugins:
            if isinstance(plugin, ProgressPlugin):
                plugin.close()
        _stop_train_log(run)
        if run.logger is not None:
            run.logger.finish(exit_code=exit_code)
    return results


def _restore(run: Run, state: dict[str, Any], ckpt_dir: Path) -> None:
    cfg = run.config
    n = len(run.stream.tasks)
    done = state["experience"]
    if not 1 <= done <= n:
        raise UserError(f"checkpoint in {ckpt_dir} is after experience {done}, the stream has experiences 1..{n}")
    rows = state["results"].get("rows") if isinstance(state.get("results"), dict) else None
    if not isinstance(rows, list) or len(rows) != done + 1 or state["results"].get("task_names") != run.task_names:
        raise UserError(f"checkpoint in {ckpt_dir} holds results that do not match experience {done} of tasks {run.task_names}")
    if state.get("model_name") != cfg.model.name:
        raise UserError(f"checkpoint in {ckpt_dir} is for model {state.get('model_name')!r}, the config names {cfg.model.name!r}")
    model = unwrap(run.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint in {ckpt_dir} does not fit the model: {str(exc).splitlines()[0]}") from None
    model.text_changed()
    done = int(state["experience"])
    model.known_train_tasks_labels = set(range(done))
    _load_plugin_states(run, state["plugins"], ckpt_dir)
    ckpt.set_rng_state(state["rng"])
    run.strategy.clock.train_exp_counter = done


def _train_stream(run: Run, results: Any, start: int, quiet: bool) -> Any:
    from cl_proxyfda.plots import render_all
    from cl_proxyfda.results import RunResults

    cfg, out, logger = run.config, run.out_dir, run.logger
    main = run.dist.is_main
    n = len(run.stream.tasks)
    quiet = quiet or not main
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    if results is None:
        results = RunResults(task_names=run.task_names)
        results.meta.update({"name": cfg.run.name, "strategies": [s.name for s in cfg.strategies], "seed": cfg.run.seed, "trainable_params": _trainable_count(run.model), "device": str(run.device)})
        if cfg.eval.task_agnostic:
            results.meta[TASK_AGNOSTIC] = task_agnostic_meta(run)
        row, control = evaluate_row(run)
        probe = probe_row(run)
        results.meta.update(probe.meta)
        results.add_row(row, control=control, diagnostics={**_diagnostics(run), **probe.diagnostics}, extra=probe.with_extra(extra_rows(run)), control_probe=probe.control)
        if main:
            results.save(out)
        if logger is not None:
            logger.log_row(results, 0, global_step=_global_step(run))
    else:
        say(f"resuming {out} after experience {start}/{n}")
        if main:  # the checkpoint's rows replace whatever results files the folder has
            results.save(out)
    for i in range(start, n):
        t_exp = time.time()
        torch.manual_seed(cfg.run.seed * 1_000_003 + i)
        _before_experience(run, i)
        run.strategy.train(run.benchmark.train_stream[i])
        train_seconds = time.time() - t_exp
        row, control = evaluate_row(run)
        probe = probe_row(run)
        diag = {**_diagnostics(run), **probe.diagnostics}
        diag.update({"train_seconds": train_seconds, "seconds": time.time() - t_exp, "peak_memory_mb": peak_memory_mb(run.device)})
        results.add_row(row, control=control, diagnostics=diag, extra=probe.with_extra(extra_rows(run)), control_probe=probe.control)
        results.meta["wall_seconds"] = results.meta.get("wall_seconds", 0.0) + (time.time() - t_exp)
        results.meta["peak_memory_mb"] = peak_memory_mb(run.device)
        results.meta["ledger"] = build_ledger(
            run.model, run.plugins, run.strategy.teachers, run.device, results.meta["wall_seconds"], run.dist.world
        )
        if main:
            results.save(out)
        if main and cfg.checkpoint.enabled:
            ckpt.save_checkpoint(
                out / "checkpoints",
                i + 1,
                {"model": unwrap(run.model).state_dict(), "model_name": cfg.model.name, "plugins": _plugin_states(run.plugins), "results": results.to_dict(), "config": cfg.to_dict()},
                keep_last=cfg.checkpoint.keep_last,
            )
        barrier()  # the checkpoint of this experience exists for every process
        if logger is not None:
            logger.log_row(results, i + 1, global_step=_global_step(run))
        say(f"[{i + 1}/{n}] {run.task_names[i]}: acc {row[i]:.1f} | seen mean {np.mean(row[: i + 1]):.1f}" + (f" | control {control:.1f}" if control is not None else "") + (f" | probe {probe.control:.1f}" if probe.control is not None else ""))
    images = render_all(results, out) if cfg.logging.plots and main else []
    if logger is not None:
        logger.log_final(results, images=images)
    if not quiet:
        print(results.format_table())
        print(f"results: {out}")
    return results


def _before_experience(run: Run, index: int) -> None:
    """Per-experience preparation shared by all plugins (hard-mining similarities)."""
    cfg = run.config
    if cfg.sampler_layout()[0] == "class_balanced" and cfg.train.hard_class_mining:
        from cl_proxyfda.benchmarks.samplers import class_mean_similarity

        task = run.stream.tasks[index]
        feats, labels = _pretrained_train_features(run, index)
        run.strategy.class_similarity.set(index, class_mean_similarity(feats, labels))


def _pretrained_train_features(run: Run, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = run.strategy.teachers.get(run.model, "pretrained")
    ds = run.benchmark.train_stream[index].dataset.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=run.config.eval.batch_size, shuffle=False, num_workers=run.config.train.workers)
    feats, labels = [], []
    with torch.no_grad():
        for batch in loader:
            feats.append(teacher.encode_image(batch[0].to(run.device)).float().cpu())
            labels.append(batch[1])
    return torch.cat(feats), torch.cat(labels)


def _diagnostics(run: Run) -> dict[str, float]:
    """Plugins' own diagnostics, and feature-distribution distances on the control set."""
    diag: dict[str, float] = {}
    for plugin in run.plugins:
        diag.update({k: float(v) for k, v in getattr(plugin, "diagnostics", {}).items()})
    if run.stream.control is None:
        return diag
    from cl_proxyfda.diagnostics import control_distances

    n = len(run.stream.tasks)
    teacher = run.strategy.teachers.get(run.model, "pretrained")
    f_pre, y = run.evaluator.features(teacher, n, device=run.device)
    f_cur, _ = run.evaluator.features(run.model, n, device=run.device)
    diag.update({f"control_{k}": v for k, v in control_distances(f_pre, f_cur, y).items()})
    return diag


def _make_logger(run: Run) -> Any:
    wb = run.config.logging.wandb
    if wb.mode == "disabled":
        return None
    from cl_proxyfda.wandb_logger import WandbLogger

    return WandbLogger(run.out_dir, project=wb.project, entity=wb.entity, group=wb.group, name=run.config.run.name, mode=wb.mode, config=run.config.to_dict())


def _start_train_log(run: Run, done: int) -> None:
    """Record training curves (rank 0): ``train_log.csv`` holds the rows of the ``done``
    experiences a resumed checkpoint covers, and the step count goes on from there."""
    from cl_proxyfda.train_log import TRAIN_LOG, TrainLog, steps_before

    first = steps_before(run.strategy, run.benchmark.train_stream, done)
    run.train_log = TrainLog(run.out_dir / TRAIN_LOG, every=run.config.logging.train_every, logger=run.logger, global_step=first).open(done)
    run.strategy.plugins.append(run.train_log)


def _stop_train_log(run: Run) -> None:
    """Write the steps still pending (also when training stopped early) and detach."""
    if run.train_log is not None:
        run.strategy.plugins.remove(run.train_log)
        run.train_log, train_log = None, run.train_log
        train_log.close()


def _global_step(run: Run) -> int | None:
    return run.train_log.global_step if run.train_log is not None else None


def run_config(cfg: RunConfig, out_dir: Path | None = None, resume: bool = False, quiet: bool = False) -> Any:
    """Build and execute a run (the Python entry point behind ``cl-proxyfda run``)."""
    # the folder checks first: a wrong folder or a changed config fails before the build
    _check_out_dir(Path(out_dir) if out_dir is not None else Path(cfg.run.output_dir) / cfg.run.name, resume, cfg)
    run = build_run(cfg, out_dir)
    return execute(run, resume=resume, quiet=quiet)
