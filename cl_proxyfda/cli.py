"""The ``cl-proxyfda`` command line (also ``python -m cl_proxyfda``).

Bad input (config, paths, arguments) prints ``error: <one line>`` and exits 2 without
writing anything; a diverged run exits 3 with the last good checkpoint intact.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from cl_proxyfda.errors import TrainingDiverged, UserError


def one_line(text: str) -> str:
    """``text`` as one printable line, whatever it quotes (newlines, lone surrogates from odd file names)."""
    return text.replace("\r", "\\r").replace("\n", "\\n").encode("utf-8", "backslashreplace").decode("utf-8")


def _quiet_environment() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*qpsolvers.*")
    warnings.filterwarnings("ignore", message="No loggers specified")  # Avalanche: the runner logs itself
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    configure_logging()


class _StderrLines(logging.Handler):
    """``warning: <message>`` on one line of the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"{record.levelname.lower()}: {one_line(record.getMessage())}", file=sys.stderr)
        except Exception:  # a log line never stops a run
            self.handleError(record)


def configure_logging() -> None:
    """Third-party libraries' log lines stay out (the root logger at ERROR); WARNING and
    above from this package and from W&B (whose ``wandb`` logger does not propagate to
    the root) print as ``warning: <message>`` on stderr. Idempotent."""
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("cl_proxyfda").setLevel(logging.WARNING)
    for logger in (logging.getLogger(), logging.getLogger("wandb")):
        if not any(isinstance(h, _StderrLines) for h in logger.handlers):
            logger.addHandler(_StderrLines(logging.WARNING))


def cmd_run(args: argparse.Namespace) -> int:
    from cl_proxyfda.config import load_config
    from cl_proxyfda.runner import run_config

    cfg = load_config(args.config, args.set)
    run_config(cfg, Path(args.out) if args.out else None, resume=args.resume)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Every check ``run`` makes before training; every problem on its own line."""
    from cl_proxyfda.validate import validate_file

    found = validate_file(args.config, args.set)
    for problem in found.problems:
        print(f"error: {one_line(problem)}", file=sys.stderr)
    if found.problems:
        return 2
    print(f"ok: {args.config}: {found.summary}")
    for note in found.notes:
        print(f"  {note}")
    return 0


def cmd_prefetch(args: argparse.Namespace) -> int:
    """Download what a run file needs into the standard caches, then say it can go offline."""
    from cl_proxyfda.config import load_config
    from cl_proxyfda.hub import hub_offline
    from cl_proxyfda.prefetch import prefetch

    cfg = load_config(args.config, args.set)
    outcomes = prefetch(cfg, progress=cfg.logging.progress)
    for o in outcomes:
        print(f"{'ok  ' if o.ok else 'FAIL'} {o.need.label}: {one_line(o.message)}", file=sys.stdout if o.ok else sys.stderr)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        print(f"error: {len(failed)} of {len(outcomes)} items could not be fetched (listed above)", file=sys.stderr)
        return 2
    prefix = "" if hub_offline() else "HF_HUB_OFFLINE=1 "
    print(f"ok: everything {args.config} needs is on this machine; it can run offline: {prefix}cl-proxyfda run {args.config}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cl_proxyfda.results import RunResults, report

    comparison = None
    if args.published is not None:  # resolved first: a bad key or no match writes nothing
        from cl_proxyfda.published import resolve_published

        comparison = resolve_published(Path(args.run_dir), None if args.published == "auto" else args.published)
    table, written = report(Path(args.run_dir))
    print(table)
    if comparison is not None:
        from cl_proxyfda.published import format_comparison

        print()
        print(format_comparison(RunResults.load(Path(args.run_dir)), *comparison))
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from cl_proxyfda.compare import plan_comparison, run_comparison

    if args.dry_run:
        plan = plan_comparison(args.config, args.out, args.set, args.only)
        for variant in plan.variants:
            print(f"{variant.name}: seeds {[r.seed for r in variant.runs]} -> {plan.out_dir / 'variants' / variant.folder}")
        print(f"ok: {len(plan.runs)} runs")
        return 0
    result = run_comparison(args.config, args.out, args.set, only=args.only, report_only=args.report_only)
    print(result.markdown)
    print(f"comparison: {result.out_dir}")
    return 3 if any(o.status == "diverged" for o in result.outcomes) else 0


def cmd_list(args: argparse.Namespace) -> int:
    from cl_proxyfda.models import list_model_names
    from cl_proxyfda.registry import GENERATORS, STRATEGIES, STREAMS, load_builtin_components

    load_builtin_components()
    for title, reg in (("strategies", STRATEGIES), ("streams", STREAMS), ("generators", GENERATORS)):
        print(f"{title}:")
        width = max((len(n) for n in reg.names()), default=0)
        for name in reg.names():
            print(f"  {name:{width}s}  {reg.get(name).help}")
    models = list_model_names()
    ours = [m for m in models if m.startswith(("cl-", "demo-"))]
    print("models (package configs): " + ", ".join(ours))
    if args.all_models:
        print("models (open_clip): " + ", ".join(m for m in models if m not in ours))
    else:
        print(f"models (open_clip): {len(models) - len(ours)} more (--all-models lists them)")
    return 0


def cmd_pretrain_demo(args: argparse.Namespace) -> int:
    from cl_proxyfda.demo_pretrain import pretrain_demo

    kwargs = {"seed": args.seed}
    if args.steps:
        kwargs["steps"] = args.steps
    meta = pretrain_demo(Path(args.out), **kwargs)
    print(meta)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Pre-generate the GIFT synthetic sets of a run file into the cache the run reads."""
    from cl_proxyfda.config import load_config
    from cl_proxyfda.registry import STREAMS
    from cl_proxyfda.device import resolve_device
    from cl_proxyfda.synthetic import ensure_plan, plan_experience, stream_key

    cfg = load_config(args.config, args.set)
    entries = [entry.params for entry in cfg.strategies if entry.name == "gift"]
    if not entries:
        raise UserError(f"{args.config}: no gift strategy in the run file, nothing to generate")
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "0"))
    world = args.world if args.world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"--rank {rank} / --world {world}: need 0 <= rank < world")
    stream = STREAMS.build(cfg.stream.name, cfg.stream.args, run_seed=cfg.run.seed)
    names = [t.name for t in stream.tasks]
    if args.experience is None:
        chosen = list(range(len(names)))
    elif args.experience in names:
        chosen = [names.index(args.experience)]
    elif args.experience.isdigit() and 1 <= int(args.experience) <= len(names):
        chosen = [int(args.experience) - 1]
    else:
        raise UserError(f"--experience: {args.experience!r} is neither 1..{len(names)} nor a task name ({', '.join(names)})")
    device = resolve_device(cfg.run.device)
    key = stream_key(cfg.stream.name, cfg.stream.args)
    totals = {"generated": 0, "reused": 0, "dropped": 0}
    for params in entries:
        spec = params.spec(cfg.run.output_dir)
        generator = spec.build_generator(device)
        for i in chosen:
            plan = plan_experience(spec, stream, key, i, generator)
            stats = ensure_plan(plan, generator, (rank, world), progress=cfg.logging.progress)
            for k in totals:
                totals[k] += stats.get(k, 0)
            share = len(range(rank, plan.size, world))
            print(
                f"experience {i + 1}/{len(names)} {plan.task}: {share} of {plan.size} planned (rank {rank}/{world}), "
                f"generated {stats['generated']}, reused {stats['reused']}, dropped {stats['dropped']}, pool {plan.pool_size} -> {plan.folder}"
            )
    print(f"ok: generated {totals['generated']}, reused {totals['reused']}, dropped {totals['dropped']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Micro-benchmarks as ratios (cl_proxyfda/tools/bench/); markdown on stdout."""
    from cl_proxyfda.tools.bench import run_bench

    argv = ["cl-proxyfda bench"] + (["--quick"] if args.quick else []) + ([f"--sections {args.sections}"] if args.sections else [])
    argv += ([f"--model {args.model}"] if args.model else []) + ([f"--pretrained {args.pretrained}"] if args.pretrained else [])
    argv += ([f"--repeats {args.repeats}"] if args.repeats else []) + ([f"--out {args.out}"] if args.out else [])
    report = run_bench(out=args.out, quick=args.quick, sections=args.sections, model=args.model, pretrained=args.pretrained, repeats=args.repeats, command=" ".join(argv))
    print(report["markdown"])
    if args.out:
        print(f"wrote {Path(args.out) / 'bench.json'} and {Path(args.out) / 'bench.md'}")
    return 0


def cmd_gpu_check(args: argparse.Namespace) -> int:
    """CLIP step times, a 2-task MTIL rehearsal and UNet images/s on one device (cl_proxyfda/gpu_check.py)."""
    from cl_proxyfda.gpu_check import run_gpu_check

    argv = ["cl-proxyfda gpu-check", f"--out {args.out}"] + (["--tiny"] if args.tiny else []) + ([f"--device {args.device}"] if args.device else [])
    report = run_gpu_check(out=args.out, tiny=args.tiny, device=args.device, command=" ".join(argv))
    print(report["markdown"])
    print(f"wrote {Path(args.out) / 'gpu_check.md'} and {Path(args.out) / 'gpu_check.json'}")
    if not report["complete"]:
        print(f"error: gpu-check: phases failed: {', '.join(report['failed'])} (see {Path(args.out) / 'gpu_check.md'})", file=sys.stderr)
        return 1
    return 0


def cmd_base_to_new(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from cl_proxyfda.base_to_new import run_base_to_new
    from cl_proxyfda.registry import STREAMS, load_builtin_components
    from cl_proxyfda.io import write_atomic

    load_builtin_components()
    stream = STREAMS.build(args.stream, {}, run_seed=0)
    runs = []
    for seed in args.seeds:
        runs.append(
            run_base_to_new(
                stream, model_name=args.model, pretrained=args.pretrained, shots=args.shots, seed=seed, epochs=args.epochs,
                lr=args.lr, prompt={"n_ctx": args.n_ctx, "init": "random"}, fda={"weight": args.fda_weight, "seed": seed},
            )
        )
    lines = [f"base-to-new on {args.stream}: {args.model} ({args.pretrained}), {args.shots} shots, {args.epochs} epochs, lr {args.lr}, n_ctx {args.n_ctx}, seeds {args.seeds}", "", "| variant | base | new | H | new - hand-written |", "|---|---|---|---|---|"]
    for variant in ("zero_shot", "coop", "coop_prompt_fda"):
        cells = []
        for key in ("base", "new", "h", "delta_new"):
            vals = [r["mean"][variant][key] for r in runs if r["mean"][variant].get(key) is not None]
            cells.append("-" if not vals else f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0.0:.1f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "base_to_new.md", table + "\n")
        write_atomic(out / "base_to_new.json", json.dumps(runs, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cl-proxyfda", description="Continual fine-tuning of CLIP-like models without forgetting.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train and evaluate a run file")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value (repeatable)")
    p.add_argument("--out", help="run folder (default: run.output_dir/run.name)")
    p.add_argument("--resume", action="store_true", help="continue after the last completed experience")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a run file and its data without training")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("prefetch", help="download the weights, pipelines and datasets a run file needs (then run offline)")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.set_defaults(func=cmd_prefetch)

    p = sub.add_parser("report", help="re-render the table and plots of a run folder")
    p.add_argument("run_dir")
    p.add_argument(
        "--published", nargs="?", const="auto", default=None, metavar="KEY",
        help="also print Transfer/Avg/Last next to the published ones (cl_proxyfda/published.py): the entry matching "
        "the run's config.yaml (strategies, MTIL order, shots), or KEY, e.g. mtil-I/zscl",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="run every variant x seed of a comparison file and tabulate them")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a value of the comparison file (repeatable)")
    p.add_argument("--out", help="comparison folder (default: output_dir/name)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the runs without training")
    p.add_argument("--report-only", action="store_true", help="train nothing: tabulate the runs already finished")
    p.add_argument("--only", type=lambda text: [v for v in text.split(",") if v], default=None, metavar="NAME,NAME", help="run only these variants (the table covers them only)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("base-to-new", help="CoOp and CoOp + Proxy-FDA: train on base classes, score base/new/H")
    p.add_argument("--stream", default="demo", help="a registered stream that needs no arguments (default: demo)")
    p.add_argument("--model", default="demo-clip-tiny")
    p.add_argument("--pretrained", default="demo")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n-ctx", type=int, default=4)
    p.add_argument("--fda-weight", type=float, default=1.0)
    p.add_argument("--seeds", type=lambda text: [int(v) for v in text.split(",")], default=[0, 1, 2])
    p.add_argument("--out", help="folder for base_to_new.md and .json")
    p.set_defaults(func=cmd_base_to_new)

    p = sub.add_parser("list", help="registered strategies, streams, generators and models")
    p.add_argument("--all-models", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("pretrain-demo", help="reproduce the shipped tiny CLIP of the demo world")
    p.add_argument("--out", default="demo_clip.safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="0 = the default schedule")
    p.set_defaults(func=cmd_pretrain_demo)
    p = sub.add_parser("generate", help="pre-generate the GIFT synthetic images of a run file into its cache")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value (repeatable)")
    p.add_argument("--rank", type=int, default=None, help="this process's share: items i with i %% world == rank (default: $RANK or 0)")
    p.add_argument("--world", type=int, default=None, help="number of sharing processes (default: $WORLD_SIZE or 1)")
    p.add_argument("--experience", default=None, help="only this experience: 1-based index or task name (default: all)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="micro-benchmarks reported as ratios measured in one process")
    p.add_argument("--out", help="folder for bench.json and bench.md (written atomically)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's)")
    p.add_argument("--sections", help="comma-separated: steps,eval,knn,awc,generation,gpu (default: all)")
    p.add_argument("--model", help="open_clip model name (default: demo-clip-tiny with its shipped weights, else cl-test-tiny)")
    p.add_argument("--pretrained", help="weights tag or file for --model (default: random weights for a named model)")
    p.add_argument("--repeats", type=int, help="interleaved repeats of each measurement (default 4, --quick 1)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("gpu-check", help="one command for a GPU: CLIP step times, a 2-task MTIL run, UNet images/s")
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.md and gpu_check.json (default: gpu_check)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (cl-test-tiny, batch 8, tiny UNet): the CPU mode")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available, else cpu with --tiny implied")
    p.set_defaults(func=cmd_gpu_check)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except TrainingDiverged as exc:
        kept = getattr(exc, "checkpoint", None)
        tail = f"the last good checkpoint is kept: {kept}" if kept else "no checkpoint was written before it"
        print(f"error: training diverged: {exc}; {tail}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("\ninterrupted; completed experiences are saved (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
