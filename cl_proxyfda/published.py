"""Published Transfer / Avg / Last on MTIL, and the run files that reproduce them.

Every number here has a source a reader can open; none is estimated. Sources:

- ZSCL (Zheng et al., ICCV 2023, arXiv 2303.06628): the MTIL comparison tables. The
  official repository (github Thunderbeee/ZSCL) lists the paper's results in
  ``mtil/results.ipynb``, computed there from the full accuracy matrices it ships
  (``mtil/results/t3_*.npy`` for the section "Table 3", order I; ``t9_*.npy`` for
  "Table 10", order II). ``tests/test_published.py`` recomputes every ZSCL value below
  from those matrices with :mod:`cl_proxyfda.metrics`.
- GIFT (Wu et al., CVPR 2025, arXiv 2503.04229): its MTIL order I row, as quoted in the
  docs/protocol.md ("For reference, the GIFT paper reports ..."); the table number was not verified.

Not found (no entry, see ``NOT_FOUND``): GIFT on MTIL order II, few-shot MTIL for any
method, and Proxy-FDA on MTIL (its paper reports linear-probe figures on another
protocol). ``cl-proxyfda report RUN_DIR --published [KEY]`` prints a run next to its
entry (:func:`resolve_published`, :func:`format_comparison`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from cl_proxyfda import metrics
from cl_proxyfda.errors import UserError

__all__ = [
    "PublishedResult",
    "PUBLISHED",
    "NOT_FOUND",
    "published",
    "zero_shot_entry",
    "match_config",
    "resolve_published",
    "format_comparison",
]


@dataclass(frozen=True)
class PublishedResult:
    """One published row: a method on a benchmark, its three metrics and their source."""

    key: str  # e.g. "mtil-I/zscl"
    method: str  # the row's name in the source table
    benchmark: str  # "MTIL order I", "MTIL order II"
    order: str  # "I" or "II"
    shots: int | None  # None: full-shot
    transfer: float
    avg: float
    last: float
    source: str  # paper, table, row
    strategies: tuple[str, ...]  # strategy names of a matching run; () for zero-shot (row 0 of any run)
    run_file: str | None = None  # configs/reproduce/...; None: not reproducible with this library
    matrix: str | None = None  # the published full matrix (ZSCL repository path), when there is one
    note: str = ""


_ZSCL = "ZSCL (Zheng et al., ICCV 2023, arXiv 2303.06628)"
_ZSCL_I = f"{_ZSCL}, MTIL order I table ('Table 3' in the official mtil/results.ipynb)"
_ZSCL_II = f"{_ZSCL}, MTIL order II table ('Table 10' in the official mtil/results.ipynb)"
_GIFT_I = (
    "GIFT (Wu et al., CVPR 2025, arXiv 2503.04229), MTIL order I comparison table, row GIFT "
    "(value as quoted in docs/protocol.md; table number not verified)"
)
_NO_STRATEGY = "the library has no such strategy"


def _row(order: str, key: str, method: str, t: float, a: float, l: float, source: str, strategies: tuple[str, ...],
         run_file: str | None, matrix: str | None = None, note: str = "") -> PublishedResult:
    return PublishedResult(f"mtil-{order}/{key}", method, f"MTIL order {order}", order, None, t, a, l,
                           f"{source}, row {method}", strategies, run_file, matrix, note)


PUBLISHED: tuple[PublishedResult, ...] = (
    # MTIL order I, CLIP ViT-B/16, full-shot (1000 iterations x 64 per task)
    _row("I", "zero-shot", "Zero-shot", 69.4, 65.3, 65.3, _ZSCL_I, (), None, note="row 0 of any order-I run"),
    _row("I", "naive", "Continual-FT", 44.6, 55.9, 77.3, _ZSCL_I, ("naive",), "configs/reproduce/mtil_I_naive.yaml", "mtil/results/t3_1.npy"),
    _row("I", "lwf", "LwF", 56.9, 64.7, 74.6, _ZSCL_I, ("lwf",), "configs/reproduce/mtil_I_lwf.yaml", "mtil/results/t3_2.npy",
         "the library's LwF is Avalanche's plugin; ZSCL's LwF distils image and text logits"),
    _row("I", "icarl", "iCaRL", 50.4, 65.7, 80.1, _ZSCL_I, (), None, "mtil/results/t3_3.npy", _NO_STRATEGY),
    _row("I", "lwf-vr", "LwF-VR", 57.2, 65.1, 76.6, _ZSCL_I, (), None, "mtil/results/t3_4.npy", _NO_STRATEGY),
    _row("I", "wiseft", "WiSE-FT", 52.3, 60.7, 77.7, _ZSCL_I, ("wiseft",), "configs/reproduce/mtil_I_wiseft.yaml", "mtil/results/t3_5.npy",
         "ZSCL's WiSE-FT anchors at the start-of-task model; the library's wiseft at the pre-trained one"),
    _row("I", "zscl-star", "ZSCL*", 62.2, 72.6, 84.5, _ZSCL_I, (), None, "mtil/results/t3_6.npy", "the ZSCL* variant has no run file here"),
    _row("I", "zscl", "ZSCL", 68.1, 75.4, 83.6, _ZSCL_I, ("zscl",), "configs/reproduce/mtil_I_zscl.yaml", "mtil/results/t3_7.npy"),
    _row("I", "gift", "GIFT", 69.3, 77.3, 86.0, _GIFT_I, ("gift", "awc"), "configs/reproduce/mtil_I_gift.yaml"),
    # MTIL order II
    _row("II", "zero-shot", "Zero-shot", 65.4, 65.3, 65.3, _ZSCL_II, (), None, note="row 0 of any order-II run"),
    _row("II", "naive", "Continual-FT", 46.6, 56.2, 67.4, _ZSCL_II, ("naive",), "configs/reproduce/mtil_II_naive.yaml", "mtil/results/t9_1.npy"),
    _row("II", "lwf", "LwF", 53.2, 62.2, 71.9, _ZSCL_II, ("lwf",), "configs/reproduce/mtil_II_lwf.yaml", "mtil/results/t9_2.npy",
         "the library's LwF is Avalanche's plugin; ZSCL's LwF distils image and text logits"),
    _row("II", "icarl", "iCaRL", 50.9, 56.9, 71.6, _ZSCL_II, (), None, "mtil/results/t9_3.npy", _NO_STRATEGY),
    _row("II", "lwf-vr", "LwF-VR", 53.1, 60.6, 68.3, _ZSCL_II, (), None, "mtil/results/t9_4.npy", _NO_STRATEGY),
    _row("II", "wiseft", "WiSE-FT", 51.0, 61.5, 72.2, _ZSCL_II, ("wiseft",), "configs/reproduce/mtil_II_wiseft.yaml", "mtil/results/t9_5.npy",
         "ZSCL's WiSE-FT anchors at the start-of-task model; the library's wiseft at the pre-trained one"),
    _row("II", "zscl-star", "ZSCL*", 59.8, 71.8, 83.3, _ZSCL_II, (), None, "mtil/results/t9_6.npy", "the ZSCL* variant has no run file here"),
    _row("II", "zscl", "ZSCL", 64.2, 74.5, 83.4, _ZSCL_II, ("zscl",), "configs/reproduce/mtil_II_zscl.yaml", "mtil/results/t9_7.npy"),
)

NOT_FOUND: tuple[str, ...] = (
    "GIFT + AWC on MTIL order II (run file configs/reproduce/mtil_II_gift.yaml; no citable value found)",
    "few-shot MTIL (5-shot) for any method (no citable table found)",
    "Proxy-FDA on MTIL (its paper reports ViT-B/32 linear-probe A_LP / dLP on its own 10-dataset protocol, not Transfer / Avg / Last)",
)

_BY_KEY = {p.key: p for p in PUBLISHED}


def published(key: str) -> PublishedResult:
    """The entry named ``key``; :class:`UserError` listing the keys otherwise."""
    try:
        return _BY_KEY[key]
    except KeyError:
        raise UserError(f"--published: unknown key {key!r} (known: {', '.join(_BY_KEY)})") from None


def zero_shot_entry(order: str, shots: int | None = None) -> PublishedResult | None:
    """The published zero-shot row of an order (compared with row 0 of a run)."""
    return next((p for p in PUBLISHED if p.order == order and p.shots == shots and p.key.endswith("/zero-shot")), None)


def _run_signature(config: Mapping[str, Any]) -> tuple[str | None, str | None, int | None, tuple[str, ...]]:
    stream = config.get("stream") or {}
    strategies = tuple(str(s.get("name")) for s in (config.get("strategies") or []) if isinstance(s, Mapping))
    order = stream.get("order")
    return stream.get("name"), None if order is None else str(order), stream.get("shots"), strategies


def match_config(config: Mapping[str, Any]) -> PublishedResult | None:
    """The entry whose strategies, MTIL order and shots equal those of a resolved run config."""
    name, order, shots, strategies = _run_signature(config)
    if name != "mtil" or not strategies:
        return None
    return next((p for p in PUBLISHED if p.strategies == strategies and p.order == order and p.shots == shots), None)


def resolve_published(run_dir: str | Path, key: str | None = None) -> tuple[PublishedResult, list[str]]:
    """The entry to compare a run folder with: ``key`` if given, else the one matching its
    saved ``config.yaml``. Returns it with notes on what differs between run and entry."""
    from cl_proxyfda.runfolder import saved_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory")
    config = saved_config(run_dir)
    if key is not None:
        entry = published(key)
    else:
        if config is None:
            raise UserError(f"{run_dir}: no config.yaml to match a published result; name one with --published KEY")
        entry = match_config(config)
        if entry is None:
            name, order, shots, strategies = _run_signature(config)
            raise UserError(
                f"{run_dir}: no published result for strategies {list(strategies)} on {name} order {order}"
                f"{'' if shots is None else f', {shots} shots'}; name one with --published KEY (known: {', '.join(_BY_KEY)})"
            )
    notes = []
    if config is not None and entry.strategies:
        name, order, shots, strategies = _run_signature(config)
        if (name, order, shots, strategies) != ("mtil", entry.order, entry.shots, entry.strategies):
            notes.append(
                f"note: this run ({list(strategies)}, {name} order {order}, shots {shots}) is not the published setting "
                f"({list(entry.strategies)}, mtil order {entry.order}, shots {entry.shots})"
            )
    return entry, notes


def _fmt(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{round(value, 1) + 0.0:+.1f}" if sign else f"{value:.1f}"  # + 0.0: no "-0.0"


def _block(title: str, ours: Mapping[str, Any], entry: PublishedResult) -> list[str]:
    lines = [title, f"  {'':8}  {'run':>6}  {'published':>9}  {'diff':>6}"]
    for label, attr in (("Transfer", "transfer"), ("Avg", "avg"), ("Last", "last")):
        mine, theirs = ours.get(attr), getattr(entry, attr)
        diff = None if mine is None else mine - theirs
        lines.append(f"  {label:8}  {_fmt(mine):>6}  {_fmt(theirs):>9}  {_fmt(diff, sign=True):>6}")
    return lines


def format_comparison(results: Any, entry: PublishedResult, notes: Sequence[str] = ()) -> str:
    """The run's Transfer / Avg / Last next to ``entry``'s (differences: run - published),
    and, when the order has a published zero-shot row, the run's row 0 next to it."""
    from cl_proxyfda.benchmarks.mtil import MTIL_ORDERS

    lines = [f"Published: {entry.key}  {entry.method} on {entry.benchmark}", f"  source: {entry.source}"]
    if entry.run_file:
        lines.append(f"  run file: {entry.run_file}")
    if entry.note:
        lines.append(f"  note: {entry.note}")
    lines.extend(notes)
    if results.task_names != list(MTIL_ORDERS[entry.order]):
        lines.append(f"note: the run's tasks {results.task_names} are not MTIL order {entry.order}'s 11 tasks: not comparable")
    if not results.rows:
        lines.append("no evaluation rows yet")
        return "\n".join(lines)
    if not results.complete:
        lines.append(f"note: incomplete run ({results.experiences_done}/{results.num_tasks} experiences); Last uses the last row")
    lines.append("")
    if entry.strategies:
        lines.extend(_block("After training (run - published):", results.summary(), entry))
    zero = zero_shot_entry(entry.order, entry.shots)
    if zero is not None:
        row0 = results.rows[0]
        constant = metrics.summarize([row0] * (results.num_tasks + 1))  # a model that never changes
        if entry.strategies:
            lines.append("")
        lines.extend(_block(f"Zero-shot row (row 0 of the run vs {zero.key}):", constant, zero))
    return "\n".join(lines)
