"""Comparisons: several strategies / hyper-parameter values x seeds on one stream.

``cl-proxyfda compare CONFIG.yaml`` (or :func:`run_comparison` in Python) expands a
comparison file into one full :class:`~cl_proxyfda.config.RunConfig` per variant and
seed, validates them all before anything runs, runs them one after another with
:func:`cl_proxyfda.runner.run_config`, and writes a table, a frontier plot and curves.

The comparison file (YAML, read with a safe loader that refuses duplicate keys and
aliases that refer to themselves or expand past 100,000 values; unknown keys are errors)::

    name: l2sp_vs_naive           # default: the file's stem; OUT = output_dir/name
    description: naive vs L2-SP on the tiny stream   # optional, shown in comparison.md
    output_dir: runs              # default "runs"
    base_config: quickstart.yaml  # optional run file, relative to this file (paths
                                  # inside run configs stay relative to the cwd)
    base:                         # a run config (all sections of a run file); merged
      model: {name: cl-test-tiny} # over base_config when both are given
      stream: {name: image_folder, root: data/tiny, control: ctrl}
      train: {lr: 1.0e-3, iterations: 20, batch_size: 8}
      logging: {wandb: {mode: offline}}
    seeds: [0, 1, 2]              # run.seed of every run (default [0])
    variants:
      - name: naive
        strategies: [{name: naive}]          # default: the base's strategies
      - name: l2sp
        strategies: [{name: l2sp, weight: 1.0}]
        train: {lr: 5.0e-4}                  # partial mappings, merged into the base
        model: {train_towers: [image]}
        set: ["eval.batch_size=128"]         # key.path=value overrides, as with --set
        grid: {"strategies.0.weight": [0.1, 1, 10]}

Order of application for each variant: base (base_config, then ``base``) -> the
variant's ``strategies``, ``train`` and ``model`` -> its ``set`` overrides -> one grid
point -> ``run.seed`` and ``run.name``. A ``grid`` maps key paths (as in ``set``) to
lists of values; it expands to the Cartesian product of its lists, one variant per
point, named like ``l2sp[weight=0.1]`` (the last key component labels a value; the
full path when two keys end alike). ``--set`` / ``overrides`` apply to the comparison
file itself (``seeds=[0]``, ``base.train.iterations=5``, ``variants.1.train.lr=1e-4``).

The base must be a valid run config by itself (errors name ``base.<key>``); errors
that a variant introduces name ``variants[i].<key>``. Every run config is validated up
front: an invalid file writes nothing.

Output folder OUT (default ``output_dir/name``)::

    OUT/variants/<variant>/seed<seed>/   one ordinary run folder per variant x seed
    OUT/comparison.md, comparison.csv    one row per variant: mean ± std over seeds of
                                         Transfer, Avg, Last, both forgettings, BWT,
                                         plasticity, control retention (row T) and its
                                         drop, stability, trainable parameters, wall
                                         time (s, experiences 1..T) and peak memory (MB);
                                         Pareto-front variants are marked "*" in the .md
    OUT/frontier.png                     stability (y) vs plasticity (x), Pareto front
    OUT/curves.png                       control retention, mean seen-task accuracy

``std`` is the sample standard deviation (ddof = 1) over the seeds of a variant;
empty/"-" with a single seed. Stability is control retention at row T, or 100 - mean
(Avalanche) forgetting when the stream has no control set. On CPU, peak memory is the
process's high-water mark (``ru_maxrss``), so later runs of one process inherit the
peaks of earlier ones; on CUDA the peak counter is reset before every run.

Rerunning the same comparison skips the runs whose ``metrics.json`` is complete (their
saved results are loaded) and resumes unfinished runs from their last checkpoint
(``resume=True``). A run folder written with a different resolved config (anything but
:data:`cl_proxyfda.runfolder.RESULT_NEUTRAL_KEYS`: run name, output folder, device and
threads, workers, eval batch size, logging, checkpointing) is an error rather than
silently reused. OUT is locked (``OUT/.lock``) while the comparison runs, and each run
folder while its run does: a second comparison into OUT stops with an error.
A run that diverges is reported and left out of the table; the others still run (the
CLI then exits with code 3, as ``cl-proxyfda run`` does). Bad input exits with code 2.

With W&B on (``logging.wandb.mode`` not ``disabled``) every run logs its own W&B run in
group ``name`` (unless the base sets ``logging.wandb.group``), and one more run,
``<name>-summary``, logs the comparison table (``wandb.Table``), ``frontier.png`` and
``curves.png``.

The package: :mod:`~cl_proxyfda.compare.plan` (file schema, variants, grids, planning),
:mod:`~cl_proxyfda.compare.run` (running the plan, locks, skipping and resuming runs) and
:mod:`~cl_proxyfda.compare.report` (aggregation, tables, plots, the W&B summary).
"""
from __future__ import annotations

from cl_proxyfda.compare import plan, report, run
from cl_proxyfda.compare.plan import *  # noqa: F403 (the package re-exports its modules' __all__)
from cl_proxyfda.compare.report import *  # noqa: F403
from cl_proxyfda.compare.run import *  # noqa: F403

__all__ = [*plan.__all__, *run.__all__, *report.__all__]
